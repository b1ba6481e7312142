"""Training losses of the nuclei head (HoVer-Net / CellViT).

Used by the decoder training loop on :class:`~cellvit_optimus.heads.unetr.NucleiOutput`:

* NP (2-class nucleus map) and NT (type map) and tissue: cross-entropy, soft Dice and focal Tversky
  on softmax probabilities against integer label maps;
* HV: MSE over all pixels plus MSGE, the mean squared error of the HV maps' spatial gradients
  (5x5 Sobel-like kernels of HoVer-Net) restricted to nuclear pixels.

Default weights (:class:`LossWeights`) are CellViT's training config (Hörst et al., 2024,
``train_cellvit.yaml``): NP focal Tversky 1 + Dice 1; HV MSE 2.5 + MSGE 8; NT cross-entropy 0.5 +
Dice 0.2 + focal Tversky 0.5. CellViT's 0.1-weighted tissue term classifies the whole tile from the
CLS token; our tissue branch is a *map*, weighted here like NT (CE 0.5 + Dice 0.2, our choice).
``LossWeights.hovernet()`` gives HoVer-Net's (Graham et al., 2019) all-ones CE + Dice / MSE + MSGE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellvit_optimus.engine.errors import ConfigError

from .unetr import NucleiOutput

__all__ = (
    "dice_loss",
    "focal_tversky_loss",
    "msge_loss",
    "sobel_kernels",
    "LossWeights",
    "NucleiLoss",
    "NucleiLossOutput",
    "typed_nt_loss",
)

DICE_SMOOTH = 1e-3  # HoVer-Net's
FT_ALPHA, FT_BETA, FT_GAMMA, FT_SMOOTH = 0.7, 0.3, 4.0 / 3.0, 1e-6  # CellViT's FocalTverskyLoss


def _check_labels(logits: Tensor, target: Tensor, what: str) -> None:
    if (
        logits.dim() != 4
        or target.dim() != 3
        or logits.shape[0] != target.shape[0]
        or logits.shape[2:] != target.shape[1:]
    ):
        raise ValueError(
            f"{what}: logits {tuple(logits.shape)} (B, C, H, W) do not match "
            f"target {tuple(target.shape)} (B, H, W)"
        )


def _probs_onehot(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    return probs, onehot


def dice_loss(logits: Tensor, target: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """Soft Dice loss, summed over classes (HoVer-Net's ``dice_loss``; CellViT reuses it).

    Parameters
    ----------
    logits : Tensor (B, C, H, W)
        Raw scores; softmax over C.
    target : Tensor (B, H, W) int
        Class ids 0..C-1.

    Per class ``1 - (2 |P∩T| + s) / (|P| + |T| + s)`` with sums over batch and pixels, then summed over
    the C classes (background included), so a perfect prediction gives 0 and the maximum is C.
    """
    _check_labels(logits, target, "dice_loss")
    probs, onehot = _probs_onehot(logits, target)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).sum()


def focal_tversky_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = FT_ALPHA,
    beta: float = FT_BETA,
    gamma: float = FT_GAMMA,
    smooth: float = FT_SMOOTH,
) -> Tensor:
    """Focal Tversky loss (Abraham & Khan 2019) as CellViT uses it, averaged over classes.

    Per class ``TI = (TP + s) / (TP + alpha FN + beta FP + s)`` on soft counts, loss ``(1 - TI) ** gamma``;
    ``alpha > beta`` penalises missed nuclei more than false alarms.
    """
    _check_labels(logits, target, "focal_tversky_loss")
    probs, onehot = _probs_onehot(logits, target)
    dims = (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    fn = ((1.0 - probs) * onehot).sum(dims)
    fp = (probs * (1.0 - onehot)).sum(dims)
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return ((1.0 - ti).clamp_min(0.0) ** gamma).mean()


def sobel_kernels(
    size: int = 5, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """HoVer-Net's gradient kernels: ``k_x[v, h] = h / (h² + v²)``, ``k_y[v, h] = v / (h² + v²)``.

    Returns ``(k_x, k_y)``, each ``(1, 1, size, size)``; ``k_x`` differentiates along the width (x),
    ``k_y`` along the height (y). (HoVer-Net's PyTorch port builds them with ``meshgrid``'s default
    ``ij`` indexing, which swaps the two; we use the intended orientation of the TensorFlow original:
    the horizontal map is differentiated horizontally.)
    """
    if size < 3 or size % 2 == 0:
        raise ConfigError(f"sobel kernel size={size} must be odd and >= 3")
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    v, h = torch.meshgrid(r, r, indexing="ij")  # v: row offset (y), h: column offset (x)
    denom = h * h + v * v
    denom[size // 2, size // 2] = 1.0  # centre weight is 0 either way
    kx = (h / denom).to(dtype=dtype, device=device)
    ky = (v / denom).to(dtype=dtype, device=device)
    return kx[None, None], ky[None, None]


def _hv_gradients(hv: Tensor, size: int) -> Tensor:
    kx, ky = sobel_kernels(size, dtype=hv.dtype, device=hv.device)
    pad = size // 2
    dx = F.conv2d(hv[:, 0:1], kx, padding=pad)  # d(horizontal map)/dx
    dy = F.conv2d(hv[:, 1:2], ky, padding=pad)  # d(vertical map)/dy
    return torch.cat((dx, dy), dim=1)


def msge_loss(pred_hv: Tensor, true_hv: Tensor, focus: Tensor, kernel_size: int = 5) -> Tensor:
    """Mean squared gradient error of HV maps over nuclear pixels (HoVer-Net's ``msge_loss``).

    Parameters
    ----------
    pred_hv, true_hv : Tensor (B, 2, H, W)
        Channel 0 horizontal (x) map, channel 1 vertical (y) map.
    focus : Tensor (B, H, W)
        Nuclear pixels (bool or {0, 1}); the error is averaged over them and both channels.
    """
    if pred_hv.shape != true_hv.shape or pred_hv.dim() != 4 or pred_hv.shape[1] != 2:
        raise ValueError(
            f"msge_loss: pred {tuple(pred_hv.shape)} and target {tuple(true_hv.shape)} "
            "must both be (B, 2, H, W)"
        )
    if focus.shape != (pred_hv.shape[0], *pred_hv.shape[2:]):
        raise ValueError(
            f"msge_loss: focus {tuple(focus.shape)} must be (B, H, W) matching {tuple(pred_hv.shape)}"
        )
    pred_hv = pred_hv.float()
    diff = _hv_gradients(pred_hv, kernel_size) - _hv_gradients(true_hv.to(pred_hv.dtype), kernel_size)
    f = focus.to(pred_hv.dtype).unsqueeze(1).expand_as(diff)
    return (f * diff * diff).sum() / (f.sum() + 1e-8)


@dataclass(frozen=True)
class LossWeights:
    """Weights of each loss term (0 switches a term off); defaults are CellViT's."""

    np_ce: float = 0.0
    np_dice: float = 1.0
    np_ft: float = 1.0
    hv_mse: float = 2.5
    hv_msge: float = 8.0
    nt_ce: float = 0.5
    nt_dice: float = 0.2
    nt_ft: float = 0.5
    tissue_ce: float = 0.5
    tissue_dice: float = 0.2
    tissue_ft: float = 0.0

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not (v >= 0.0) or v != v or v == float("inf"):
                raise ConfigError(f"loss weight {k}={v} must be a finite number >= 0")

    @classmethod
    def hovernet(cls) -> LossWeights:
        """HoVer-Net's weights: NP CE 1 + Dice 1, HV MSE 1 + MSGE 1, NT CE 1 + Dice 1."""
        return cls(
            np_ce=1.0, np_dice=1.0, np_ft=0.0, hv_mse=1.0, hv_msge=1.0, nt_ce=1.0, nt_dice=1.0, nt_ft=0.0,
            tissue_ce=1.0, tissue_dice=1.0, tissue_ft=0.0,
        )  # fmt: skip


class NucleiLossOutput(NamedTuple):
    """``total`` (scalar, differentiable) and each weighted-in term *unweighted* (detached) by name."""

    total: Tensor
    terms: dict[str, Tensor]


class NucleiLoss(nn.Module):
    """Weighted sum of the NP, HV, NT (and tissue) losses.

    ``forward(output, np_target, hv_target, nt_target, tissue_target=None)`` with ``np_target``
    (B, H, W) in {0, 1}, ``hv_target`` (B, 2, H, W) in [-1, 1], ``nt_target`` (B, H, W) in 0..K and
    ``tissue_target`` (B, H, W) in 0..T (required when the output has a tissue map and any tissue
    weight is non-zero). MSGE is restricted to ``np_target == 1`` pixels, as in HoVer-Net.
    """

    def __init__(self, weights: LossWeights | None = None, msge_kernel_size: int = 5) -> None:
        super().__init__()
        self.weights = weights if weights is not None else LossWeights()
        sobel_kernels(msge_kernel_size)  # validate early
        self.msge_kernel_size = msge_kernel_size

    def _seg_terms(
        self, prefix: str, logits: Tensor, target: Tensor, terms: dict[str, Tensor], total: list[Tensor]
    ) -> None:
        w = self.weights
        for name, fn in (("ce", None), ("dice", dice_loss), ("ft", focal_tversky_loss)):
            weight = getattr(w, f"{prefix}_{name}")
            if weight == 0.0:
                continue
            if fn is None:
                _check_labels(logits, target, f"{prefix} cross-entropy")
                value = F.cross_entropy(logits.float(), target.long())
            else:
                value = fn(logits, target)
            terms[f"{prefix}_{name}"] = value.detach()
            total.append(weight * value)

    def forward(
        self,
        output: NucleiOutput,
        np_target: Tensor,
        hv_target: Tensor,
        nt_target: Tensor,
        tissue_target: Tensor | None = None,
    ) -> NucleiLossOutput:
        w = self.weights
        terms: dict[str, Tensor] = {}
        total: list[Tensor] = []
        self._seg_terms("np", output.np_logits, np_target, terms, total)
        if output.hv.shape != hv_target.shape:
            raise ValueError(
                f"hv: prediction {tuple(output.hv.shape)} does not match target {tuple(hv_target.shape)}"
            )
        if w.hv_mse:
            mse = F.mse_loss(output.hv.float(), hv_target.float())
            terms["hv_mse"] = mse.detach()
            total.append(w.hv_mse * mse)
        if w.hv_msge:
            msge = msge_loss(output.hv, hv_target, np_target > 0, self.msge_kernel_size)
            terms["hv_msge"] = msge.detach()
            total.append(w.hv_msge * msge)
        self._seg_terms("nt", output.nt_logits, nt_target, terms, total)
        if output.tissue_logits is not None and (w.tissue_ce or w.tissue_dice or w.tissue_ft):
            if tissue_target is None:
                raise ValueError("the output has a tissue map but no tissue_target was given")
            self._seg_terms("tissue", output.tissue_logits, tissue_target, terms, total)
        return NucleiLossOutput(torch.stack(total).sum(), terms)


def typed_nt_loss(
    nt_logits: Tensor,
    nt_target: Tensor,
    typed: Tensor,
    weights: LossWeights,
    class_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]] | None:
    """The nucleus-type loss on the batch items whose source has types (``typed``: (B,) bool).

    Sources without types (MoNuSeg) label every nucleus 0, which must not teach "background"; their items
    are left out. Returns the weighted sum (``nt_ce`` optionally class-weighted, ``nt_dice``, ``nt_ft``)
    and the detached terms, or None when no item of the batch is typed.
    """
    if not bool(typed.any()):
        return None
    lg, tg = nt_logits[typed], nt_target[typed]
    terms = {"nt_ce": F.cross_entropy(lg, tg, weight=class_weight), "nt_dice": dice_loss(lg, tg),
             "nt_ft": focal_tversky_loss(lg, tg)}
    total = weights.nt_ce * terms["nt_ce"] + weights.nt_dice * terms["nt_dice"] + weights.nt_ft * terms["nt_ft"]
    return total, {k: float(v.detach()) for k, v in terms.items()}
