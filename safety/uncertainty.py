"""Aleatoric uncertainty of the nuclei heads: entropy maps, HV consistency, tile and region aggregates.

Sits right after the heads in the flow: the engine hands over per-tile NP (nucleus/background), NT
(nucleus type) and HV (horizontal/vertical distance) maps as numpy arrays, this module turns them
into per-pixel maps and per-tile scalars, and :func:`label_regions` / :func:`aggregate_by_region`
lift tile scalars to regions (8-connected groups of tiles on the tile grid).

Conventions: class axis first, maps as ``(B, C, H, W)`` (a single tile ``(C, H, W)`` is accepted);
inputs are probabilities (softmax already applied) unless a function says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from cellvit_optimus.engine.errors import ConfigError

__all__ = (
    "TileUncertainty",
    "entropy_map",
    "hv_consistency_map",
    "tile_uncertainty",
    "label_regions",
    "aggregate_by_region",
)

_EPS = 1e-12


def entropy_map(probs: np.ndarray, axis: int = 1, normalize: bool = True) -> np.ndarray:
    """Shannon entropy over the class axis.

    Parameters
    ----------
    probs : ndarray, float, e.g. ``(B, C, H, W)``
        class probabilities summing to 1 over ``axis``.
    normalize : bool
        divide by ``log(C)`` so that values lie in [0, 1] whatever the number of classes.

    Returns
    -------
    ndarray, float32, ``probs.shape`` without ``axis``
    """
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[axis]
    if k < 2:
        raise ValueError(f"entropy needs at least 2 classes on axis {axis}, got shape {p.shape}")
    h = -np.sum(p * np.log(np.clip(p, _EPS, 1.0)), axis=axis)
    if normalize:
        h /= np.log(k)
    return h.astype(np.float32)


def hv_consistency_map(hv: np.ndarray, jump: float = 0.5, slack: float = 0.02) -> np.ndarray:
    """Per-pixel consistency of HV distance maps with their definition.

    HoVer-Net's horizontal map rises monotonically from -1 to +1 left to right across each nucleus
    and the vertical map top to bottom, so the forward difference to the next pixel (right for H,
    down for V) is positive inside a nucleus. The only legitimate decrease is a step of more than
    ``jump`` from a non-negative to a non-positive value: the end of a nucleus (+1 to background 0)
    or the border between touching nuclei (+1 to -1), or the start of one (0 to -1). Any other
    decrease below ``-slack`` is inconsistent. Ideal maps score 1, mirrored maps near 0, uniform
    noise about 0.5.

    Parameters
    ----------
    hv : ndarray, float, ``(B, 2, H, W)`` or ``(2, H, W)``
        channel 0 horizontal, channel 1 vertical.

    Returns
    -------
    ndarray, float32, ``(B, H, W)`` or ``(H, W)``: 1 consistent, 0 inconsistent (background is
    handled by the caller's foreground weighting; the last column/row compares with itself).
    """
    a = np.asarray(hv, dtype=np.float32)
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 2:
        raise ValueError(f"hv must be (B, 2, H, W) or (2, H, W), got shape {np.shape(hv)}")

    def ok(m: np.ndarray, axis: int) -> np.ndarray:
        nxt = np.concatenate([np.take(m, np.arange(1, m.shape[axis]), axis=axis),
                              np.take(m, [m.shape[axis] - 1], axis=axis)], axis=axis)
        d = nxt - m
        border = (d < -jump) & (m >= 0) & (nxt <= 0)
        return (d >= -slack) | border

    out = (ok(a[:, 0], 2) & ok(a[:, 1], 1)).astype(np.float32)
    return out[0] if single else out


@dataclass(frozen=True)
class TileUncertainty:
    """per-tile aggregates, each ``(B,)`` float32.

    ``np_entropy``: mean normalised NP entropy over the tile; ``nt_entropy``: mean normalised NT
    entropy weighted by the nucleus probability (type uncertainty where there are nuclei);
    ``hv_consistency``: nucleus-weighted mean of :func:`hv_consistency_map` (NaN without HV);
    ``nucleus_fraction``: mean nucleus probability (NaN-safe weights use it).
    """

    np_entropy: np.ndarray
    nt_entropy: np.ndarray
    hv_consistency: np.ndarray
    nucleus_fraction: np.ndarray


def tile_uncertainty(
    np_probs: np.ndarray,
    nt_probs: np.ndarray | None = None,
    hv: np.ndarray | None = None,
) -> TileUncertainty:
    """aggregate per-pixel uncertainty of a batch of tiles.

    Parameters
    ----------
    np_probs : ``(B, 2, H, W)`` float, channel 1 = nucleus
    nt_probs : ``(B, T, H, W)`` float or None
    hv : ``(B, 2, H, W)`` float or None

    Tiles with (almost) no nucleus pixels get ``nt_entropy`` 0 and ``hv_consistency`` NaN:
    nothing there to be uncertain about, which the tag rule treats as "not measured".
    """
    p = np.asarray(np_probs, dtype=np.float32)
    if p.ndim == 3:
        p = p[None]
    if p.ndim != 4 or p.shape[1] != 2:
        raise ValueError(f"np_probs must be (B, 2, H, W), got shape {np.shape(np_probs)}")
    b, _, h, w = p.shape
    fg = p[:, 1]
    wsum = fg.sum(axis=(1, 2))
    has_fg = wsum > 1.0  # at least one pixel's worth of nucleus probability
    np_ent = entropy_map(p, axis=1).mean(axis=(1, 2))

    nt_ent = np.zeros(b, dtype=np.float32)
    if nt_probs is not None:
        t = np.asarray(nt_probs, dtype=np.float32)
        if t.ndim == 3:
            t = t[None]
        if t.shape[0] != b or t.shape[2:] != (h, w):
            raise ValueError(f"nt_probs shape {t.shape} does not match np_probs shape {p.shape}")
        e = entropy_map(t, axis=1)
        nt_ent = np.where(has_fg, (e * fg).sum(axis=(1, 2)) / np.maximum(wsum, _EPS), 0.0)

    hv_c = np.full(b, np.nan, dtype=np.float32)
    if hv is not None:
        v = np.asarray(hv, dtype=np.float32)
        if v.ndim == 3:
            v = v[None]
        if v.shape != (b, 2, h, w):
            raise ValueError(f"hv shape {v.shape} does not match np_probs shape {p.shape}")
        c = hv_consistency_map(v)
        hv_c = np.where(has_fg, (c * fg).sum(axis=(1, 2)) / np.maximum(wsum, _EPS), np.nan)

    return TileUncertainty(
        np_entropy=np_ent.astype(np.float32),
        nt_entropy=np.asarray(nt_ent, dtype=np.float32),
        hv_consistency=np.asarray(hv_c, dtype=np.float32),
        nucleus_fraction=(wsum / float(h * w)).astype(np.float32),
    )


def label_regions(coords: np.ndarray, stride: int | tuple[int, int]) -> np.ndarray:
    """group tiles into regions: 8-connected components on the tile grid.

    Parameters
    ----------
    coords : ``(N, 2)`` int, tile top-left ``(x, y)`` in level-0 pixels
    stride : tile stride in the same pixels (``(sx, sy)`` or one int)

    Returns
    -------
    ``(N,)`` int64 region labels 0..R-1, numbered in order of first appearance in ``coords``.
    """
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got shape {c.shape}")
    n = c.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    sx, sy = (stride, stride) if np.isscalar(stride) else stride  # type: ignore[misc]
    if sx <= 0 or sy <= 0:
        raise ConfigError(f"tile stride must be positive, got {stride!r}")
    gx = np.floor_divide(c[:, 0] - c[:, 0].min(), sx).astype(np.int64)
    gy = np.floor_divide(c[:, 1] - c[:, 1].min(), sy).astype(np.int64)
    grid = np.zeros((gy.max() + 1, gx.max() + 1), dtype=bool)
    grid[gy, gx] = True
    lab, _ = ndimage.label(grid, structure=np.ones((3, 3), dtype=bool))
    raw = lab[gy, gx]
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first)
    remap = np.empty(raw.max() + 1, dtype=np.int64)
    remap[np.unique(raw)[order]] = np.arange(order.size)
    return remap[raw]


def aggregate_by_region(
    values: np.ndarray,
    regions: np.ndarray,
    reduce: Literal["mean", "max", "min"] = "mean",
) -> np.ndarray:
    """reduce per-tile values ``(N,)`` over region labels ``(N,)`` to ``(R,)`` (NaNs ignored)."""
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(regions)
    if v.shape != r.shape:
        raise ValueError(f"values shape {v.shape} does not match regions shape {r.shape}")
    if reduce not in ("mean", "max", "min"):
        raise ConfigError(f"reduce={reduce!r} is not one of 'mean', 'max', 'min'")
    n_reg = int(r.max()) + 1 if r.size else 0
    out = np.full(n_reg, np.nan)
    fn = {"mean": np.nanmean, "max": np.nanmax, "min": np.nanmin}[reduce]
    for k in range(n_reg):
        sel = v[r == k]
        if np.isfinite(sel).any():
            out[k] = fn(sel)
    return out
