"""UNETR / CellViT nuclei decoder on top of ViT token maps.

Sits after the backbone runner: it takes the intermediate block outputs of the ViT (patch tokens
reshaped to ``(B, D, h, w)``, four of them, shallow to deep) plus the normalised input tile as the
full-resolution skip, and decodes three HoVer-Net branches at tile resolution — NP (nucleus vs
background logits), HV (horizontal/vertical distance maps) and NT (nucleus type logits) — and an
optional tissue segmentation branch. Post-processing into instances is in ``kernels``.

Layout (as CellViT, Hörst et al. 2024, for a 16x16 token grid and ``decoder_channels=(c0, c1, c2, c3)``)::

    z4 (D, 16)  --ConvT-->  (c3, 32) --+
    z3 (D, 16)  --Deconv--> (c3, 32) --+-- 3x Conv --ConvT--> (c2, 64) --+
    z2 (D, 16)  --2x Deconv-----------> (c2, 64) ----------------------+-- 2x Conv --ConvT--> (c1, 128) --+
    z1 (D, 16)  --3x Deconv-----------------------------------------> (c1, 128) ----------------------+
          --> 2x Conv --ConvT--> (c0, 256) --[resize to tile]--+
    image (3, 224) --2x Conv--> (c0, 224) --------------------+-- 2x Conv -- 1x1 Conv --> logits (224)

The skip encoders (z1..z3, image) are shared; each output branch has its own upsampling path, as in
CellViT. A patch-16 backbone lands on 256 = 16 * 16 exactly; for patch 14 (H-optimus-0, 224 = 16 * 14)
the four 2x stages give 256 px, so the last stage's features are resized (bilinear) to the tile size
*before* they are fused with the image skip: the final convolutions and the logits live on the true
224 px grid and fine detail comes from the un-resampled image skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellvit_optimus.engine.errors import ConfigError

__all__ = ("UNETRHead", "NucleiOutput", "SMALL_DECODER", "FULL_DECODER", "fuse_for_inference")

#: decoder widths (full-res, 1/2, 1/4, 1/8 of a 256 grid): a < 5M-parameter variant for CPU tests/demos
SMALL_DECODER: tuple[int, int, int, int] = (16, 32, 64, 128)
#: CellViT's widths (64, 128, 256, 512 = skip_dim_12 / bottleneck): ~80M parameters on a 1536-dim backbone
FULL_DECODER: tuple[int, int, int, int] = (64, 128, 256, 512)

NUM_TOKEN_MAPS = 4


class NucleiOutput(NamedTuple):
    """Raw head outputs, all ``(B, C, H, W)`` float at tile resolution.

    ``np_logits`` has 2 channels (background, nucleus), ``hv`` 2 (horizontal, vertical), ``nt_logits``
    ``num_nuclei_types + 1`` (background first), ``tissue_logits`` ``tissue_classes + 1`` or None.
    """

    np_logits: Tensor
    hv: Tensor
    nt_logits: Tensor
    tissue_logits: Tensor | None


class _ConvBlock(nn.Sequential):
    """3x3 conv, batch norm, ReLU, dropout (CellViT's Conv2DBlock)."""

    def __init__(self, cin: int, cout: int, drop: float) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(drop),
        )


class _DeconvBlock(nn.Sequential):
    """2x transposed conv, then a 3x3 conv block (CellViT's Deconv2DBlock)."""

    def __init__(self, cin: int, cout: int, drop: float) -> None:
        super().__init__(
            nn.ConvTranspose2d(cin, cout, 2, stride=2),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(drop),
        )


class _Branch(nn.Module):
    """One output branch: the upsampling path from the bottleneck to logits at tile resolution."""

    def __init__(self, embed_dim: int, ch: Sequence[int], out_channels: int, skip_input: bool, drop: float):
        super().__init__()
        c0, c1, c2, c3 = ch
        self.bottleneck_up = nn.ConvTranspose2d(embed_dim, c3, 2, stride=2)
        self.dec3 = nn.Sequential(
            _ConvBlock(2 * c3, c3, drop),
            _ConvBlock(c3, c3, drop),
            _ConvBlock(c3, c3, drop),
            nn.ConvTranspose2d(c3, c2, 2, stride=2),
        )
        self.dec2 = nn.Sequential(
            _ConvBlock(2 * c2, c2, drop), _ConvBlock(c2, c2, drop), nn.ConvTranspose2d(c2, c1, 2, stride=2)
        )
        self.dec1 = nn.Sequential(
            _ConvBlock(2 * c1, c1, drop), _ConvBlock(c1, c1, drop), nn.ConvTranspose2d(c1, c0, 2, stride=2)
        )
        self.head = nn.Sequential(
            _ConvBlock(2 * c0 if skip_input else c0, c0, drop),
            _ConvBlock(c0, c0, drop),
            nn.Conv2d(c0, out_channels, 1),
        )

    def forward(
        self, z4: Tensor, s3: Tensor, s2: Tensor, s1: Tensor, s0: Tensor | None, out_hw: tuple[int, int]
    ) -> Tensor:
        x = self.bottleneck_up(z4)
        x = self.dec3(torch.cat((s3, x), dim=1))
        x = self.dec2(torch.cat((s2, x), dim=1))
        x = self.dec1(torch.cat((s1, x), dim=1))
        if x.shape[-2:] != out_hw:
            x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
        if s0 is not None:
            x = torch.cat((s0, x), dim=1)
        return self.head(x)


