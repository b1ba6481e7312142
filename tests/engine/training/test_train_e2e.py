"""End-to-end nuclei training: batches, augmentation, embedded-backbone checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellvit_optimus.engine.training.augment import AugmentConfig, augment, geometric, hed_jitter
from cellvit_optimus.engine.training.datasets import load_consep
from cellvit_optimus.engine.errors import ConfigError, WeightsError
from cellvit_optimus.engine.training.train_e2e import E2ETrainConfig, _pools, background_crops, make_batch

CLI = [sys.executable, "-m", "cellvit_optimus.engine.cli"]


@pytest.fixture(scope="module")
def consep():
    return load_consep()


def test_geometric_moves_image_and_labels_together(consep):
    s = consep[3]
    inst = s.inst_map.astype(np.int32)
    # an image channel that encodes the label: after the same transform they must still agree
    code = (inst % 251).astype(np.uint8)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(12):
        img, lab = geometric(rng, np.dstack([code, s.image[..., 1], s.image[..., 2]]), inst)
        assert np.array_equal(img[..., 0], (lab % 251).astype(np.uint8))
        assert sorted(np.unique(lab)) == sorted(np.unique(inst))
        seen.add(img[..., 1].tobytes())
    assert len(seen) > 4  # several of the 8 rotations/flips occur


def test_hed_jitter_is_identity_at_zero_and_stays_close_to_the_stain(consep):
    img = consep[0].image
    assert hed_jitter(img, np.random.default_rng(0), 0.0) is img
    out = hed_jitter(img, np.random.default_rng(0), 0.05)
    assert out.shape == img.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - img.astype(int))
    assert 0.5 < diff.mean() < 40  # changed, but still the same tissue


def test_augment_keeps_labels_of_every_instance(consep):
    s = consep[5]
    rng = np.random.default_rng(3)
    img, inst, typ = augment(s.image, s.inst_map.astype(np.int32), s.type_map.astype(np.uint8), rng,
                             AugmentConfig(blur_p=1.0))
    assert img.shape == s.image.shape
    assert np.array_equal(np.unique(inst), np.unique(s.inst_map))
    assert sorted(np.unique(typ)) == sorted(np.unique(s.type_map))


def test_augment_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="hed_sigma"):
        AugmentConfig(hed_sigma=1.5)
    with pytest.raises(ConfigError, match="lowres_p"):
        AugmentConfig(lowres_p=1.5)
    with pytest.raises(ConfigError, match="lowres_factor"):
        AugmentConfig(lowres_factor=1.0)


def test_lower_resolution_augmentation_looks_like_a_coarser_scan(consep):
    from cellvit_optimus.engine.training.augment import lower_resolution

    s = consep[5]
    inst, typ = s.inst_map.astype(np.int32), s.type_map.astype(np.uint8)

    def sharpness(img):  # variance of the grey Laplacian
        g = img.astype(np.float32).mean(-1)
        return float((g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]).var())

    # off (the default): the random stream and so every other augmentation is unchanged
    a = augment(s.image, inst, typ, np.random.default_rng(3), AugmentConfig())
    b = augment(s.image, inst, typ, np.random.default_rng(3), AugmentConfig(lowres_p=0.0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # on: labels untouched, the image loses fine detail like a real 2x coarser image does
    img, inst2, typ2 = augment(s.image, inst, typ, np.random.default_rng(3),
                               AugmentConfig(lowres_p=1.0, blur_p=0.0))
    assert np.array_equal(inst2, a[1]) and np.array_equal(typ2, a[2])
    sharp = augment(s.image, inst, typ, np.random.default_rng(3), AugmentConfig(blur_p=0.0))[0]
    assert np.array_equal(img, lower_resolution(sharp, 2.0))  # applied last, on the same draws
    low = lower_resolution(s.image, 2.0)
    assert low.shape == s.image.shape and low.dtype == np.uint8
    assert sharpness(low) < 0.5 * sharpness(s.image)
    assert np.abs(low.astype(float).mean((0, 1)) - s.image.astype(float).mean((0, 1))).max() < 2  # same colour


def test_batches_are_a_function_of_seed_and_step(consep):
    pools = _pools(consep[:32], 0.5)
    cfg = E2ETrainConfig(batch_size=3, negative_fraction=0.0)
    a, b, c = make_batch(7, cfg, pools, [], 224), make_batch(7, cfg, pools, [], 224), make_batch(8, cfg, pools, [], 224)
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (3, 224, 224, 3)
    assert a["hv"].shape == (3, 2, 224, 224) and np.abs(a["hv"]).max() <= 1.0
    # CoNSeP patches are 128 px at 0.5 um/px: the 224 crops come from mosaics with real nuclei in them
    assert a["np"].mean() > 0.05 and a["typed"].all()
    assert set(np.unique(a["nt"])) <= {0, 1, 2, 3, 4}


def test_image_mosaics_fill_small_patches_from_their_own_source_image(consep):
    from cellvit_optimus.engine.training.train_e2e import _mosaic

    pool = _pools(consep[:48], 0.5)[0]  # three CoNSeP images, 16 patches of 128 px each at 0.5 um/px
    assert len(set(pool.groups)) == 3

    def quadrant_groups(img):
        quads = [img[:128, :128], img[:128, 128:], img[128:, :128], img[128:, 128:]]
        return [next(pool.groups[k] for k, im in enumerate(pool.images) if np.array_equal(im, q)) for q in quads]

    rng = np.random.default_rng(0)
    mixed = [len(set(quadrant_groups(_mosaic(pool, rng, 200, "pool")[0]))) for _ in range(30)]
    same = [len(set(quadrant_groups(_mosaic(pool, rng, 200, "image")[0]))) for _ in range(30)]
    assert max(mixed) > 1  # the default mixes images of the source
    assert same == [1] * 30  # "image": one tissue, one stain
    with pytest.raises(ConfigError, match="mosaic"):
        E2ETrainConfig(mosaic="slide")
    # the default keeps the identity of runs saved before the option existed, so they still resume
    assert "mosaic" not in E2ETrainConfig().identity()
    assert E2ETrainConfig(mosaic="image").identity()["mosaic"] == "image"


def test_negatives_are_glass_and_carry_no_nuclei(consep):
    from cellvit_optimus.engine.data import DATA_DIR

    neg = background_crops([DATA_DIR / "cmu_small_region.svs"], 0.5)
    assert len(neg) >= 10
    assert all(n.shape == (224, 224, 3) for n in neg)
    assert min(float(n.mean()) for n in neg) > 200  # bright glass, not tissue
    cfg = E2ETrainConfig(batch_size=4, negative_fraction=0.99)
    b = make_batch(0, cfg, _pools(consep[:8], 0.5), neg, 224)
    assert b["np"].sum() == 0 and b["nt"].sum() == 0 and b["typed"].all()


def test_lr_schedule_warms_up_then_decays():
    cfg = E2ETrainConfig(steps=100, warmup_steps=10, lr=1e-3, final_lr_fraction=0.05)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(5e-5, rel=0.05)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _train_cmd(out: Path, work: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "nuclei", "--end-to-end", "--dataset", "consep", "--held-out", "consep/test_2",
            "--held-out", "consep/test_3", "--held-out", "consep/test_4", "--held-out", "consep/test_5",
            "--steps", "6", "--batch-size", "2", "--decoder-channels", "8,8,8,8", "--checkpoint-every", "2",
            "--eval-every", "1000", "--threads", "1", "--work-dir", str(work), "--out", str(out), *extra]


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """kill -9 after a saved state, --resume: the final weights equal an uninterrupted run's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full.safetensors"
    r = subprocess.run(_train_cmd(full, tmp_path / "w-full"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["finished"] is True

    out, work = tmp_path / "killed.safetensors", tmp_path / "w-killed"
    proc = subprocess.Popen(_train_cmd(out, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        t0 = time.monotonic()
        while not (work / "state.pt").exists():
            assert proc.poll() is None, "training ended before its first saved state"
            assert time.monotonic() - t0 < 300
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    import torch

    killed_at = torch.load(work / "state.pt", weights_only=True)["step"]
    assert 2 <= killed_at < 6 and not out.exists()

    # without --resume an existing state is refused, never silently overwritten
    r = subprocess.run(_train_cmd(out, work), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(_train_cmd(out, work, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # a resume with other weight-determining settings is refused by name
    r = subprocess.run(_train_cmd(out, work, "--resume", "--lr", "0.01"),
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "lr" in r.stderr


def test_embedded_backbone_checkpoint_round_trip_and_tamper(tmp_path):
    import torch

    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel
    from cellvit_optimus.heads.backbone import build_backbone
    from cellvit_optimus.heads.checkpoint import save_nuclei_head, state_hash
    from cellvit_optimus.heads.profiles import CONSEP
    from cellvit_optimus.heads.unetr import UNETRHead

    bb = build_backbone("tiny", seed=3)
    with torch.no_grad():  # "trained": no longer the seeded init
        bb.model.blocks[0].mlp.fc1.weight.add_(0.01)
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    head = UNETRHead(192, CONSEP.num_classes, decoder_channels=(8, 8, 8, 8))
    p = tmp_path / "m.safetensors"
    save_nuclei_head(p, head, profile=CONSEP, backbone_id="tiny", backbone_hash=state_hash(state),
                     nuclei_mpp=0.5, backbone_state=state)
    m = NucleiModel(p)
    assert m.runner.weights_id == state_hash(state) != build_backbone("tiny", seed=3).weights_id
    tiles = np.full((1, 224, 224, 3), 200, np.uint8)
    emb_loaded = m.runner.embed(tiles)
    with torch.inference_mode():
        x = m.runner.preprocess(tiles)
        emb_direct, _ = bb.eval()(x, tokens=False)
    assert torch.allclose(emb_loaded, emb_direct, atol=1e-5)
    with pytest.raises(WeightsError, match="backbone_weights"):
        NucleiModel(p, backbone_weights=p)

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(p))
    t["backbone.blocks.0.mlp.fc1.weight"][0, 0] += 1.0
    bad = tmp_path / "tampered.safetensors"
    save_file(t, str(bad), metadata=meta)
    with pytest.raises(WeightsError, match="tampered.safetensors.*hash"):
        NucleiModel(bad)


def test_warm_start_loads_the_checkpoint_and_is_part_of_the_identity(tmp_path):
    """init_from: the net starts from the bundled checkpoint's exact weights; its content is in the key."""
    import shutil

    import torch

    from cellvit_optimus.engine.training.train_e2e import NucleiNet, _load_init
    from cellvit_optimus.heads.backbone import build_backbone
    from cellvit_optimus.heads.checkpoint import save_nuclei_head
    from cellvit_optimus.heads.profiles import CONSEP
    from cellvit_optimus.heads.unetr import UNETRHead

    from cellvit_optimus.engine.pipeline.nuclei import default_model_path

    src = default_model_path()  # the bundled model: trained end to end, backbone embedded
    net = NucleiNet(build_backbone("tiny", seed=0),
                    UNETRHead(192, CONSEP.num_classes, decoder_channels=(16, 32, 64, 128)))
    _load_init(net, str(src))
    saved = _weights(src)
    got = {**{"backbone." + k: v for k, v in net.backbone.model.state_dict().items()},
           **net.head.state_dict()}
    for k, v in saved.items():
        assert torch.equal(got[k], v), k

    copy = tmp_path / "copy.safetensors"
    shutil.copy(src, copy)
    a = E2ETrainConfig(init_from=str(src)).identity()
    assert a == E2ETrainConfig(init_from=str(copy)).identity()  # the weights count, not the path
    assert a != E2ETrainConfig().identity() and "init_from" not in E2ETrainConfig().identity()

    plain = tmp_path / "no-backbone.safetensors"  # a frozen-backbone head cannot seed end-to-end training
    save_nuclei_head(plain, UNETRHead(192, CONSEP.num_classes), profile=CONSEP, backbone_id="tiny",
                     backbone_hash="x", nuclei_mpp=0.5)
    with pytest.raises(ConfigError, match="no-backbone.safetensors.*embedded"):
        _load_init(net, str(plain))
    with pytest.raises(ConfigError, match="missing.safetensors"):
        E2ETrainConfig(init_from=str(tmp_path / "missing.safetensors")).identity()


def test_balanced_type_weights_favour_rare_types(consep):
    from cellvit_optimus.engine.training.train_e2e import _class_weights

    pools = _pools(consep[:8], 0.5)
    w = _class_weights(pools, 4).numpy()
    counts = np.zeros(5)
    for t in pools[0].types:
        counts += np.bincount(t.ravel(), minlength=5)[:5]
    present = counts > 0
    assert w[present].mean() == pytest.approx(1.0)
    order = np.argsort(counts[present])  # rarer type -> larger weight
    assert np.all(np.diff(w[present][order]) <= 1e-6)
