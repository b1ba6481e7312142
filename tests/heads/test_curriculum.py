from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.heads.curriculum import CurriculumSampler, instance_density


def test_linear_and_root_pacing() -> None:
    s = CurriculumSampler(100, np.arange(100.0), start_fraction=0.2, warmup_epochs=4)
    assert [s.fraction(e) for e in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    r = CurriculumSampler(100, np.arange(100.0), start_fraction=0.2, warmup_epochs=4, pacing="root")
    assert r.fraction(0) == pytest.approx(0.2) and r.fraction(2) == pytest.approx(np.sqrt(0.04 + 0.96 / 2))
    assert r.fraction(1) > s.fraction(1)  # root pacing opens up faster early on


def test_yields_easiest_first_growing_to_all() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.random(50)
    s = CurriculumSampler(50, difficulty, start_fraction=0.3, warmup_epochs=2, seed=3)
    easiest = set(np.argsort(difficulty)[:15].tolist())
    first = list(s)
    assert len(first) == len(s) == 15 and set(first) == easiest
    assert first != sorted(first, key=lambda i: difficulty[i])  # shuffled within the pool
    s.set_epoch(2)
    assert sorted(s) == list(range(50))


def test_deterministic_with_seed() -> None:
    d = np.random.default_rng(1).random(40)
    a = CurriculumSampler(40, d, seed=5, warmup_epochs=3)
    b = CurriculumSampler(40, d, seed=5, warmup_epochs=3)
    for e in range(4):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
    c = CurriculumSampler(40, d, seed=6, warmup_epochs=3)
    c.set_epoch(3)
    a.set_epoch(3)
    assert list(a) != list(c)


def test_running_loss_update() -> None:
    s = CurriculumSampler(6, start_fraction=0.5, warmup_epochs=10, momentum=0.5)
    s.update(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3]))
    assert set(s) == {1, 3, 5}
    s.update([1, 1], [9.0, 9.0])  # 0.1 -> 4.55 -> 6.775
    assert s.difficulty[1] == pytest.approx(6.775)
    assert set(s) == {3, 5, 4}


def test_dataloader_integration_and_density() -> None:
    inst = [np.zeros((10, 10), np.int32) for _ in range(3)]
    inst[1][2:4, 2:4] = 1
    inst[2][0:2, 0:2], inst[2][5:7, 5:7] = 1, 2
    d = instance_density(inst)
    assert d.tolist() == [0.0, 1e4, 2e4]
    ds = TensorDataset(torch.arange(3))
    loader = DataLoader(
        ds, sampler=CurriculumSampler(3, d, start_fraction=0.3, warmup_epochs=2), batch_size=2
    )
    assert [b[0].tolist() for b in loader] == [[0]]


def test_validation() -> None:
    with pytest.raises(ConfigError, match="start_fraction=0"):
        CurriculumSampler(5, start_fraction=0)
    with pytest.raises(ConfigError, match="3 entries for num_samples=5"):
        CurriculumSampler(5, [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="pacing="):
        CurriculumSampler(5, pacing="step")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        CurriculumSampler(5).update([7], [1.0])
