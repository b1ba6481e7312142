"""NP/HV targets: HoVer-Net definition against the per-instance reference on real annotations."""

from __future__ import annotations

import numpy as np
import pytest
from reference_hovernet import reference_instances_to_hv  # type: ignore[import-not-found]

from cellvit_optimus.engine.training.datasets import load_consep, load_monuseg
from cellvit_optimus.kernels import instances_to_hv


def test_matches_reference_on_real_masks(nuclei_dir):
    samples = load_consep(nuclei_dir)[::9] + load_monuseg(nuclei_dir)[:2]
    for s in samples:
        for min_size in (30, 0):
            np_t, hv = instances_to_hv(s.inst_map, min_size=min_size)
            np_r, hv_r = reference_instances_to_hv(s.inst_map, min_size=min_size)
            assert np_t.dtype == np.float32 and hv.dtype == np.float32 and hv.shape == (2, *s.inst_map.shape)
            assert np.array_equal(np_t, np_r)
            assert np.abs(hv - hv_r).max() < 1e-6, s.name


def test_hand_made_square():
    inst = np.zeros((9, 9), np.int32)
    inst[2:7, 1:8] = 5  # 5 rows x 7 cols, centre (row 4, col 4)
    np_t, hv = instances_to_hv(inst, min_size=0)
    assert np_t.sum() == 35
    assert hv[0, 4, 1] == -1 and hv[0, 4, 7] == 1 and hv[0, 4, 4] == 0
    assert hv[1, 2, 4] == -1 and hv[1, 6, 4] == 1
    assert hv[0, 3, 2] == pytest.approx(-2 / 3)
    assert np.all(hv[:, inst == 0] == 0)
    # below min_size: NP kept, HV zero
    np_s, hv_s = instances_to_hv(inst, min_size=36)
    assert np_s.sum() == 35 and not hv_s.any()


def test_disconnected_pieces_get_their_own_centre():
    inst = np.zeros((5, 12), np.int32)
    inst[1:4, 0:3] = 1
    inst[1:4, 8:11] = 1  # same id, separate piece
    _, hv = instances_to_hv(inst, min_size=0)
    assert hv[0, 2, 1] == 0 and hv[0, 2, 9] == 0


def test_validation():
    with pytest.raises(ValueError, match="2-D"):
        instances_to_hv(np.zeros((2, 3, 4), np.int32))
    with pytest.raises(TypeError, match="integer"):
        instances_to_hv(np.zeros((3, 4), np.float32))
