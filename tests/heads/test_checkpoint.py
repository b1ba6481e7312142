from __future__ import annotations

import json

import pytest
import torch

from cellvit_optimus.engine.errors import ConfigError, WeightsError
from cellvit_optimus.heads.checkpoint import (
    load_mil,
    load_nuclei_head,
    read_metadata,
    save_mil,
    save_nuclei_head,
)
from cellvit_optimus.heads.mil import GatedAttentionMIL
from cellvit_optimus.heads.profiles import CONSEP, PANNUKE, PUMA_TISSUE
from cellvit_optimus.heads.unetr import UNETRHead

BB = dict(backbone_id="tiny", backbone_hash="sha256:abc123")


def _head(**kw) -> UNETRHead:
    torch.manual_seed(0)
    return UNETRHead(192, 4, decoder_channels=(4, 8, 8, 16), **kw).eval()


def test_nuclei_round_trip(tmp_path) -> None:
    head = _head(tissue_classes=5)
    path = save_nuclei_head(
        tmp_path / "h.safetensors", head, profile=CONSEP, tissue_profile=PUMA_TISSUE, nuclei_mpp=0.25,
        extra={"trained_on": ["consep"]}, **BB,
    )  # fmt: skip
    meta = read_metadata(path)
    assert meta["backbone_id"] == "tiny" and json.loads(meta["head_kwargs"])["tissue_classes"] == 5
    assert meta["package_version"]
    loaded = load_nuclei_head(path, embed_dim=192, **BB)
    assert loaded.profile == CONSEP and loaded.tissue_profile == PUMA_TISSUE and loaded.nuclei_mpp == 0.25
    assert loaded.head.hparams == head.hparams and not loaded.head.training
    for (k, a), (_, b) in zip(head.state_dict().items(), loaded.head.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_nuclei_mismatch_errors(tmp_path) -> None:
    path = save_nuclei_head(tmp_path / "h.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.25, **BB)
    with pytest.raises(
        WeightsError, match=r"h\.safetensors: head was trained on backbone 'tiny', expected 'h-optimus-0'"
    ):
        load_nuclei_head(path, backbone_id="h-optimus-0")
    with pytest.raises(WeightsError, match="hash 'sha256:abc123', expected 'sha256:zzz'"):
        load_nuclei_head(path, backbone_hash="sha256:zzz")
    with pytest.raises(WeightsError, match="embed_dim=192, the backbone gives 1536"):
        load_nuclei_head(path, embed_dim=1536)
    with pytest.raises(WeightsError, match="not found"):
        load_nuclei_head(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors"):
        load_nuclei_head(tmp_path / "junk.safetensors")
    # a MIL checkpoint is not a nuclei head
    mil = save_mil(tmp_path / "m.safetensors", GatedAttentionMIL(8), **BB)
    with pytest.raises(WeightsError, match="expected 'cellvit-optimus/nuclei-head'"):
        load_nuclei_head(mil)


def _tamper(src, dst, *, tensors=None, meta=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(ts)
    if meta:
        meta(md)
    save_file(ts, str(dst), metadata=md)
    return dst


def test_nuclei_missing_keys_and_shapes(tmp_path) -> None:
    path = save_nuclei_head(tmp_path / "h.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.25, **BB)
    key = "np_branch.head.2.weight"
    bad = _tamper(path, tmp_path / "missing.safetensors", tensors=lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=rf"missing\.safetensors: .*missing keys \['{key}'\]"):
        load_nuclei_head(bad)
    bad = _tamper(
        path, tmp_path / "shape.safetensors", tensors=lambda t: t.update({key: torch.zeros(3, 4, 1, 1)})
    )
    with pytest.raises(
        WeightsError, match=rf"shape mismatch: {key}: file \(3, 4, 1, 1\) vs expected \(2, 4, 1, 1\)"
    ):
        load_nuclei_head(bad)
    bad = _tamper(
        path, tmp_path / "prof.safetensors", meta=lambda m: m.update(class_profile=PANNUKE.to_json())
    )
    with pytest.raises(WeightsError, match="'pannuke' has 5 classes but the head has num_nuclei_types=4"):
        load_nuclei_head(bad)
    bad = _tamper(path, tmp_path / "nobb.safetensors", meta=lambda m: m.pop("backbone_id"))
    with pytest.raises(WeightsError, match="'backbone_id' missing"):
        load_nuclei_head(bad)


def test_save_validates_profile(tmp_path) -> None:
    with pytest.raises(ConfigError, match="5 classes but the head has num_nuclei_types=4"):
        save_nuclei_head(tmp_path / "x.safetensors", _head(), profile=PANNUKE, nuclei_mpp=0.25, **BB)
    with pytest.raises(ConfigError, match="nuclei_mpp"):
        save_nuclei_head(tmp_path / "x.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.0, **BB)


def test_mil_round_trip_and_errors(tmp_path) -> None:
    torch.manual_seed(0)
    m = GatedAttentionMIL(16, hidden_dim=8, attn_dim=4, n_outputs=2).eval()
    m.input_mean.fill_(0.5)
    path = save_mil(tmp_path / "m.safetensors", m, output_names=("neg", "pos"), **BB)
    loaded = load_mil(path, in_dim=16, **BB)
    assert loaded.output_names == ("neg", "pos") and loaded.model.hparams == m.hparams
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded.model(x).logits, m(x).logits)
    with pytest.raises(WeightsError, match="in_dim=16, the backbone gives 1536"):
        load_mil(path, in_dim=1536)
    with pytest.raises(WeightsError, match="expected 'other'"):
        load_mil(path, backbone_id="other")
    head = save_nuclei_head(tmp_path / "h.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.25, **BB)
    with pytest.raises(WeightsError, match="expected 'cellvit-optimus/mil-head'"):
        load_mil(head)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_every_loader(tmp_path, bad_value) -> None:
    # the checkpoint is written by the ordinary saver, then one value of one tensor is poisoned in the
    # file itself (metadata kept), so only the loader's finiteness check can catch it
    from safetensors.torch import load_file, save_file

    head_path = save_nuclei_head(tmp_path / "h.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.25, **BB)
    mil_path = save_mil(tmp_path / "m.safetensors", GatedAttentionMIL(8), **BB)
    for path, load in ((head_path, lambda p: load_nuclei_head(p, embed_dim=192, **BB)),
                       (mil_path, lambda p: load_mil(p, **BB))):
        load(path)  # intact: loads
        meta = read_metadata(path)
        tensors = load_file(str(path))
        name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = bad_value
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(WeightsError, match=rf"{path.name}: NaN or infinite values in 1 tensor.*{name} \(1 of"):
            load(path)


def test_both_kinds_write_their_own_metadata_over_the_common_keys(tmp_path) -> None:
    """nuclei and MIL share one writer: each file holds the common keys plus only its kind's"""
    from cellvit_optimus.heads.checkpoint import state_hash

    common = {"format", "format_version", "head_kwargs", "backbone_id", "backbone_hash", "package_version"}
    bb = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    n = save_nuclei_head(tmp_path / "n.safetensors", _head(), profile=CONSEP, nuclei_mpp=0.5,
                         backbone_id="tiny", backbone_hash=state_hash(bb), backbone_state=bb, extra={"epochs": 2})
    meta = read_metadata(n)
    assert set(meta) == common | {"class_profile", "nuclei_mpp", "embedded_backbone", "extra"}
    assert meta["format"] == "cellvit-optimus/nuclei-head" and meta["nuclei_mpp"] == "0.5"
    assert meta["embedded_backbone"] == "1" and json.loads(meta["extra"]) == {"epochs": 2}
    loaded = load_nuclei_head(n, backbone_hash=state_hash(bb))
    assert torch.equal(loaded.backbone_state["w"], bb["w"]) and loaded.nuclei_mpp == 0.5
    m = GatedAttentionMIL(16, hidden_dim=8, attn_dim=4, n_outputs=1).eval()
    plain = read_metadata(save_mil(tmp_path / "m.safetensors", m, **BB))
    assert set(plain) == common and plain["format"] == "cellvit-optimus/mil-head"
    named = read_metadata(save_mil(tmp_path / "m2.safetensors", m, output_names=("tumour",), extra={"n": 3}, **BB))
    assert set(named) == common | {"output_names", "extra"} and json.loads(named["output_names"]) == ["tumour"]
    assert load_mil(tmp_path / "m2.safetensors", in_dim=16, **BB).output_names == ("tumour",)
    with pytest.raises(WeightsError, match="invalid head metadata"):
        # a kwarg the head does not take: the shared loader names the file and the reason
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(tmp_path / "m.safetensors")), str(bad),
                  metadata={**plain, "head_kwargs": json.dumps({**json.loads(plain["head_kwargs"]), "nope": 1})})
        load_mil(bad)
