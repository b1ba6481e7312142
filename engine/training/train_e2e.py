"""End-to-end training of a small nuclei model: backbone and UNETR head learn together.

Sits beside :mod:`.train` (which trains a head on a *frozen* backbone's cached token maps, the path
for H-optimus-0). A small backbone preset (``tiny``/``small``) with random init carries no information
in its tokens, so the bundled default is trained here end to end and ships its backbone inside the
nuclei checkpoint (``heads.checkpoint``: ``embedded_backbone``).

The loop is step-based and built to survive a session: every step's batch comes from
``numpy.random.default_rng([seed, step])`` and the learning rate is a function of the step, so the
state saved every ``checkpoint_every`` steps (model, optimiser, history; ``<work_dir>/state.pt``,
written atomically) is all a ``--resume`` needs to end with the same weights as an uninterrupted run.

Sampling per batch item: a nucleus-free negative (glass/background crops) with probability
``negative_fraction``, else an annotated source chosen with equal probability per source, then an
image of it; images smaller than the crop are tiled into a 2x2 mosaic of the source's images (CoNSeP's
256-pixel patches are 128 pixels at 0.5 um/px). Crops are taken at ``tile * f`` pixels (scale jitter)
and resized to the tile, then augmented (:mod:`.augment`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline import PAD_VALUE
from cellvit_optimus.engine.training.augment import AugmentConfig, augment, resize_crop
from cellvit_optimus.engine.training.datasets import NucleiSample, resample_sample

__all__ = ("E2ETrainConfig", "E2ETrainResult", "NucleiNet", "background_crops", "train_nuclei_e2e")

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
#: config fields that may change between a run and its resume (they do not change the weights)
RUNTIME_FIELDS = ("threads", "max_minutes", "checkpoint_every", "log_every", "eval_every", "steps_this_run")


@dataclass(frozen=True)
class E2ETrainConfig:
    """Hyper-parameters of :func:`train_nuclei_e2e` (defaults: what trained the bundled model)."""

    nuclei_mpp: float = 0.5
    backbone: str = "tiny"
    decoder_channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    #: the backbone's learning rate relative to the head's
    backbone_lr_scale: float = 0.5
    weight_decay: float = 1e-4
    warmup_steps: int = 60
    #: final learning rate of the cosine schedule, relative to ``lr``
    final_lr_fraction: float = 0.05
    negative_fraction: float = 0.1
    hv_min_size: int = 10
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    eval_every: int = 250
    threads: int | None = None
    max_minutes: float | None = None
    #: stop (saving state) after this many steps in this process, e.g. to split a run over sessions
    steps_this_run: int | None = None
    #: start from this nuclei checkpoint's weights (backbone embedded, same preset and head widths)
    #: instead of random init: a second, longer schedule on top of a finished run
    init_from: str | None = None
    #: weight the typed cross-entropy by inverse square-root class frequency (rare types count more)
    nt_balanced: bool = False
    #: how images smaller than a crop are filled out to a 2 x 2 mosaic: ``"pool"`` with any images of
    #: the same source, ``"image"`` with patches of the same source image only (one tissue, one stain)
    mosaic: str = "pool"

    def __post_init__(self) -> None:
        if not (self.nuclei_mpp > 0 and math.isfinite(self.nuclei_mpp)):
            raise ConfigError(f"nuclei_mpp={self.nuclei_mpp} must be a positive number")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps={self.steps}, batch_size={self.batch_size} must be >= 1")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.backbone_lr_scale >= 0):
            raise ConfigError(f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                              f"backbone_lr_scale={self.backbone_lr_scale} >= 0")
        if not 0.0 <= self.negative_fraction < 1.0:
            raise ConfigError(f"negative_fraction={self.negative_fraction} must be in [0, 1)")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.eval_every < 1:
            raise ConfigError("checkpoint_every, log_every and eval_every must be >= 1")
        if len(self.decoder_channels) != 4:
            raise ConfigError(f"decoder_channels={self.decoder_channels} must be 4 widths")
        if self.mosaic not in ("pool", "image"):
            raise ConfigError(f"mosaic={self.mosaic!r}: expected 'pool' or 'image'")
        if isinstance(self.augment, dict):  # from a saved state
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))

    def identity(self) -> dict[str, Any]:
        """The fields that determine the weights (a resume must match them)."""
        d = asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d["decoder_channels"] = list(d["decoder_channels"])
        if d["init_from"] is None:  # identities saved before these fields existed stay equal
            d.pop("init_from")
        else:  # the start weights, not the path, determine the result
            d["init_from"] = _init_weights_id(d["init_from"])
        if not d["nt_balanced"]:
            d.pop("nt_balanced")
        if d["mosaic"] == "pool":  # identities saved before the field existed stay equal
            d.pop("mosaic")
        return d

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then cosine down to ``final_lr_fraction``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        lo = self.final_lr_fraction
        return self.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class E2ETrainResult:
    """What :func:`train_nuclei_e2e` did."""

    checkpoint: Path | None
    finished: bool
    step: int
    history: list[dict[str, float]]
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


class NucleiNet(nn.Module):
    """Backbone + UNETR head as one trainable module: normalised tiles -> :class:`NucleiOutput`."""

    def __init__(self, backbone: Any, head: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Any) -> Any:
        _, tokens = self.backbone(x, tokens=True)
        return self.head(tokens, x)


def _init_weights_id(path: str) -> str:
    """What identifies a warm start: the checkpoint file's SHA-256 (its weights, not its path)."""
    import hashlib

    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the init_from checkpoint ({e.strerror or e})") from None