class UNETRHead(nn.Module):
    """CellViT-style nuclei decoder (NP, HV, NT and optional tissue branches).

    Parameters
    ----------
    embed_dim : int
        Channel count D of the token maps (192 for the ``tiny`` preset, 1536 for H-optimus-0).
    num_nuclei_types : int
        Foreground nucleus classes K; the NT branch has K + 1 channels (background first), matching
        ``ClassProfile.num_channels``.
    tissue_classes : int
        Foreground tissue classes; 0 disables the tissue branch, else it has ``tissue_classes + 1``.
    patch_size, tile_size : int
        ViT patch size and tile size in pixels; the token grid must be ``tile_size // patch_size``.
    decoder_channels : (c0, c1, c2, c3)
        Widths at full, 1/2, 1/4, 1/8 resolution (:data:`SMALL_DECODER`, :data:`FULL_DECODER`).
    skip_input : bool
        Use the input tile as the full-resolution skip (``forward`` then needs ``image``).
    drop : float
        Dropout after every conv block.
    hv_activation : {"linear", "tanh"}
        HoVer-Net regresses the [-1, 1] HV targets linearly; ``tanh`` bounds the output.
    """

    def __init__(
        self,
        embed_dim: int,
        num_nuclei_types: int,
        tissue_classes: int = 0,
        patch_size: int = 14,
        tile_size: int = 224,
        decoder_channels: Sequence[int] = FULL_DECODER,
        skip_input: bool = True,
        drop: float = 0.0,
        hv_activation: Literal["linear", "tanh"] = "linear",
    ) -> None:
        super().__init__()
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if embed_dim <= 0:
            raise ConfigError(f"embed_dim={embed_dim} must be positive")
        if num_nuclei_types < 1:
            raise ConfigError(f"num_nuclei_types={num_nuclei_types} must be >= 1")
        if tissue_classes < 0:
            raise ConfigError(f"tissue_classes={tissue_classes} must be >= 0")
        if patch_size <= 0 or tile_size <= 0 or tile_size % patch_size:
            raise ConfigError(f"tile_size={tile_size} must be a positive multiple of patch_size={patch_size}")
        if len(decoder_channels) != 4 or any(c <= 0 for c in decoder_channels):
            raise ConfigError(
                f"decoder_channels={decoder_channels} must be 4 positive widths (c0, c1, c2, c3)"
            )
        if not 0.0 <= drop < 1.0:
            raise ConfigError(f"drop={drop} must be in [0, 1)")
        if hv_activation not in ("linear", "tanh"):
            raise ConfigError(f"hv_activation={hv_activation!r}, expected 'linear' or 'tanh'")
        self.hparams: dict[str, Any] = {
            "embed_dim": int(embed_dim),
            "num_nuclei_types": int(num_nuclei_types),
            "tissue_classes": int(tissue_classes),
            "patch_size": int(patch_size),
            "tile_size": int(tile_size),
            "decoder_channels": list(decoder_channels),
            "skip_input": bool(skip_input),
            "drop": float(drop),
            "hv_activation": hv_activation,
        }
        self.embed_dim = embed_dim
        self.num_nuclei_types = num_nuclei_types
        self.tissue_classes = tissue_classes
        self.patch_size = patch_size
        self.tile_size = tile_size
        self.grid_size = tile_size // patch_size
        self.skip_input = skip_input
        self.hv_activation = hv_activation

        c0, c1, c2, c3 = decoder_channels
        # shared skip encoders: token maps at grid size, upsampled to 2x, 4x, 8x the grid
        self.skip0 = (
            nn.Sequential(_ConvBlock(3, max(c0 // 2, 1), drop), _ConvBlock(max(c0 // 2, 1), c0, drop))
            if skip_input
            else None
        )
        self.skip1 = nn.Sequential(
            _DeconvBlock(embed_dim, c3, drop), _DeconvBlock(c3, c2, drop), _DeconvBlock(c2, c1, drop)
        )
        self.skip2 = nn.Sequential(_DeconvBlock(embed_dim, c3, drop), _DeconvBlock(c3, c2, drop))
        self.skip3 = _DeconvBlock(embed_dim, c3, drop)

        self.np_branch = _Branch(embed_dim, decoder_channels, 2, skip_input, drop)
        self.hv_branch = _Branch(embed_dim, decoder_channels, 2, skip_input, drop)
        self.nt_branch = _Branch(embed_dim, decoder_channels, num_nuclei_types + 1, skip_input, drop)
        self.tissue_branch = (
            _Branch(embed_dim, decoder_channels, tissue_classes + 1, skip_input, drop)
            if tissue_classes > 0
            else None
        )

    def _check_inputs(self, tokens: Sequence[Tensor], image: Tensor | None) -> None:
        if len(tokens) != NUM_TOKEN_MAPS:
            raise ValueError(
                f"UNETRHead needs {NUM_TOKEN_MAPS} token maps (shallow to deep), got {len(tokens)}"
            )
        g = self.grid_size
        want = f"(B, {self.embed_dim}, {g}, {g})"
        b = tokens[0].shape[0] if tokens[0].dim() == 4 else None
        for i, t in enumerate(tokens):
            if (
                t.dim() != 4
                or t.shape[0] != b
                or t.shape[1] != self.embed_dim
                or tuple(t.shape[2:]) != (g, g)
            ):
                shapes = [tuple(x.shape) for x in tokens]
                raise ValueError(
                    f"token map {i} has shape {tuple(t.shape)}, expected {want} for "
                    f"tile_size={self.tile_size} and patch_size={self.patch_size} "
                    f"(all token shapes: {shapes})"
                )
        if self.skip_input:
            want_img = (b, 3, self.tile_size, self.tile_size)
            if image is None:
                raise ValueError(f"skip_input=True: image {want_img} is required")
            if tuple(image.shape) != want_img:
                raise ValueError(
                    f"image has shape {tuple(image.shape)}, expected {want_img} to match token maps "
                    f"{tuple(tokens[0].shape)}"
                )

    def forward(self, tokens: Sequence[Tensor], image: Tensor | None = None) -> NucleiOutput:
        """Decode.

        Parameters
        ----------
        tokens : sequence of 4 Tensors (B, D, g, g)
            Intermediate ViT block outputs, shallow to deep (``BackboneOutput.tokens``),
            ``g = tile_size // patch_size``.
        image : Tensor (B, 3, tile_size, tile_size), optional
            The normalised tile fed to the backbone; required when ``skip_input``.
        """
        self._check_inputs(tokens, image)
        z1, z2, z3, z4 = tokens
        s0 = self.skip0(image) if self.skip0 is not None else None
        s1 = self.skip1(z1)
        s2 = self.skip2(z2)
        s3 = self.skip3(z3)
        hw = (self.tile_size, self.tile_size)
        np_logits = self.np_branch(z4, s3, s2, s1, s0, hw)
        hv = self.hv_branch(z4, s3, s2, s1, s0, hw)
        if self.hv_activation == "tanh":
            hv = torch.tanh(hv)
        nt_logits = self.nt_branch(z4, s3, s2, s1, s0, hw)
        tissue = self.tissue_branch(z4, s3, s2, s1, s0, hw) if self.tissue_branch is not None else None
        return NucleiOutput(np_logits, hv, nt_logits, tissue)

    def extra_repr(self) -> str:
        h = self.hparams
        return ", ".join(f"{k}={v}" for k, v in h.items())


def fuse_for_inference(head: UNETRHead) -> UNETRHead:
    """An inference copy of ``head``: every conv + batch-norm pair folded into one conv, dropout dropped,
    weights in channels-last layout; ``head`` itself is left as it was.

    Same outputs up to float rounding (about 1e-5 on logits). On a 2-core CPU the small decoder's
    full-resolution convolutions are most of a tile's cost; the bundled model's whole forward (backbone
    included, 4 tiles a batch) takes 0.78x the time with this copy (``bench/test_bench_e2e.py -k
    head_fused``). Not for training: the folded convs have no batch statistics left to learn.
    """
    import copy
    from itertools import pairwise

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(head).eval()
    for mod in fused.modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in pairwise(names):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = nn.Identity()
        for n in names:
            if isinstance(mod._modules[n], nn.Dropout):
                mod._modules[n] = nn.Identity()
    fused.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last)

