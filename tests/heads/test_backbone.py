"""Backbone presets, the builder, weight loading (files and the local Hugging Face cache) and hashing.

Nothing here downloads: HF_HUB_OFFLINE is set and sockets refuse to connect for every test.
The 1.1B H-optimus-0 architecture is only ever built on the meta device.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from cellvit_optimus.engine.errors import ConfigError, WeightsError
from cellvit_optimus.heads import (
    PRESETS,
    Backbone,
    BackbonePreset,
    build_backbone,
    get_preset,
    weights_sha256,
)
from cellvit_optimus.heads.backbone import evenly_spaced_blocks, resolve_weights
from safetensors.torch import save_file


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a backbone test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return build_backbone("tiny", seed=1)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny: Backbone) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    return path


def tiles(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, 224, 224), generator=torch.Generator().manual_seed(seed))


# -- presets ----------------------------------------------------------------------------------------


def test_preset_registry() -> None:
    assert {"hoptimus0", "small", "tiny"} <= set(PRESETS)
    assert get_preset("tiny") is PRESETS["tiny"]
    assert get_preset(PRESETS["small"]) is PRESETS["small"]
    with pytest.raises(ConfigError, match=r"preset='vit_huge'.*unknown backbone preset.*hoptimus0"):
        get_preset("vit_huge")
    with pytest.raises(TypeError):
        PRESETS["mine"] = PRESETS["tiny"]  # type: ignore[index]


def test_hoptimus0_preset_facts() -> None:
    p = PRESETS["hoptimus0"]
    assert p.timm_name == "vit_giant_patch14_reg4_dinov2"
    assert (p.embed_dim, p.depth, p.num_heads, p.patch_size, p.num_reg_tokens) == (1536, 40, 24, 14, 4)
    assert (p.tile_size, p.mpp, p.grid_size, p.num_prefix_tokens) == (224, 0.5, 16, 5)
    assert p.mean == (0.707223, 0.578729, 0.703617)
    assert p.std == (0.211883, 0.230117, 0.177517)
    assert p.default_blocks == (10, 20, 30, 40)
    assert p.hf_hub_id == "bioptimus/H-optimus-0"
    kw = p.timm_kwargs
    assert kw["img_size"] == 224 and kw["init_values"] == 1e-5 and kw["num_classes"] == 0
    assert kw["dynamic_img_size"] is False


def test_hoptimus0_architecture_on_meta() -> None:
    b = build_backbone("hoptimus0", device="meta")  # 1.1B parameters, nothing allocated
    m = b.model
    assert all(t.is_meta for t in m.parameters())
    assert sum(t.numel() for t in m.parameters()) == 1_134_774_272
    assert (m.num_features, len(m.blocks), m.num_reg_tokens, m.num_prefix_tokens) == (1536, 40, 4, 5)
    assert m.patch_embed.patch_size == (14, 14) and m.patch_embed.grid_size == (16, 16)
    assert m.blocks[0].mlp.fc1.out_features == 8192 and m.blocks[0].mlp.fc2.in_features == 4096  # SwiGLU
    assert m.blocks[0].ls1.gamma.shape == (1536,)  # LayerScale
    assert m.global_pool == "token"
    assert b.blocks == (10, 20, 30, 40)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_what_it_declares(name: str) -> None:
    p = PRESETS[name]
    m = build_backbone(p, device="meta").model
    assert (m.num_features, len(m.blocks), m.num_reg_tokens) == (p.embed_dim, p.depth, p.num_reg_tokens)
    assert m.blocks[0].attn.num_heads == p.num_heads
    assert m.patch_embed.patch_size == (p.patch_size, p.patch_size)
    assert m.pos_embed.shape[1] == p.grid_size**2  # no_embed_class: prefix tokens carry no position
    assert m.blocks[0].mlp.fc1.out_features == p.mlp_hidden
    assert (
        type(m.blocks[0]).__name__
        == type(build_backbone("hoptimus0", device="meta").model.blocks[0]).__name__
    )


def test_evenly_spaced_blocks() -> None:
    assert evenly_spaced_blocks(40) == (10, 20, 30, 40)
    assert evenly_spaced_blocks(4) == (1, 2, 3, 4)
    assert evenly_spaced_blocks(12) == (3, 6, 9, 12)
    assert evenly_spaced_blocks(2) == (1, 2)
    assert PRESETS["tiny"].default_blocks == (1, 2, 3, 4)


@pytest.mark.parametrize("blocks", [(), (0,), (5,), (2, 1), (1, 1), (1.0,), (True,)])
def test_block_validation(blocks: tuple) -> None:
    with pytest.raises(ConfigError, match=r"blocks=.*1-based block indices in 1\.\.4.*'tiny'"):
        PRESETS["tiny"].validate_blocks(blocks)


def test_preset_validation() -> None:
    with pytest.raises(ConfigError, match="embed_dim=100 is not divisible by num_heads=3"):
        BackbonePreset(
            "bad", "vit_giant_patch14_reg4_dinov2", embed_dim=100, depth=2, num_heads=3, mlp_ratio=4
        )
    with pytest.raises(ConfigError, match="tile_size=200 is not a multiple of patch_size=14"):
        BackbonePreset("bad", "x", embed_dim=96, depth=2, num_heads=3, mlp_ratio=4, tile_size=200)


def test_flops_per_tile_matches_torch_flop_counter(tiny: Backbone) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    for blk in tiny.model.blocks:  # explicit q@k and attn@v matmuls, which the counter sees everywhere
        blk.attn.fused_attn = False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            tiny.model(tiles(2))
    finally:
        for blk in tiny.model.blocks:
            blk.attn.fused_attn = True
    assert counter.get_total_flops() == 2 * PRESETS["tiny"].flops_per_tile()
    assert 5.9e11 < PRESETS["hoptimus0"].flops_per_tile() < 6.2e11  # ~2 x 1.1B params x 261 tokens


# -- the module -------------------------------------------------------------------------------------------


def test_forward_outputs_match_timm(tiny: Backbone) -> None:
    x = tiles(3)
    with torch.inference_mode():
        emb, toks = tiny(x)
        emb_only, none = tiny(x, tokens=False)
        ref = tiny.model(x)  # timm's forward with num_classes=0: CLS after the final norm
        feats = tiny.model.forward_features(x)
    torch.testing.assert_close(emb, ref)
    torch.testing.assert_close(emb_only, ref)
    torch.testing.assert_close(emb, feats[:, 0])
    assert none == ()
    assert len(toks) == 4 and all(t.shape == (3, 192, 16, 16) for t in toks)


def test_token_maps_are_patch_tokens_of_the_named_blocks(tiny: Backbone) -> None:
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
        for i, blk in enumerate(tiny.model.blocks)
    ]
    try:
        with torch.inference_mode():
            _, toks = tiny(tiles(2), blocks=(2, 4))
    finally:
        for h in hooks:
            h.remove()
    assert len(toks) == 2
    for tok, block in zip(toks, (2, 4)):
        raw = seen[block - 1][:, 5:]  # drop CLS + 4 registers; blocks are 1-based
        torch.testing.assert_close(tok, raw.reshape(2, 16, 16, 192).permute(0, 3, 1, 2))


def test_random_init_is_seeded() -> None:
    a, b, c = build_backbone("tiny", seed=3), build_backbone("tiny", seed=3), build_backbone("tiny", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)
    assert a.weights_id == "random:tiny:seed=3" != c.weights_id
    u1, u2 = build_backbone("tiny", seed=None), build_backbone("tiny", seed=None)
    assert u1.weights_id != u2.weights_id  # unseeded inits never share a cache key
    assert all(not p.requires_grad for p in a.parameters()) and not a.training


# -- weights from files -------------------------------------------------------------------------------------


def test_safetensors_round_trip(tiny: Backbone, tiny_file: Path) -> None:
    loaded = build_backbone("tiny", tiny_file)
    assert loaded.weights_path == tiny_file
    for (k, v), (k2, v2) in zip(tiny.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = tiles(2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], tiny(x)[0], rtol=0, atol=0)
    assert loaded.weights_id == "sha256:" + hashlib.sha256(tiny_file.read_bytes()).hexdigest()


def test_torch_checkpoint_round_trip(tiny: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, path)
    loaded = build_backbone("tiny", str(path))
    assert torch.equal(loaded.model.cls_token, tiny.model.cls_token)


def test_weights_of_another_preset_are_refused(tiny_file: Path) -> None:
    with pytest.raises(WeightsError) as err:
        build_backbone("small", tiny_file)
    msg = str(err.value)
    assert str(tiny_file) in msg and "preset 'small'" in msg
    assert (
        "missing keys (blocks.4." in msg
        and "shape mismatches (cls_token: file (1, 1, 192) vs model (1, 1, 384)" in msg
    )


def test_missing_and_unexpected_keys_are_listed(tiny: Backbone, tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in tiny.model.state_dict().items() if k != "norm.weight"}
    sd["head.weight"] = torch.zeros(10, 192)
    path = tmp_path / "edited.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        WeightsError,
        match=r"edited.safetensors.*1 missing keys \(norm.weight\); 1 unexpected keys \(head.weight\)",
    ):
        build_backbone("tiny", path)


def test_truncated_file_is_refused(tiny_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.safetensors"
    data = tiny_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        WeightsError, match=r"truncated.safetensors: unreadable weights file \(preset 'tiny'\)"
    ):
        build_backbone("tiny", path)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"cls_token": torch.zeros(1)}, "extra": Path("x")}, path)
    with pytest.raises(WeightsError, match="pickled.pt: unreadable weights file"):
        build_backbone("tiny", path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope.safetensors: weights file not found \(preset 'tiny'\)"):
        build_backbone("tiny", tmp_path / "nope.safetensors")


def test_weights_hash_is_cached_and_tracks_changes(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    h1 = weights_sha256(path)
    assert h1 == hashlib.sha256(b"abc").hexdigest() == weights_sha256(path)
    path.write_bytes(b"abcd")  # new size (and mtime): a new hash, not the cached one
    assert weights_sha256(path) == hashlib.sha256(b"abcd").hexdigest()


# -- weights from the local Hugging Face cache ---------------------------------------------------------------


def _fake_hf_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs, a snapshot of symlinks, refs/main -> the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hf_cache_is_read_offline(
    tmp_path: Path, tiny: Backbone, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _fake_hf_cache(tmp_path / "hub", "acme/tiny-vit", {"model.safetensors": tiny_file.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = build_backbone("tiny", "hf-hub:acme/tiny-vit")
    assert loaded.weights_path == snap / "model.safetensors"
    assert torch.equal(loaded.model.pos_embed, tiny.model.pos_embed)
    assert loaded.weights_id == "sha256:" + weights_sha256(tiny_file)
    monkeypatch.delenv("HF_HUB_CACHE")  # an explicit cache directory works too
    assert (
        resolve_weights("hf-hub:acme/tiny-vit", "tiny", hf_cache_dir=tmp_path / "hub")
        == snap / "model.safetensors"
    )


def test_hf_cache_falls_back_to_pytorch_model_bin(tmp_path: Path, tiny: Backbone) -> None:
    pt = tmp_path / "w.pt"
    torch.save(tiny.model.state_dict(), pt)
    snap = _fake_hf_cache(tmp_path / "hub", "acme/tiny-bin", {"pytorch_model.bin": pt.read_bytes()})
    loaded = build_backbone("tiny", "hf-hub:acme/tiny-bin", hf_cache_dir=tmp_path / "hub")
    assert loaded.weights_path == snap / "pytorch_model.bin"


def test_uncached_hub_weights_fail_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        WeightsError, match=r"hf-hub:bioptimus/H-optimus-0: not in the local Hugging Face cache .*empty"
    ) as err:
        build_backbone("hoptimus0", "hf-hub")  # the preset's own repository
    assert "huggingface-cli download bioptimus/H-optimus-0" in str(err.value)
    with pytest.raises(ConfigError, match="preset 'tiny' has no Hugging Face repository"):
        build_backbone("tiny", "hf-hub")
