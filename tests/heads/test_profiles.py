from __future__ import annotations

import pytest

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.heads.profiles import BUILTIN_PROFILES, CONSEP, ClassProfile, get_profile


def test_builtins() -> None:
    assert set(BUILTIN_PROFILES) == {"pannuke", "puma_nuclei", "consep", "puma_tissue"}
    assert get_profile("pannuke").classes == (
        "neoplastic",
        "inflammatory",
        "connective",
        "dead",
        "epithelial",
    )
    assert get_profile("puma_nuclei").num_channels == 11
    assert get_profile("puma_tissue").kind == "tissue"
    # CoNSeP type ids index the profile directly
    assert [CONSEP.label(i) for i in range(5)] == [
        "background",
        "other",
        "inflammatory",
        "epithelial",
        "spindle-shaped",
    ]
    assert CONSEP.index("inflammatory") == 2 and CONSEP.color(0) == (0, 0, 0)
    for p in BUILTIN_PROFILES.values():
        assert len(set(p.colors)) == p.num_classes


def test_datasets_agree_with_consep_profile() -> None:
    from cellvit_optimus.engine.training.datasets import CONSEP_CLASSES

    assert CONSEP_CLASSES == tuple(CONSEP.label(i) for i in range(CONSEP.num_channels))


def test_json_round_trip(tmp_path) -> None:
    for p in BUILTIN_PROFILES.values():
        assert ClassProfile.from_json(p.to_json()) == p
        p.save(tmp_path / f"{p.name}.json")
        assert ClassProfile.load(tmp_path / f"{p.name}.json") == p


def test_validation() -> None:
    with pytest.raises(ConfigError, match="2 colors for 3 classes"):
        ClassProfile("x", ("a", "b", "c"), ((1, 2, 3), (4, 5, 6)))
    with pytest.raises(ConfigError, match="distinct"):
        ClassProfile("x", ("a", "b"), ((1, 2, 3), (1, 2, 3)))
    with pytest.raises(ConfigError, match="implicit"):
        ClassProfile("x", ("background", "b"), ((1, 2, 3), (4, 5, 6)))
    with pytest.raises(ConfigError, match="0..255"):
        ClassProfile("x", ("a",), ((1, 2, 300),))
    with pytest.raises(ConfigError, match="unknown class profile"):
        get_profile("nope")
