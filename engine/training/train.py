"""Training of the nuclei head (UNETR on a frozen backbone) and of the attention-MIL slide head.

Sits beside the slide pipeline: ``cellvit-optimus train nuclei`` / ``train mil`` (``training.cli``) call
:func:`train_nuclei` / :func:`train_mil`. The nuclei flow is

1. **read** annotated images in one of three layouts (:func:`.datasets.read_dataset`): PanNuke
   (``images.npy``, ``masks.npy``, ``types.npy``), instance-map folders (CoNSeP / MoNuSeg via
   :mod:`.datasets`, or ``images/`` + ``inst/`` (+ ``types/``) maps) and GeoJSON polygons (QuPath
   exports, PUMA);
2. **tile** them at the nuclei MPP (:func:`.tiles.make_tiles`: sources at another resolution are resampled,
   e.g. 0.25 MPP by 2x for 0.5 MPP; images smaller than a tile are padded with white);
3. **cache** the frozen backbone's token maps of every tile in a versioned HDF5 file
   (:class:`.tiles.TokenCache`, keyed like ``pipeline.features.cache_key``: backbone, weights hash,
   preprocessing, dataset fingerprint, package version; fp16), so only the first epoch of the first
   run pays for the backbone;
4. **train** the UNETR head with the HoVer-Net / CellViT losses (AdamW) on random token-aligned
   sub-crops of the cached tiles (``crop=112`` trains a fully convolutional head 4x cheaper than whole
   tiles; its weights are the same at inference on 224 tiles), optionally ordered by the curriculum
   sampler; samples without types (MoNuSeg) get no NT loss;
5. **save** a safetensors checkpoint with the class profile, the backbone id / weights hash and the
   training record inside (``heads.checkpoint``).

Splits are by source image (``NucleiSample.group``): no two patches of one image land on both sides.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.training.datasets import NucleiSample
from cellvit_optimus.engine.training.tiles import TokenCache, make_tiles

__all__ = (
    "NucleiTrainConfig",
    "NucleiTrainResult",
    "MILTrainResult",
    "profile_for",
    "train_mil",
    "train_nuclei",
)

logger = logging.getLogger(__name__)


# ================================================================================ training
@dataclass(frozen=True)
class NucleiTrainConfig:
    """Hyper-parameters of :func:`train_nuclei` (defaults: what trained the bundled model)."""

    nuclei_mpp: float = 0.5
    backbone: str = "tiny"
    backbone_weights: str | None = None
    decoder_channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    epochs: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: training crop (pixels, a multiple of the patch size, <= tile): random token-aligned sub-crops
    crop: int = 112
    tile_stride: int = 168
    curriculum: bool = False
    curriculum_start: float = 0.3
    curriculum_warmup: int = 5
    seed: int = 0
    threads: int | None = None
    max_minutes: float | None = None
    cache_dir: str | None = None
    hv_min_size: int = 10

    def __post_init__(self) -> None:
        if not (self.nuclei_mpp > 0 and math.isfinite(self.nuclei_mpp)):
            raise ConfigError(f"nuclei_mpp={self.nuclei_mpp} must be a positive number")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size} must be >= 1")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ConfigError(f"lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0")
        if self.crop < 14 or self.crop % 14 or self.crop > 224:
            raise ConfigError(f"crop={self.crop} must be a multiple of the patch size 14 in 14..224")
        if not 0 < self.tile_stride <= 224:
            raise ConfigError(f"tile_stride={self.tile_stride} must be in 1..224")
        if len(self.decoder_channels) != 4:
            raise ConfigError(f"decoder_channels={self.decoder_channels} must be 4 widths")


@dataclass
class NucleiTrainResult:
    """What :func:`train_nuclei` did: the checkpoint, per-epoch history and the held-out metrics."""

    checkpoint: Path | None
    history: list[dict[str, float]]
    metrics: dict[str, Any] | None
    cache_path: Path
    backbone_calls_cache: int
    seconds: float
    n_train_tiles: int
    record: dict[str, Any] = field(default_factory=dict)


def profile_for(samples: Sequence[NucleiSample], profile: Any | None) -> Any:
    """``profile``, or the built-in profile of the typed samples' source (CoNSeP, PanNuke); both training
    loops use it."""
    from cellvit_optimus.heads.profiles import CONSEP, PANNUKE

    if profile is not None:
        return profile
    sources = {s.source for s in samples if s.type_map is not None}
    if sources <= {"consep"}:
        return CONSEP
    if sources <= {"pannuke"}:
        return PANNUKE
    raise ConfigError(f"typed samples from {sorted(sources)}: pass the class profile they share")


def train_nuclei(
    train_samples: Sequence[NucleiSample],
    out: str | os.PathLike[str] | None,
    config: NucleiTrainConfig = NucleiTrainConfig(),
    *,
    profile: Any | None = None,
    val_samples: Sequence[NucleiSample] = (),
    runner: Any | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> NucleiTrainResult:
    """Train a UNETR nuclei head on a frozen backbone's cached token maps and save it to ``out``.

    Parameters
    ----------
    train_samples : annotated images (any MPP; resampled to ``config.nuclei_mpp``)
    out : checkpoint path (``.safetensors``), or None to skip saving
    profile : ClassProfile of the type labels (default: CoNSeP for CoNSeP data, PanNuke for PanNuke)
    val_samples : held-out images, evaluated with
        :func:`cellvit_optimus.engine.training.scoring.evaluate` at the end
    runner : a BackboneRunner to use (default: built from ``config.backbone`` / ``backbone_weights``)
    progress : called with each epoch's record (the CLI prints it)
    """
    import torch

    from cellvit_optimus.heads.checkpoint import save_nuclei_head
    from cellvit_optimus.heads.curriculum import CurriculumSampler, instance_density
    from cellvit_optimus.heads.losses import LossWeights, NucleiLoss, typed_nt_loss
    from cellvit_optimus.heads.unetr import UNETRHead
    from cellvit_optimus.kernels import instances_to_hv

    from cellvit_optimus.engine.pipeline import BackboneRunner

    cfg = config
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    prof = profile_for(train_samples, profile)
    for s in train_samples:
        if s.type_map is not None and int(s.type_map.max()) > prof.num_classes:
            raise ConfigError(f"{s.name}: type id {int(s.type_map.max())} outside profile {prof.name!r} "
                              f"({prof.num_classes} classes)")
    if runner is None:
        runner = BackboneRunner(cfg.backbone, weights=cfg.backbone_weights, device="cpu", batch_size=16)
    tiles = make_tiles(train_samples, cfg.nuclei_mpp, runner.preset.tile_size, cfg.tile_stride)
    cache_dir = cfg.cache_dir or os.environ.get("OPTIMUS_CACHE_DIR") or Path.home() / ".cache" / "cellvit-optimus" / "tokens"
    cache = TokenCache(cache_dir, runner, tiles, cfg.nuclei_mpp)
    calls0 = runner.calls
    tokens = torch.from_numpy(cache.load())  # (N, 4, D, g, g) fp16
    cache_calls = runner.calls - calls0
    images = runner.preprocess(tiles.images).float()  # (N, 3, S, S), the image skip input
    n, p = len(tiles), runner.preset.patch_size
    crop, gc = cfg.crop, cfg.crop // p

    torch.manual_seed(cfg.seed)
    head = UNETRHead(runner.embed_dim, prof.num_classes, patch_size=p, tile_size=runner.preset.tile_size,
                     decoder_channels=cfg.decoder_channels)
    # the same weights, built for the training crop: the head is fully convolutional
    train_head = head if crop == runner.preset.tile_size else UNETRHead(
        runner.embed_dim, prof.num_classes, patch_size=p, tile_size=crop, decoder_channels=cfg.decoder_channels)
    if train_head is not head:
        train_head.load_state_dict(head.state_dict())
    opt = torch.optim.AdamW(train_head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    lw = LossWeights()
    np_hv_loss = NucleiLoss(LossWeights(nt_ce=0.0, nt_dice=0.0, nt_ft=0.0))
    sampler = None
    if cfg.curriculum:
        sampler = CurriculumSampler(n, instance_density(tiles.inst), start_fraction=cfg.curriculum_start,
                                    warmup_epochs=cfg.curriculum_warmup, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    deadline = None if cfg.max_minutes is None else t_start + 60.0 * cfg.max_minutes
    stopped_early = False
    for epoch in range(cfg.epochs):
        t_ep = time.perf_counter()
        calls_ep = runner.calls
        train_head.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = np.fromiter(iter(sampler), np.int64)
        else:
            order = rng.permutation(n)
        sums: dict[str, float] = {}
        nb = 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            oy = rng.integers(0, (runner.preset.grid_size - gc) + 1, size=len(idx))
            ox = rng.integers(0, (runner.preset.grid_size - gc) + 1, size=len(idx))
            tok = torch.stack([tokens[i, :, :, y:y + gc, x:x + gc] for i, y, x in zip(idx, oy, ox)]).float()
            img = torch.stack([images[i, :, y * p:y * p + crop, x * p:x * p + crop] for i, y, x in zip(idx, oy, ox)])
            np_t, hv_t, nt_t = [], [], []
            for i, y, x in zip(idx, oy, ox):
                inst = tiles.inst[i, y * p:y * p + crop, x * p:x * p + crop]
                a, hv = instances_to_hv(inst, min_size=cfg.hv_min_size)
                np_t.append(a)
                hv_t.append(hv)
                nt_t.append(tiles.types[i, y * p:y * p + crop, x * p:x * p + crop])
            np_target = torch.from_numpy(np.stack(np_t)).long()
            hv_target = torch.from_numpy(np.stack(hv_t))
            nt_target = torch.from_numpy(np.stack(nt_t).astype(np.int64))
            out_ = train_head(tuple(tok.unbind(1)), img)
            loss = np_hv_loss(out_, np_target, hv_target, nt_target)
            total = loss.total
            terms = {k: float(v) for k, v in loss.terms.items()}
            nt = typed_nt_loss(out_.nt_logits, nt_target, torch.from_numpy(tiles.has_types[idx]), lw)
            if nt is not None:
                total = total + nt[0]
                terms.update(nt[1])
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            terms["loss"] = float(total.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            nb += 1
            if sampler is not None:
                sampler.update(idx, np.full(len(idx), terms["loss"]))
        rec = {k: v / max(nb, 1) for k, v in sums.items()}
        rec.update(epoch=epoch + 1, seconds=time.perf_counter() - t_ep, backbone_calls=runner.calls - calls_ep,
                   tiles=len(order))
        history.append(rec)
        logger.info("epoch %d: %s", epoch + 1, rec)
        if progress is not None:
            progress(rec)
        if deadline is not None and time.perf_counter() > deadline and epoch + 1 < cfg.epochs:
            stopped_early = True
            break
    if train_head is not head:
        head.load_state_dict(train_head.state_dict())
    head.eval()
    seconds = time.perf_counter() - t_start
    record: dict[str, Any] = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "cache_dir"},
        "train_images": sorted({s.name for s in train_samples}),
        "train_groups": sorted({s.group for s in train_samples}),
        "held_out_groups": sorted({s.group for s in val_samples}),
        "n_train_tiles": n,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "train_seconds": round(seconds, 1),
        "final_loss": history[-1].get("loss") if history else None,
        "head_trained_crop": crop,
        **(extra_record or {}),
    }
    metrics = None
    if val_samples:
        from cellvit_optimus.engine.pipeline import NucleiModel
        from cellvit_optimus.engine.training.scoring import evaluate

        model = NucleiModel.from_parts(head, prof, runner, cfg.nuclei_mpp)
        metrics = evaluate(model, val_samples)
        record["held_out_metrics"] = metrics
    ckpt = None
    if out is not None:
        ckpt = Path(out)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        from cellvit_optimus.engine.io import atomic_path

        with atomic_path(ckpt) as tmp:
            save_nuclei_head(tmp, head, profile=prof, backbone_id=runner.preset.name,
                             backbone_hash=runner.weights_id, nuclei_mpp=cfg.nuclei_mpp, extra=record)
    return NucleiTrainResult(ckpt, history, metrics, cache.path, cache_calls, seconds, n, record)


# ================================================================================ MIL
@dataclass
class MILTrainResult:
    checkpoint: Path | None
    classes: tuple[str, ...]
    n_bags: int
    train_accuracy: float


def _read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: need a CSV with columns 'slide' and 'label' (got {list(rows[0]) if rows else []})")
    return {Path(r["slide"]).stem if r["slide"].endswith((".h5", ".svs", ".tif", ".tiff")) else r["slide"]:
            r["label"].strip() for r in rows}


def train_mil(
    bags_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    epochs: int = 40,
    lr: float = 2e-4,
    hidden_dim: int = 256,
    attn_dim: int = 128,
    dropout: float = 0.25,
    seed: int = 0,
) -> MILTrainResult:
    """Train a gated attention-MIL head on the HDF5 feature files of ``cellvit-optimus extract``.

    ``labels_csv`` has columns ``slide,label`` (slide = the feature file's stem or the slide's file
    name). Two classes give one logit (sigmoid; the second sorted label, or "1", is positive), more give
    one logit per class. The checkpoint records the classes and the backbone id / weights hash read from
    the feature files, which must all agree.
    """
    from cellvit_optimus.heads.checkpoint import save_mil
    from cellvit_optimus.heads.mil import fit_mil, predict_mil

    from cellvit_optimus.engine.pipeline import read_features

    labels = _read_labels(Path(labels_csv))
    files = sorted(Path(bags_dir).glob("*.h5"))
    if not files:
        raise ConfigError(f"{bags_dir}: no .h5 feature files")
    bags, ys, ids = [], [], set()
    for f in files:
        if f.stem not in labels:
            logger.warning("%s: no label in %s, skipped", f.name, labels_csv)
            continue
        ff = read_features(f)
        if ff.features.shape[0] == 0:
            logger.warning("%s: empty bag, skipped", f.name)
            continue
        ids.add((str(ff.attrs.get("backbone", "unknown")), str(ff.attrs.get("weights_hash", "unknown"))))
        bags.append(np.asarray(ff.features, np.float32))
        ys.append(labels[f.stem])
    if len(bags) < 2:
        raise ConfigError(f"{bags_dir}: {len(bags)} labelled bags; need at least 2")
    if len(ids) > 1:
        raise ConfigError(f"{bags_dir}: feature files come from different backbones/weights: {sorted(ids)}")
    classes = tuple(sorted(set(ys), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)))
    if len(classes) < 2:
        raise ConfigError(f"{labels_csv}: only one label {classes}; need two or more classes")
    y = np.asarray([classes.index(v) for v in ys])
    n_out = 1 if len(classes) == 2 else len(classes)
    model = fit_mil(bags, y, n_outputs=n_out, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout,
                    epochs=epochs, lr=lr, seed=seed)
    logits = predict_mil(model, bags).logits
    pred = (logits[:, 0] > 0).astype(int) if n_out == 1 else logits.argmax(1)
    acc = float((pred == y).mean())
    ckpt = None
    if out is not None:
        backbone, whash = next(iter(ids))
        ckpt = Path(out)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        names = (classes[1],) if n_out == 1 else classes
        save_mil(ckpt, model, backbone_id=backbone, backbone_hash=whash, output_names=names,
                 extra={"classes": list(classes), "n_bags": len(bags), "epochs": epochs, "lr": lr,
                        "train_accuracy": acc, "bags_dir": str(bags_dir)})
    return MILTrainResult(ckpt, classes, len(bags), acc)
