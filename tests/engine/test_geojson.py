"""GeoJSON features: the fast text path writes exactly what the dict path serialises to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellvit_optimus.engine.training.datasets import load_consep
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


def test_metadata_and_namespace_reach_both_paths_alike():
    import uuid

    ns = uuid.uuid5(uuid.NAMESPACE_URL, "cellvit-optimus/slide/abc")
    ring = np.asarray([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])
    args = (ring, None, None, {"type_prob": 0.5}, None, "detection", False, {"trust": "review"}, ns)
    text = polygon_feature_json(*args)
    assert text == _dict_path(*args)
    f = json.loads(text)
    assert f["properties"] == {"objectType": "detection", "measurements": {"type_prob": 0.5},
                               "metadata": {"trust": "review"}}  # no class: QuPath's own unclassified
    assert uuid.UUID(f["id"]).version == 5
    assert f["id"] != json.loads(polygon_feature_json(ring, None, None))["id"]  # the namespace counts


def test_clip_ring_leaves_inside_rings_alone_and_cuts_the_rest():
    from shapely.geometry import Polygon

    from cellvit_optimus.engine.geojson import clip_ring

    inside = np.asarray([[1.0, 1.0], [9.0, 1.0], [9.0, 9.0], [1.0, 9.0]])
    np.testing.assert_array_equal(clip_ring(inside, 10, 10), inside)
    across = inside + (5.0, 0.0)  # x from 6 to 14 on a 10 px wide slide
    cut = clip_ring(across, 10, 10)
    assert cut[:, 0].max() == 10.0 and Polygon(cut).area == pytest.approx(4 * 8)
    assert clip_ring(inside + (20.0, 0.0), 10, 10) is None  # wholly outside


def test_ring_area_centroid_matches_shapely(nuclei_dir):
    from shapely.geometry import Polygon

    from cellvit_optimus.engine.geojson import closed_ccw, ring_area_centroid

    table = instance_table(load_consep(nuclei_dir)[0].inst_map)
    for i in range(0, len(table), 7):
        coords = closed_ccw(np.asarray(table.contours[i], np.float64) * 2.0 + (100.0, 50.0))
        area, cx, cy = ring_area_centroid(coords)
        poly = Polygon(coords)
        assert area == pytest.approx(poly.area) and cx == pytest.approx(poly.centroid.x)
        assert cy == pytest.approx(poly.centroid.y)
