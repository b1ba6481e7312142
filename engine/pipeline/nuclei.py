"""The nuclei path: backbone + UNETR head on uint8 tiles, HV post-processing, tiling and stitching of images.

Sits after the tile readers and before the outputs (GeoJSON via :mod:`.geojson`, per-nucleus tables).
:class:`NucleiModel` loads a nuclei checkpoint (default: the bundled one, ``engine/data``), builds the
matching :class:`~.runner.BackboneRunner` and returns per-tile probability maps; :func:`tiles_to_instances`
runs the kernels' HoVer-Net post-processing per tile; :func:`segment_image` tiles an image of any
size with overlap at the model's nuclei MPP, runs both and stitches the tiles with
:func:`cellvit_optimus.kernels.stitch_tiles`. Scoring a model on annotated images is training's
(:mod:`cellvit_optimus.engine.training.scoring`).

Resolution: the nuclei path has its own MPP (the checkpoint's ``nuclei_mpp``), independent of the
slide-embedding / MIL path (0.5 MPP). The bundled model runs at 0.5 MPP: measured on the held-out
images (bench/eval_nuclei.py, engine/data/README.md) the 0.5 MPP model trained with the same CPU budget
beat the 0.25 MPP one on bPQ / detection F1 and needs 4x fewer tiles; the 0.25 model had higher recall
and mPQ. Inputs at another MPP are resampled to the model's and the results mapped back to the input's
pixels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cellvit_optimus.engine.errors import ConfigError, WeightsError
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.settings import REFERENCE_MPP, TRIAGE_OVERLAP_PX, forward_batch

__all__ = (
    "DEFAULT_OVERLAP",
    "HEAD_DTYPES",
    "NucleiMaps",
    "NucleiModel",
    "PostProcessConfig",
    "SegmentResult",
    "default_model_path",
    "drop_small",
    "segment_image",
    "tile_origins",
    "tile_to_instances",
    "tiles_to_instances",
    "cpu_has_native_bf16",
)

logger = logging.getLogger(__name__)

#: precisions of the nuclei decoder (``NucleiModel(head_dtype=...)``, ``--head-dtype``)
HEAD_DTYPES = ("fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """whether this CPU runs bfloat16 convolutions natively (oneDNN: AVX512-BF16 or AMX)"""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


#: tile overlap in pixels at the nuclei MPP: the triage overlap (settings), nuclei up to 32 px radius are
#: whole in their owner tile
DEFAULT_OVERLAP = TRIAGE_OVERLAP_PX
#: relative MPP difference below which an image is used at its own resolution (MoNuSeg's 0.2527 vs 0.25);
#: training (``training.datasets.resample_sample``) uses the same so it sees the pixels inference sees
MPP_TOLERANCE = 0.05
#: padding colour of images smaller than a tile (glass is white; no nuclei there)
PAD_VALUE = 255


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering ``[0, length)`` with the given stride, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def default_model_path() -> Path:
    """The bundled default nuclei checkpoint (``engine/data/default_nuclei.safetensors``)."""
    from cellvit_optimus.engine.data import DATA_DIR

    return DATA_DIR / "default_nuclei.safetensors"


class NucleiMaps(NamedTuple):
    """Per-tile probability maps (numpy float32): ``np`` (B, H, W) nucleus probability, ``hv``
    (B, 2, H, W) horizontal/vertical maps, ``nt`` (B, C, H, W) type probabilities (background first)."""

    np: np.ndarray
    hv: np.ndarray
    nt: np.ndarray


@dataclass(frozen=True)
class PostProcessConfig:
    """HoVer-Net post-processing parameters (see :func:`cellvit_optimus.kernels.hv_to_instances`)."""

    np_threshold: float = 0.5
    marker_threshold: float = 0.4
    min_object_size: int = 10
    min_marker_size: int = 10
    sobel_ksize: int = 21
    #: keep foreground pieces without a marker as one nucleus (HoVer-Net drops them)
    keep_unmarked: bool = True
    #: marker rule of :func:`cellvit_optimus.kernels.hv_to_instances`: "optimus" (HV slope markers,
    #: the default) or "hovernet" (the published energy threshold)
    mode: str = "optimus"
    marker_slope: float = 0.01
    #: nuclei smaller than this (square microns) are not reported (0 keeps everything); resolution-free,
    #: so it survives :meth:`scaled`
    min_area_um2: float = 0.0
    #: logit adjustment of the type vote (Menon et al. 2021): before the per-pixel argmax, the NT
    #: probability of class c >= 1 is divided by ``type_priors[c - 1] ** type_prior_tau``, so a class the
    #: training set over-represents needs more evidence; 0 (or no priors) leaves the vote as it was
    type_prior_tau: float = 0.0
    #: training frequency of each non-background class (normalised on construction); stored with tau
    #: because tau only means something against the priors it was tuned with
    type_priors: tuple[float, ...] | None = None

    def min_area_px(self, mpp: float) -> float:
        """:attr:`min_area_um2` in square pixels at ``mpp`` microns per pixel."""
        return self.min_area_um2 / (mpp * mpp)

    def kernel_kwargs(self) -> JsonDict:
        """keyword arguments for :func:`cellvit_optimus.kernels.hv_to_instances`"""
        return {"mode": self.mode, "np_threshold": self.np_threshold, "min_object_size": self.min_object_size,
                "sobel_ksize": self.sobel_ksize, "marker_threshold": self.marker_threshold,
                "marker_slope": self.marker_slope, "min_marker_size": self.min_marker_size,
                "keep_unmarked": self.keep_unmarked}

    def __post_init__(self) -> None:
        if not 0.0 < self.np_threshold < 1.0:
            raise ConfigError(f"np_threshold={self.np_threshold} must be in (0, 1)")
        if self.sobel_ksize < 3 or self.sobel_ksize % 2 == 0:
            raise ConfigError(f"sobel_ksize={self.sobel_ksize} must be odd and >= 3")
        if not (self.min_area_um2 >= 0 and np.isfinite(self.min_area_um2)):
            raise ConfigError(f"min_area_um2={self.min_area_um2} must be a finite number >= 0")
        if self.mode not in ("optimus", "hovernet"):
            raise ConfigError(f"mode={self.mode!r}: expected 'optimus' or 'hovernet'")
        if not (np.isfinite(self.type_prior_tau) and self.type_prior_tau >= 0):
            raise ConfigError(f"type_prior_tau={self.type_prior_tau} must be a finite number >= 0")
        if self.type_priors is not None:
            try:
                pri = np.asarray(self.type_priors, np.float64)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"type_priors={self.type_priors!r} must be numbers ({exc})") from exc
            if pri.ndim != 1 or pri.size == 0 or not (np.isfinite(pri).all() and (pri > 0).all()):
                raise ConfigError(f"type_priors={self.type_priors!r} must be finite positive numbers, "
                                  "one per non-background class")
            total = float(pri.sum())
            # normalise only when needed, so a stored (already normalised) prior round-trips exactly
            vals = tuple(float(v) for v in (pri if abs(total - 1.0) < 1e-9 else pri / total))
            object.__setattr__(self, "type_priors", vals)  # lists from a JSON record -> a hashable tuple

    def vote_probs(self, nt: np.ndarray) -> np.ndarray:
        """The NT map ``(C + 1, H, W)`` the type vote runs on: ``nt`` itself without an adjustment (the same
        object), else class c >= 1 divided by ``prior_c ** tau`` and renormalised per pixel (the argmax
        only needs the division; renormalising keeps a probability map)."""
        if self.type_priors is None or self.type_prior_tau == 0:
            return nt
        if nt.shape[0] != len(self.type_priors) + 1:
            raise ConfigError(f"type_priors has {len(self.type_priors)} classes but the NT map has "
                              f"{nt.shape[0] - 1} (shape {nt.shape})")
        w = np.ones(nt.shape[0], np.float32)
        w[1:] = np.asarray(self.type_priors, np.float64) ** -self.type_prior_tau
        adj = nt.astype(np.float32) * w[:, None, None]
        adj /= np.maximum(adj.sum(0, keepdims=True), np.float32(1e-12))
        return adj

    def scaled(self, factor: float) -> PostProcessConfig:
        """Size thresholds for another resolution (``factor`` = linear scale, areas scale by its square)."""
        k = max(3, int(round(self.sobel_ksize * factor)) | 1)
        return replace(self, min_object_size=max(1, round(self.min_object_size * factor**2)),
                       min_marker_size=max(1, round(self.min_marker_size * factor**2)), sobel_ksize=k)


class NucleiModel:
    """A nuclei checkpoint with its backbone, ready to run on uint8 tiles.

    Parameters
    ----------
    checkpoint : path, optional
        A nuclei-head safetensors checkpoint; default the bundled model (:func:`default_model_path`).
    backbone_weights : path or ``hf-hub:...``, optional
        Weights of the backbone the head was trained on, when that backbone is not a seeded random
        init (the checkpoint's ``backbone_hash`` must match them).
    device : ``"cpu"`` / ``"cuda"``
    batch_size : tiles per forward (default: ``engine.settings.FORWARD_BATCH`` for the device)
    head_dtype : ``"fp32"`` (default) or ``"bf16"``
        Precision of the UNETR decoder, most of a tile's cost on a CPU. ``"bf16"`` halves the bundled
        model's time on a CPU with native bfloat16 (AVX512-BF16 or AMX; a warning where it is missing:
        it would be slower there) with the same validation scores to 0.002 bPQ; the backbone stays as
        ``dtype`` says, so embeddings and the safety layer's features do not change.
    """

    def __init__(self, checkpoint: str | os.PathLike[str] | None = None, *,
                 backbone_weights: str | os.PathLike[str] | None = None, device: str = "cpu",
                 batch_size: int | None = None, dtype: str | None = None, head_dtype: str = "fp32") -> None:
        import torch

        from cellvit_optimus.heads.checkpoint import load_nuclei_head, read_metadata
        from cellvit_optimus.heads.unetr import fuse_for_inference

        from cellvit_optimus.engine.pipeline.runner import BackboneRunner

        if head_dtype not in HEAD_DTYPES:
            raise ConfigError(f"head_dtype={head_dtype!r}: expected one of {', '.join(HEAD_DTYPES)}")
        if batch_size is None:
            batch_size = forward_batch(device)
        path = Path(checkpoint) if checkpoint is not None else default_model_path()
        if not path.is_file():
            raise WeightsError(f"{path}: nuclei checkpoint not found")
        meta = read_metadata(path)
        preset, bhash = meta.get("backbone_id"), meta.get("backbone_hash", "")
        if not preset:
            raise WeightsError(f"{path}: no backbone_id in the checkpoint metadata")
        if meta.get("embedded_backbone") == "1":
            # the backbone was trained with the head and travels inside the checkpoint
            from cellvit_optimus.heads.backbone import backbone_from_state

            if backbone_weights is not None:
                raise WeightsError(f"{path}: the checkpoint carries its own trained backbone; "
                                   "do not pass backbone_weights with it")
            loaded = load_nuclei_head(path, backbone_id=preset, device="cpu")
            assert loaded.backbone_state is not None
            bb = backbone_from_state(preset, loaded.backbone_state, bhash, source=str(path))
            self.runner = BackboneRunner(preset, backbone=bb, device=device, dtype=dtype, batch_size=batch_size)
            loaded.head.to(self.runner.device)
        else:
            seed = 0
            if backbone_weights is None:
                prefix = f"random:{preset}:seed="
                if not bhash.startswith(prefix):
                    raise WeightsError(
                        f"{path}: the head was trained on backbone weights {bhash!r}; pass them as backbone_weights")
                seed = int(bhash[len(prefix):])
            self.runner = BackboneRunner(preset, weights=backbone_weights, device=device, dtype=dtype,
                                         batch_size=batch_size, seed=seed)
            loaded = load_nuclei_head(path, backbone_id=preset, backbone_hash=self.runner.weights_id,
                                      embed_dim=self.runner.embed_dim, device=self.runner.device)
        # folded and channels-last: same maps, and most of a CPU tile's time is this decoder
        self.head = fuse_for_inference(loaded.head).to(torch.bfloat16 if head_dtype == "bf16" else torch.float32)
        self.head_dtype = head_dtype
        if head_dtype == "bf16" and self.runner.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("%s: head_dtype='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX) "
                           "runs slower than fp32", path)
        self.profile = loaded.profile
        self.nuclei_mpp = loaded.nuclei_mpp
        self.metadata = loaded.metadata
        self.path: Path | None = path
        self.batch_size = batch_size
        # post-processing chosen for this checkpoint (on training images), stored in its training record
        try:
            tuned = json.loads(self.metadata.get("extra", "{}")).get("postprocess", {})
            self.post = PostProcessConfig(**tuned)
        except (ValueError, TypeError) as exc:
            raise WeightsError(f"{path}: invalid postprocess record in the checkpoint ({exc})") from exc

    @classmethod
    def from_parts(cls, head: Any, profile: Any, runner: Any, nuclei_mpp: float, batch_size: int = 16) -> NucleiModel:
        """Wrap an in-memory head and runner (training, tests) without a checkpoint file."""
        self = cls.__new__(cls)
        self.runner, self.head, self.profile = runner, head.eval(), profile
        self.nuclei_mpp, self.metadata, self.path, self.batch_size = float(nuclei_mpp), {}, None, batch_size
        self.post = PostProcessConfig()
        self.head_dtype = "fp32"
        return self

    @property
    def tile_size(self) -> int:
        return int(self.runner.preset.tile_size)

    @property
    def num_classes(self) -> int:
        return int(self.profile.num_classes)

    def predict(self, tiles: np.ndarray) -> NucleiMaps:
        """Probability maps of uint8 tiles ``(B, S, S, 3)`` (S = the backbone's tile size)."""
        return self.forward(tiles)[1]

    def forward(self, tiles: np.ndarray) -> tuple[np.ndarray, NucleiMaps]:
        """Tile embeddings ``(B, D)`` float32 and probability maps from one backbone pass."""
        import torch

        if not isinstance(tiles, torch.Tensor):  # tiles decoded on the GPU arrive as a device tensor
            tiles = np.asarray(tiles)
        shape, dtype = tuple(tiles.shape), str(tiles.dtype).replace("torch.", "")
        if len(shape) != 4 or shape[1:] != (self.tile_size, self.tile_size, 3) or dtype != "uint8":
            raise ConfigError(f"tiles: expected uint8 (B, {self.tile_size}, {self.tile_size}, 3), got "
                              f"{dtype} {shape}")
        embs, nps, hvs, nts = [], [], [], []
        with torch.inference_mode():
            for s in range(0, shape[0], self.batch_size):
                chunk = self.runner.to_device(tiles[s:s + self.batch_size])  # one host-to-device copy for both uses
                out = self.runner(chunk, tokens=True)
                img = self.runner.preprocess(chunk)
                dt = next(self.head.parameters()).dtype
                timed = getattr(self.runner, "time_stage", None)  # stand-in runners have no stage timer
                with timed("heads") if timed is not None else contextlib.nullcontext():
                    o = self.head(tuple(t.to(dt) for t in out.tokens),
                                  img.to(dt).contiguous(memory_format=torch.channels_last))
                embs.append(out.embedding.float().cpu().numpy())
                nps.append(o.np_logits.float().softmax(1)[:, 1].cpu().numpy())
                hvs.append(o.hv.float().cpu().numpy())
                nts.append(o.nt_logits.float().softmax(1).cpu().numpy())
        if not nps:
            s = self.tile_size
            return (np.zeros((0, self.runner.embed_dim), np.float32),
                    NucleiMaps(np.zeros((0, s, s), np.float32), np.zeros((0, 2, s, s), np.float32),
                               np.zeros((0, self.num_classes + 1, s, s), np.float32)))
        return np.concatenate(embs), NucleiMaps(np.concatenate(nps), np.concatenate(hvs), np.concatenate(nts))


def drop_small(inst: np.ndarray, table: Any, min_px: float) -> tuple[np.ndarray, Any]:
    """Remove instances of area < ``min_px`` pixels from a label map (ids 1..N) and its table (row i = id
    i + 1); the survivors are renumbered 1..M in order."""
    if min_px <= 0 or len(table) == 0:
        return inst, table

    keep = np.asarray(table.areas) >= min_px
    if keep.all():
        return inst, table
    lut = np.zeros(len(table) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    kept = table.take(keep)
    return lut[inst], replace(kept, ids=np.arange(1, len(kept) + 1, dtype=kept.ids.dtype))


def tile_to_instances(np_prob: np.ndarray, hv: np.ndarray, nt: np.ndarray | None,
                      post: PostProcessConfig) -> tuple[np.ndarray, Any]:
    """One tile's maps -> (label map, tile-local ``InstanceTable``): the single place where maps become
    instances (segment_image and the triage slide path both come here), so the type prior applies alike.

    The types and ``type_probs`` come from the vote on :meth:`PostProcessConfig.vote_probs`;
    ``type_scores`` stay the model's own mean class probabilities (conformal sets and the GeoJSON
    ``prob_*`` measurements are calibrated on those)."""
    from cellvit_optimus.kernels import hv_to_instances

    vote = post.vote_probs(nt) if nt is not None else None
    inst, table = hv_to_instances(np_prob, hv, vote, **post.kernel_kwargs())
    if vote is not nt and len(table) and table.type_scores is not None:
        from dataclasses import replace

        n, k = len(table), nt.shape[0]
        flat = inst.ravel()
        ssum = np.stack([np.bincount(flat, nt[c].ravel().astype(np.float64), n + 1)[1:] for c in range(k)], 1)
        table = replace(table, type_scores=(ssum / np.asarray(table.areas, np.float64)[:, None]).astype(np.float32))
    return inst, table


def tiles_to_instances(maps: NucleiMaps, origins: Sequence[tuple[int, int]] | None = None,
                       post: PostProcessConfig = PostProcessConfig(), mpp: float | None = None) -> list[Any]:
    """HoVer-Net post-processing of each tile's maps -> ``kernels.TileInstances`` (tile-local tables,
    origins ``(x0, y0)`` for stitching; default all at (0, 0)). With ``mpp`` (the maps' resolution),
    nuclei under ``post.min_area_um2`` are dropped."""
    from cellvit_optimus.kernels import TileInstances

    min_px = post.min_area_px(mpp) if mpp else 0.0
    out = []
    for i in range(maps.np.shape[0]):
        inst, table = tile_to_instances(maps.np[i], maps.hv[i], maps.nt[i], post)
        inst, table = drop_small(inst, table, min_px)
        x0, y0 = origins[i] if origins is not None else (0, 0)
        out.append(TileInstances(int(x0), int(y0), inst, table))
    return out


@dataclass
class SegmentResult:
    """Nuclei of one image, in the input image's pixels.

    ``inst_map`` (H, W) int32 ids 1..N; ``type_map`` (H, W) int32 class ids (0 background);
    ``table`` the kernels' :class:`InstanceTable` (row i = id i + 1; centroids, boxes, contours in
    (x, y) input pixels; ``types`` / ``type_probs`` / ``type_scores`` from the model); ``profile`` the
    class profile; ``tiles`` how many tiles were run; ``seconds`` wall time.
    """

    inst_map: np.ndarray
    type_map: np.ndarray
    table: Any
    profile: Any
    tiles: int
    seconds: float
    nuclei_mpp: float

    @property
    def types_lut(self) -> np.ndarray:
        """``lut[id]`` = class of instance ``id`` (index 0 = background), for the metrics."""
        lut = np.zeros(len(self.table) + 1, np.int32)
        lut[self.table.ids] = self.table.types
        return lut


def _resize(a: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = hw
    if nearest:
        return np.asarray(Image.fromarray(a.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
    down = w < a.shape[1]
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BOX if down else Image.Resampling.BILINEAR))


def _resize_float(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bilinear resize of a float map (pixel centres aligned, as Pillow does)"""
    from PIL import Image

    h, w = hw
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR))


def refine_upsampled(label: np.ndarray, prob: np.ndarray, threshold: float, factor: float) -> np.ndarray:
    """Outlines at the input's resolution: a label map upsampled (nearest) by ``factor`` > 1 from the
    model's grid, reshaped by the model's nucleus probability upsampled (bilinear) to the same pixels.

    A pixel is foreground where the upsampled probability reaches ``threshold``; foreground pixels take the
    label of the nearest labelled pixel within ``factor`` + 1 pixels (so a boundary moves by at most about
    one model pixel), the rest of the labels' pixels outside the foreground become background, and each
    label keeps only its largest connected piece (one outline per nucleus). Instances
    the reshaping would erase keep their upsampled pixels, so the set of nuclei (and their ids) never
    changes; only their outlines leave the ``factor``-pixel staircase of the model's grid.

    Parameters
    ----------
    label : ndarray, (H, W) int
        Instance ids, 0 background (the nearest-neighbour upsampled result).
    prob : ndarray, (H, W) float32
        Nucleus probability at the same pixels.
    """
    from scipy import ndimage

    if label.shape != prob.shape:
        raise ValueError(f"refine_upsampled: label {label.shape} and prob {prob.shape} differ")
    if not label.any():
        return label
    fg = prob >= threshold
    dist, (iy, ix) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    near = label[iy, ix]
    out = np.where(fg & (dist <= factor + 1.0), near, 0).astype(label.dtype)
    ids = np.unique(label)
    ids = ids[ids > 0]
    # the growth can leave a few pixels of an id apart from its body (a foreground speck nearest to it
    # across background): each id keeps its largest connected piece, so its outline is one polygon
    for i, sl in enumerate(ndimage.find_objects(out), start=1):
        if sl is None:
            continue
        own = out[sl] == i
        pieces, n = ndimage.label(own)
        if n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            out[sl][own & (pieces != int(sizes.argmax()))] = 0
    kept = np.zeros(int(label.max()) + 1, bool)
    kept[np.unique(out)] = True
    lost = ids[~kept[ids]]
    if lost.size:
        back = np.isin(label, lost)
        out[back] = label[back]
    return out


def segment_image(image: np.ndarray, mpp: float, model: NucleiModel, tile: int | None = None,
                  overlap: int = DEFAULT_OVERLAP, post: PostProcessConfig | None = None) -> SegmentResult:
    """Segment and classify the nuclei of an RGB image of any size.

    Parameters
    ----------
    image : ndarray, (H, W, 3) uint8
    mpp : float
        The image's microns per pixel; it is resampled to ``model.nuclei_mpp`` (and the result back).
    model : NucleiModel
    tile : int, optional
        Tile size; must be the backbone's (224), the default.
    overlap : int
        Overlap of neighbouring tiles in pixels at the nuclei MPP (stitching keeps each nucleus from the
        tile whose centre is nearest, see ``kernels.stitch``).
    post : PostProcessConfig, optional
        Post-processing parameters, given at 0.25 MPP and scaled to the model's MPP; default the
        checkpoint's (``model.post``).
    """
    from cellvit_optimus.kernels import instance_table, stitch_tiles

    t0 = time.perf_counter()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ConfigError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    image = np.ascontiguousarray(image[..., :3])
    if not (mpp > 0 and np.isfinite(mpp)):
        raise ConfigError(f"mpp={mpp} must be a positive number")
    size = model.tile_size
    if tile is not None and tile != size:
        raise ConfigError(f"tile={tile}: the model's backbone takes {size}-pixel tiles")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap={overlap} must be in 0..{size - 1}")
    post = (post or getattr(model, "post", None) or PostProcessConfig())
    post = post.scaled(REFERENCE_MPP / model.nuclei_mpp)
    h0, w0 = image.shape[:2]
    scale = mpp / model.nuclei_mpp
    resampled = abs(scale - 1.0) > MPP_TOLERANCE
    work = image
    if resampled:
        work = _resize(image, (max(1, round(h0 * scale)), max(1, round(w0 * scale))), nearest=False)
    h, w = work.shape[:2]
    ph, pw = max(h, size), max(w, size)
    if (ph, pw) != (h, w):
        padded = np.full((ph, pw, 3), PAD_VALUE, np.uint8)
        padded[:h, :w] = work
        work = padded
    stride = size - overlap
    origins = [(x, y) for y in tile_origins(ph, size, stride) for x in tile_origins(pw, size, stride)]
    tiles_inst = []
    # the nucleus probability, stitched (mean over overlapping tiles): outlines at the input's resolution
    prob_sum = np.zeros((ph, pw), np.float32) if scale < 1.0 - MPP_TOLERANCE else None
    prob_n = np.zeros((ph, pw), np.uint8) if prob_sum is not None else None
    for s in range(0, len(origins), 64):  # bounded memory: maps of at most 64 tiles at once
        chunk = origins[s:s + 64]
        batch = np.stack([work[y:y + size, x:x + size] for x, y in chunk])
        maps = model.predict(batch)
        if prob_sum is not None and prob_n is not None:
            for (x, y), p in zip(chunk, maps.np):
                prob_sum[y:y + size, x:x + size] += p
                prob_n[y:y + size, x:x + size] += 1
        tiles_inst += tiles_to_instances(maps, chunk, post, model.nuclei_mpp)
    table, label = stitch_tiles(tiles_inst, slide_shape=(ph, pw))
    assert label is not None
    label = label[:h, :w]
    if resampled:
        label = _resize(label, (h0, w0), nearest=True)
        if prob_sum is not None and prob_n is not None:
            prob = prob_sum[:h, :w] / np.maximum(prob_n[:h, :w], 1)
            label = refine_upsampled(label, _resize_float(prob, (h0, w0)), post.np_threshold, 1.0 / scale)
    # contiguous ids in the input's pixels; per-instance classes carried over from the stitched table
    ids = np.unique(label)
    ids = ids[ids > 0]
    lut = np.zeros(int(label.max()) + 1 if label.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    inst = lut[label].astype(np.int32)
    final = instance_table(inst, int(ids.size))
    row = {int(g): i for i, g in enumerate(table.ids)}
    sel = np.asarray([row[int(g)] for g in ids], np.int64) if ids.size else np.zeros(0, np.int64)

    scores = table.type_scores[sel] if table.type_scores is not None else None
    final = replace(final, types=table.types[sel].astype(np.int32), type_probs=table.type_probs[sel],
                    type_scores=scores)
    tlut = np.zeros(ids.size + 1, np.int32)
    tlut[1:] = final.types
    return SegmentResult(inst, tlut[inst], final, model.profile, len(origins), time.perf_counter() - t0,
                         model.nuclei_mpp)