def _load_init(net: NucleiNet, path: str) -> None:
    """Load a nuclei checkpoint (with embedded backbone) into ``net``; shapes must match exactly."""
    from cellvit_optimus.heads.checkpoint import load_nuclei_head

    ld = load_nuclei_head(path)
    if ld.backbone_state is None:
        raise ConfigError(f"{path}: init_from needs a checkpoint with its backbone embedded (end-to-end trained)")
    try:
        net.backbone.model.load_state_dict(ld.backbone_state, strict=True)
        net.head.load_state_dict(ld.head.state_dict(), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: does not match this configuration's backbone/head ({e})") from None


def _class_weights(pools: Sequence[Any], num_classes: int) -> torch.Tensor:
    """Inverse square-root pixel frequency of each type over the typed sources, mean 1 over present types."""
    counts = np.zeros(num_classes + 1, np.float64)
    for p in pools:
        if p.typed:
            for t in p.types:
                counts += np.bincount(t.ravel(), minlength=num_classes + 1)[: num_classes + 1]
    w = np.zeros_like(counts)
    present = counts > 0
    w[present] = counts[present] ** -0.5
    w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _Pool:
    """One source's images at the nuclei MPP."""

    name: str
    images: list[np.ndarray]
    inst: list[np.ndarray]
    types: list[np.ndarray]
    typed: bool
    #: source image (``NucleiSample.group``) of each image
    groups: list[str]


def _pools(samples: Sequence[NucleiSample], mpp: float) -> list[_Pool]:
    by: dict[str, _Pool] = {}
    for s in samples:
        r = resample_sample(s, mpp)
        p = by.setdefault(r.source, _Pool(r.source, [], [], [], r.type_map is not None, []))
        if p.typed != (r.type_map is not None):
            raise ConfigError(f"{s.name}: source {r.source!r} mixes typed and untyped images")
        p.images.append(r.image)
        p.groups.append(s.group)
        p.inst.append(r.inst_map.astype(np.int32))
        p.types.append(np.zeros(r.inst_map.shape, np.uint8) if r.type_map is None else r.type_map.astype(np.uint8))
    return [by[k] for k in sorted(by)]


def background_crops(paths: Sequence[str | os.PathLike[str]], mpp: float, size: int = 224,
                     max_per_slide: int = 24, seed: int = 0) -> list[np.ndarray]:
    """Nucleus-free negatives: ``size`` crops of glass/background from slides (read at ``mpp``).

    A window qualifies when >= 97 % of its pixels are bright and unsaturated (tissue-free), judged on the
    slide read at ``mpp`` (level 0 resampled; these are small real slides).
    """
    from PIL import Image

    from cellvit_optimus.engine.wsi import open_slide

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for path in paths:
        with open_slide(path, mpp=0.5 if "kidney" in str(path) else None) as sl:
            w, h = sl.dimensions
            img = np.asarray(sl.read_region((0, 0), 0, (w, h)))[..., :3]
            scale = sl.require_mpp()[0] / mpp
        if abs(scale - 1) > 0.05:
            img = np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR))
        mx, mn = img.max(axis=2).astype(np.int16), img.min(axis=2).astype(np.int16)
        glass = (mn > 200) & (mx - mn < 25)
        ih, iw = glass.shape
        if ih < size or iw < size:
            continue
        ii = np.pad(glass.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        ys, xs = np.mgrid[0:ih - size + 1:size // 4, 0:iw - size + 1:size // 4]
        ys, xs = ys.ravel(), xs.ravel()
        frac = (ii[ys + size, xs + size] - ii[ys, xs + size] - ii[ys + size, xs] + ii[ys, xs]) / size**2
        ok = np.flatnonzero(frac >= 0.97)
        for k in rng.permutation(ok)[:max_per_slide]:
            out.append(np.ascontiguousarray(img[ys[k]:ys[k] + size, xs[k]:xs[k] + size]))
    return out


def _mosaic(pool: _Pool, rng: np.random.Generator, need: int, mode: str = "pool") -> tuple[np.ndarray, ...]:
    """A random image of ``pool``; small ones become a 2x2 mosaic of random images of the pool (``mode``
    ``"pool"``) or of the same source image (``"image"``)."""
    i = int(rng.integers(len(pool.images)))
    img, ins, typ = pool.images[i], pool.inst[i], pool.types[i]
    if min(img.shape[:2]) >= need:
        return img, ins, typ
    cands = (np.flatnonzero(np.asarray(pool.groups) == pool.groups[i]) if mode == "image"
             else np.arange(len(pool.images)))
    picks = [i] + [int(cands[v]) for v in rng.integers(cands.size, size=3)]
    ch = max(pool.images[k].shape[0] for k in picks)
    cw = max(pool.images[k].shape[1] for k in picks)
    canvas = np.full((2 * ch, 2 * cw, 3), PAD_VALUE, np.uint8)
    cin = np.zeros((2 * ch, 2 * cw), np.int32)
    cty = np.zeros((2 * ch, 2 * cw), np.uint8)
    offset = 0
    for q, k in enumerate(picks):
        y, x = (q // 2) * ch, (q % 2) * cw
        a, b = pool.images[k].shape[:2]
        canvas[y:y + a, x:x + b] = pool.images[k]
        m = pool.inst[k]
        cin[y:y + a, x:x + b] = np.where(m > 0, m + offset, 0)
        offset += int(m.max())
        cty[y:y + a, x:x + b] = pool.types[k]
    return canvas, cin, cty


def _crop(img: np.ndarray, ins: np.ndarray, typ: np.ndarray, side: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    h, w = ins.shape
    if h < side or w < side:  # pad with glass
        ph, pw = max(h, side), max(w, side)
        img2 = np.full((ph, pw, 3), PAD_VALUE, np.uint8)
        img2[:h, :w] = img
        ins2 = np.zeros((ph, pw), np.int32)
        ins2[:h, :w] = ins
        typ2 = np.zeros((ph, pw), np.uint8)
        typ2[:h, :w] = typ
        img, ins, typ, h, w = img2, ins2, typ2, ph, pw
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    return img[y:y + side, x:x + side], ins[y:y + side, x:x + side], typ[y:y + side, x:x + side]


def make_batch(step: int, cfg: E2ETrainConfig, pools: Sequence[_Pool], negatives: Sequence[np.ndarray],
               tile: int) -> dict[str, np.ndarray]:
    """The augmented batch of 0-based ``step``: images (B, S, S, 3) uint8, np (B, S, S) int64, hv
    (B, 2, S, S) float32, nt (B, S, S) int64, typed (B,) bool. A function of ``(cfg.seed, step)`` only."""
    from cellvit_optimus.kernels import instances_to_hv

    rng = np.random.default_rng([cfg.seed, step])
    imgs, nps, hvs, nts, typed = [], [], [], [], []
    j = cfg.augment.scale_jitter
    for _ in range(cfg.batch_size):
        side = int(round(tile * rng.uniform(1 - j, 1 + j)))
        if negatives and rng.random() < cfg.negative_fraction:
            neg = negatives[int(rng.integers(len(negatives)))]
            z = np.zeros(neg.shape[:2], np.int32)
            img, ins, typ = _crop(neg, z, z.astype(np.uint8), min(side, neg.shape[0], neg.shape[1]), rng)
            is_typed = True  # background is a correct type label for every class
        else:
            pool = pools[int(rng.integers(len(pools)))]
            img, ins, typ = _crop(*_mosaic(pool, rng, side, cfg.mosaic), side, rng)
            is_typed = pool.typed
        img, ins, typ = resize_crop(img, ins, typ, tile)
        img, ins, typ = augment(img, ins, typ, rng, cfg.augment)
        a, hv = instances_to_hv(ins, min_size=cfg.hv_min_size)
        imgs.append(img)
        nps.append(a)
        hvs.append(hv)
        nts.append(np.where(ins > 0, typ, 0))
        typed.append(is_typed)
    return {"images": np.stack(imgs), "np": np.stack(nps).astype(np.int64), "hv": np.stack(hvs).astype(np.float32),
            "nt": np.stack(nts).astype(np.int64), "typed": np.asarray(typed, bool)}


# ---------------------------------------------------------------------------------------------- training
def _save_state(path: Path, payload: dict[str, Any]) -> None:
    from cellvit_optimus.engine.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: unreadable training state ({type(exc).__name__}: {exc}); "
                          "delete it to start over") from exc


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_nuclei_e2e(
    train_samples: Sequence[NucleiSample],
    work_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    config: E2ETrainConfig = E2ETrainConfig(),
    *,
    profile: Any | None = None,
    val_samples: Sequence[NucleiSample] = (),
    negatives: Sequence[np.ndarray] = (),
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> E2ETrainResult:
    """Train backbone + UNETR head end to end; save a nuclei checkpoint with the backbone inside.

    Parameters
    ----------
    train_samples : annotated images (any MPP; resampled to ``config.nuclei_mpp``)
    work_dir : folder of the resumable training state (``state.pt``)
    out : the final checkpoint (``.safetensors``), written when all ``config.steps`` are done
    val_samples : images scored (bPQ, detection F1) every ``eval_every`` steps and at the end
    negatives : nucleus-free uint8 crops at the nuclei MPP (:func:`background_crops`)
    resume : continue from ``work_dir/state.pt`` (its config must match); without it an existing
        state is an error, so a run is never silently restarted or overwritten
    progress : called with every log record (step, losses, lr, seconds per step, ETA, val metrics)
    """

    from cellvit_optimus.heads.backbone import build_backbone
    from cellvit_optimus.heads.checkpoint import save_nuclei_head, state_hash
    from cellvit_optimus.heads.losses import LossWeights, NucleiLoss, typed_nt_loss
    from cellvit_optimus.heads.unetr import UNETRHead

    from cellvit_optimus.engine.training.train import profile_for

    cfg = config
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    work = Path(work_dir)
    state_path = work / STATE_FILE
    if state_path.exists() and not resume:
        raise ConfigError(f"{state_path}: a training state exists; pass resume=True (--resume) to continue it "
                          "or use another work folder")
    prof = profile_for(train_samples, profile)
    pools = _pools(train_samples, cfg.nuclei_mpp)
    for p in pools:
        for t in p.types:
            if int(t.max()) > prof.num_classes:
                raise ConfigError(f"source {p.name!r}: type id {int(t.max())} outside profile {prof.name!r}")

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, seed=cfg.seed)
    preset = backbone.preset
    tile = preset.tile_size
    head = UNETRHead(preset.embed_dim, prof.num_classes, patch_size=preset.patch_size, tile_size=tile,
                     decoder_channels=cfg.decoder_channels)
    net = NucleiNet(backbone, head)
    if cfg.init_from is not None and not (resume and state_path.exists()):
        _load_init(net, cfg.init_from)
    net.requires_grad_(True)
    net.head.to(memory_format=torch.channels_last)
    groups = [{"params": list(net.head.parameters()), "lr_scale": 1.0}]
    if cfg.backbone_lr_scale > 0:
        groups.append({"params": list(net.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale})
    else:
        net.backbone.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay)
    mean = torch.tensor(preset.mean).view(1, 3, 1, 1)
    std = torch.tensor(preset.std).view(1, 3, 1, 1)

    history: list[dict[str, Any]] = []
    step0 = 0
    if resume and state_path.exists():
        st = _load_state(state_path)
        saved = json.loads(st["config"])
        mine = json.loads(json.dumps(cfg.identity()))
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ConfigError(f"{state_path}: saved with another configuration (differs in {diff}); "
                              "resume with the same settings or use another work folder")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step0 = int(st["step"])
        history = json.loads(st["history"])
        logger.info("resumed %s at step %d of %d", state_path, step0, cfg.steps)

    def save(step: int) -> None:
        _save_state(state_path, {"step": step, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                 "config": json.dumps(cfg.identity()), "history": json.dumps(history)})

    def evaluate_now() -> dict[str, Any]:
        from cellvit_optimus.engine.pipeline import BackboneRunner, NucleiModel
        from cellvit_optimus.engine.training.scoring import evaluate

        bb = copy.deepcopy(net.backbone).eval()
        hd = copy.deepcopy(net.head).eval().to(memory_format=torch.contiguous_format)
        runner = BackboneRunner(preset, backbone=bb, device="cpu", batch_size=8)
        m = evaluate(NucleiModel.from_parts(hd, prof, runner, cfg.nuclei_mpp), val_samples)
        net.train()
        return {"val_bpq": m["bpq"], "val_f1": m["f1_det"], "val_mpq": m["mpq"]}

    np_hv_loss = NucleiLoss(LossWeights(nt_ce=0.0, nt_dice=0.0, nt_ft=0.0))
    nt_weight = _class_weights(pools, prof.num_classes) if cfg.nt_balanced else None
    lw = LossWeights()
    deadline = None if cfg.max_minutes is None else t_start + 60.0 * cfg.max_minutes
    stop_at = cfg.steps if cfg.steps_this_run is None else min(cfg.steps, step0 + cfg.steps_this_run)
    net.train()
    sums: dict[str, float] = {}
    n_sum = 0
    t_log = time.perf_counter()
    step = step0
    while step < stop_at:
        b = make_batch(step, cfg, pools, negatives, tile)
        for g, spec in zip(opt.param_groups, groups):
            g["lr"] = cfg.lr_at(step) * spec["lr_scale"]
        x = torch.from_numpy(b["images"]).permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        np_t, hv_t, nt_t = torch.from_numpy(b["np"]), torch.from_numpy(b["hv"]), torch.from_numpy(b["nt"])
        out_ = net(x)
        loss = np_hv_loss(out_, np_t, hv_t, nt_t)
        total = loss.total
        # the NT terms of the whole batch have weight 0 here: NT is added below on the typed items only
        terms = {k: float(v) for k, v in loss.terms.items() if not k.startswith("nt_")}
        nt = typed_nt_loss(out_.nt_logits, nt_t, torch.from_numpy(b["typed"]), lw, nt_weight)
        if nt is not None:
            total = total + nt[0]
            terms.update(nt[1])
        if not torch.isfinite(total):
            raise ConfigError(f"training diverged at step {step + 1} (loss {float(total)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        terms["loss"] = float(total.detach())
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1
        step += 1
        log = step % cfg.log_every == 0 or step == stop_at
        do_eval = bool(val_samples) and (step % cfg.eval_every == 0 or step == cfg.steps)
        if log or do_eval:
            now = time.perf_counter()
            sps = (now - t_log) / max(n_sum, 1)
            rec: dict[str, Any] = {k: round(v / max(n_sum, 1), 5) for k, v in sums.items()}
            rec.update(step=step, of=cfg.steps, lr=round(cfg.lr_at(step - 1), 7), s_per_step=round(sps, 3),
                       eta=_fmt_eta(sps * (cfg.steps - step)))
            if do_eval:
                rec.update(evaluate_now())
            history.append(rec)
            logger.info("step %d/%d %s", step, cfg.steps, rec)
            if progress is not None:
                progress(rec)
            sums, n_sum, t_log = {}, 0, time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == stop_at:
            save(step)
        if deadline is not None and time.perf_counter() > deadline and step < stop_at:
            save(step)
            break

    seconds = time.perf_counter() - t_start
    finished = step >= cfg.steps
    record: dict[str, Any] = {
        "trainer": "end-to-end",
        "config": cfg.identity(),
        "train_images": sorted({s.name for s in train_samples}),
        "train_groups": sorted({s.group for s in train_samples}),
        "val_groups": sorted({s.group for s in val_samples}),
        "negatives": len(negatives),
        "steps": step,
        "history_tail": history[-5:],
        **(extra_record or {}),
    }
    ckpt = None
    if finished and out is not None:
        net.eval()
        bb_state = {k: v.detach().clone() for k, v in net.backbone.model.state_dict().items()}
        head.to(memory_format=torch.contiguous_format)
        ckpt = Path(out)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        from cellvit_optimus.engine.io import atomic_path

        with atomic_path(ckpt) as tmp:
            save_nuclei_head(tmp, net.head, profile=prof, backbone_id=preset.name,
                             backbone_hash=state_hash(bb_state), nuclei_mpp=cfg.nuclei_mpp,
                             extra=record, backbone_state=bb_state)
    return E2ETrainResult(ckpt, finished, step, history, seconds, record)

