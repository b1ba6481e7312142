from __future__ import annotations

import pytest
import torch

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.heads.unetr import FULL_DECODER, SMALL_DECODER, NucleiOutput, UNETRHead

TINY_D = 192  # the backbone's `tiny` test preset


def _inputs(b: int = 2, d: int = TINY_D, g: int = 16, tile: int = 224):
    g0 = torch.Generator().manual_seed(0)
    return [torch.randn(b, d, g, g, generator=g0) for _ in range(4)], torch.randn(
        b, 3, tile, tile, generator=g0
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_tiny_shapes_and_gradients() -> None:
    head = UNETRHead(TINY_D, num_nuclei_types=5, decoder_channels=SMALL_DECODER)
    tokens, image = _inputs(b=1)
    tokens = [t.requires_grad_() for t in tokens]
    out = head(tokens, image)
    assert isinstance(out, NucleiOutput)
    assert out.np_logits.shape == (1, 2, 224, 224)
    assert out.hv.shape == (1, 2, 224, 224)
    assert out.nt_logits.shape == (1, 6, 224, 224)
    assert out.tissue_logits is None
    (out.np_logits.mean() + out.hv.pow(2).mean() + out.nt_logits.mean()).backward()
    for t in tokens:  # every token map reaches the outputs
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())
    assert sum(p.numel() for p in head.parameters()) < 5_000_000


def test_tissue_branch_and_tanh() -> None:
    head = UNETRHead(TINY_D, 4, tissue_classes=5, decoder_channels=SMALL_DECODER, hv_activation="tanh").eval()
    tokens, image = _inputs(b=1)
    with torch.no_grad():
        out = head(tokens, image)
    assert out.tissue_logits is not None and out.tissue_logits.shape == (1, 6, 224, 224)
    assert out.hv.abs().max() <= 1.0


def test_patch16_and_no_image_skip() -> None:
    head = UNETRHead(
        TINY_D, 3, patch_size=16, tile_size=256, decoder_channels=SMALL_DECODER, skip_input=False
    )
    tokens, _ = _inputs(b=1, g=16, tile=256)
    out = head(tokens)
    assert out.np_logits.shape == (1, 2, 256, 256)
    assert head.skip0 is None


def test_full_variant_on_meta_device() -> None:
    with torch.device("meta"):
        head = UNETRHead(1536, num_nuclei_types=10, tissue_classes=5, decoder_channels=FULL_DECODER)
        out = head([torch.empty(2, 1536, 16, 16) for _ in range(4)], torch.empty(2, 3, 224, 224))
    assert out.nt_logits.shape == (2, 11, 224, 224)
    n = sum(p.numel() for p in head.parameters())
    assert 50e6 < n < 100e6, n


def test_shape_errors_name_shapes() -> None:
    head = UNETRHead(TINY_D, 5, decoder_channels=SMALL_DECODER)
    tokens, image = _inputs(b=1, g=18, tile=252)
    with pytest.raises(
        ValueError, match=r"token map 0 has shape \(1, 192, 18, 18\), expected \(B, 192, 16, 16\)"
    ):
        head(tokens, image)
    tokens, image = _inputs(b=1)
    with pytest.raises(ValueError, match="needs 4 token maps"):
        head(tokens[:3], image)
    with pytest.raises(ValueError, match=r"image has shape \(1, 3, 256, 256\)"):
        head(tokens, torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="image .* is required"):
        head(tokens)
    with pytest.raises(ValueError, match=r"expected \(B, 192, 16, 16\)"):
        head([t[:, :100] for t in tokens], image)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        UNETRHead(TINY_D, 5, tile_size=230)
    with pytest.raises(ConfigError, match="decoder_channels"):
        UNETRHead(TINY_D, 5, decoder_channels=(8, 16, 32))
    with pytest.raises(ConfigError, match="hv_activation"):
        UNETRHead(TINY_D, 5, hv_activation="relu")  # type: ignore[arg-type]
