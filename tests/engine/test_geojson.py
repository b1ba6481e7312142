"""GeoJSON features: the fast text path writes exactly what the dict path serialises to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellvit_optimus.engine.datasets import load_consep
from cellvit_optimus.engine.geojson import polygon_feature, polygon_feature_json
from cellvit_optimus.kernels import instance_table


def _dict_path(*args, **kwargs) -> str | None:
    f = polygon_feature(*args, **kwargs)
    return None if f is None else json.dumps(f, separators=(",", ":"))


@pytest.mark.parametrize("validate", [False, True])
def test_feature_text_matches_the_dict_path_on_real_contours(nuclei_dir, validate):
    # ground-truth nuclei of one real CoNSeP patch, placed on a slide as triage places them
    sample = load_consep(nuclei_dir)[0]
    table = instance_table(sample.inst_map)
    assert len(table) > 50
    for i in range(len(table)):
        ring = np.asarray(table.contours[i], np.float64) * 2.0 + (1234.0, 567.0)
        args = (ring, "epithelial", (255, 0, 0), {"type_prob": 0.9123, "area_px": float(table.areas[i])},
                {"type_prob": 0.9123, "trust": "review"})
        assert polygon_feature_json(*args, validate=validate) == _dict_path(*args, validate=validate)


@pytest.mark.parametrize("ring", [
    [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]],  # counter-clockwise, open
    [[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0], [0.0, 0.0]],  # clockwise, closed
    [[-0.0001, 0.0], [3.0, 0.0], [0.0, 2.5]],  # a coordinate that rounds to -0.0
    [[0.0, 0.0], [1.0, 1.0]],  # too few points
    [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]],  # no area
])
def test_feature_text_matches_the_dict_path_on_edge_cases(ring):
    for validate in (False, True):
        for cls in ("tumour", None):
            args = (np.asarray(ring), cls, None, None, {"slide": "a"})
            assert polygon_feature_json(*args, validate=validate) == _dict_path(*args, validate=validate)
