"""The per-tile feature the OOD detector scores: backbone embedding plus cheap stain/sharpness statistics.

Sits between the backbone and :class:`~.ood.MahalanobisOOD`. The engine computes
:func:`tile_statistics` on each batch of uint8 tiles as it is consumed and hands
:func:`ood_features` (the tile embedding next to the statistics) to the detector. Why both: measured
on real tiles (``bench/eval_ood.py``), the embedding of the bundled *random-init* tiny backbone
separates another stain (IHC) and pen ink but not blur, background or an upsampled low-resolution
scan (its AUROC there is below 0.5: blurred and blank tiles sit *closer* to the H&E mean than H&E
tiles do), while stain and sharpness statistics separate every shift measured. A trained foundation
backbone would carry most of that itself; the statistics cost about a millisecond per tile.

A fitted OOD state records which recipe it was fitted on (:data:`RECIPES`), and the engine builds
exactly that feature at run time, so a state and the run can never disagree about the features.
"""

from __future__ import annotations

import numpy as np
from cellvit_optimus.engine.errors import ConfigError

__all__ = ("EMBEDDING", "EMBEDDING_TILE_STATS", "N_TILE_STATS", "RECIPES", "ood_features", "tile_statistics")

#: the backbone tile embedding alone (states fitted before the statistics existed)
EMBEDDING = "embedding"
#: the embedding concatenated with :func:`tile_statistics` (version 1 of the statistics)
EMBEDDING_TILE_STATS = "embedding+tile_stats/1"
RECIPES = (EMBEDDING, EMBEDDING_TILE_STATS)
N_TILE_STATS = 29

# Ruifrok & Johnston stain OD vectors (haematoxylin, eosin, DAB), as scikit-image's rgb2hed uses them
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_INV = np.linalg.inv(_HED / np.linalg.norm(_HED, axis=1, keepdims=True)).astype(np.float32)
_OD_LUT = (-np.log10(np.clip(np.arange(256, dtype=np.float64), 1, 255) / 255.0)).astype(np.float32)
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def tile_statistics(tiles: np.ndarray) -> np.ndarray:
    """stain and sharpness statistics of uint8 RGB tiles.

    Parameters
    ----------
    tiles : ndarray, (N, H, W, 3) uint8

    Returns
    -------
    ndarray, (N, 29) float32
        per optical-density channel its 10/50/90th percentiles and standard deviation (12); per
        colour-deconvolved H, E, DAB channel the 50/90/99th percentiles (9); the stained fraction
        (OD sum > 0.2) and the mean chromaticity of stained pixels (4); the log variance of the
        Laplacian and log mean gradient of the grey image, absolute and divided by the grey
        variance / standard deviation (4: blur lowers both kinds, faint tissue only the absolute).
        Colour statistics use every second pixel, sharpness the full tile.
    """
    t = np.asarray(tiles)
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != np.uint8:
        raise ConfigError(f"tiles: expected uint8 (N, H, W, 3), got {t.dtype} {t.shape}")
    n = t.shape[0]
    out = np.empty((n, N_TILE_STATS), np.float32)
    if n == 0:
        return out
    od = _OD_LUT[t[:, ::2, ::2]].reshape(n, -1, 3)  # (N, P, 3)
    hed = od @ _HED_INV
    # one partition pass over all six channels, each contiguous
    chans = np.ascontiguousarray(np.concatenate([od, hed], axis=2).transpose(0, 2, 1))  # (N, 6, P)
    pct = np.percentile(chans, [10, 50, 90, 99], axis=2)  # (4, N, 6)
    k = 0
    for c in range(3):
        out[:, k:k + 3] = pct[:3, :, c].T
        out[:, k + 3] = chans[:, c].std(axis=1)
        k += 4
    for c in range(3):
        out[:, k:k + 3] = pct[1:, :, 3 + c].T
        k += 3
    tot = chans[:, :3].sum(1)  # (N, P)
    stained = tot > 0.2
    n_st = stained.sum(1)
    out[:, k] = stained.mean(1)
    chrom = np.einsum("np,ncp->nc", stained / np.maximum(tot, 1e-6), chans[:, :3])
    ok = n_st > 10
    out[:, k + 1:k + 4] = np.where(ok[:, None], chrom / np.maximum(n_st, 1)[:, None], 1.0 / 3.0)
    k += 4
    g = _GREY[0] * t[..., 0] + _GREY[1] * t[..., 1] + _GREY[2] * t[..., 2]  # (N, H, W) float32
    lap = g[:, 1:-1, :-2] + g[:, 1:-1, 2:] + g[:, :-2, 1:-1] + g[:, 2:, 1:-1] - 4 * g[:, 1:-1, 1:-1]
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    lap_var = lap.reshape(n, -1).var(1)
    grad = np.sqrt(gx * gx + gy * gy).reshape(n, -1).mean(1)
    gvar = g.reshape(n, -1).var(1)
    out[:, k] = np.log1p(lap_var)
    out[:, k + 1] = np.log1p(grad)
    out[:, k + 2] = np.log((lap_var + 1) / (gvar + 1))
    out[:, k + 3] = np.log((grad + 1) / (np.sqrt(gvar) + 1))
    return out


def ood_features(recipe: str, embeddings: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
    """the detector's input ``(N, D [+ 29])`` float32 for ``recipe`` (one of :data:`RECIPES`).

    ``embeddings`` ``(N, D)`` are the backbone's tile embeddings, ``stats`` ``(N, 29)`` the
    :func:`tile_statistics` of the same tiles (needed by :data:`EMBEDDING_TILE_STATS`).
    """
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    if recipe == EMBEDDING:
        return emb
    if recipe == EMBEDDING_TILE_STATS:
        if stats is None:
            raise ValueError(f"recipe {recipe!r} needs the tile statistics of the same tiles")
        s = np.asarray(stats, np.float32)
        if s.shape != (emb.shape[0], N_TILE_STATS):
            raise ValueError(f"tile statistics have shape {s.shape}, expected ({emb.shape[0]}, {N_TILE_STATS})")
        return np.concatenate([emb, s], axis=1)
    raise ConfigError(f"OOD feature recipe {recipe!r} is unknown; known: {', '.join(RECIPES)}")
