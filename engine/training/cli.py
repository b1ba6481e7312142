"""Commands that train and run models: ``train nuclei``, ``train mil`` and ``segment``.

Registered on the main group in :mod:`.cli` (``cli.add_command(train)``, ``cli.add_command(segment)``).
They map flags onto :class:`~.train.NucleiTrainConfig`, :func:`~.train.train_mil` and
:func:`~.nuclei.segment_image`; exit codes as in :mod:`.cli` (0 all ok, 1 partial, 2 failed / misuse).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from cellvit_optimus.engine.cli_params import (
    DEVICE,
    HEAD_DTYPE,
    MPP,
    NON_NEGATIVE,
    POSITIVE,
    existing_file,
    resolve_device,
    writable_dir,
    writable_file,
)
from cellvit_optimus.engine.errors import OptimusError

__all__ = ("train", "segment", "train_command", "segment_command")

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2

# Every flag is checked by click before the command body runs (shared types in .cli_params): a bad
# value fails at once with the flag's own name and exit code 2, before any data or model is loaded.
_POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)


def _crop(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value % 14:
        raise click.BadParameter(f"{value} is not a multiple of 14 (the backbone's patch size)", ctx=ctx,
                                 param=param)
    return value


def _channels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in value.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 4 or min(channels) < 1:
        raise click.BadParameter(f"{value!r}: expected 4 positive integers like 16,32,64,128", ctx=ctx,
                                 param=param)
    return channels


@click.group()
def train() -> None:
    """Train the nuclei head or the slide-level MIL head."""


@train.command("nuclei")
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="consep | monuseg | [pannuke:|folder:|geojson:]PATH (repeatable)")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="folder holding consep-patches/ and monuseg-train/ (default: shared/data/nuclei)")
@click.option("--held-out", multiple=True, help="source-image groups kept out of training and scored "
              "(e.g. consep/test_2, monuseg/TCGA-A7-A13E-01Z-00-DX1); repeatable")
@click.option("--profile", "profile_name", default=None,
              help="class profile of the type labels (built-in name or JSON file; default from the data)")
@click.option("--source-mpp", type=MPP, default=None,
              help="microns per pixel of the images of path datasets (default 0.25)")
@click.option("--nuclei-mpp", "--mpp", "nuclei_mpp", type=MPP, default=0.5, show_default=True,
              help="resolution of the nuclei path in um/px, the model's (triage --nuclei-mpp); "
              "--mpp: former name")
@click.option("--backbone", default="tiny", show_default=True, help="backbone preset")
@click.option("--backbone-weights", default=None, callback=existing_file,
              help="backbone weights (file or hf-hub[:repo]); default random")
@click.option("--epochs", type=POSITIVE, default=8, show_default=True, help="passes over the training tiles")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="crops per optimiser step")
@click.option("--lr", type=_POSITIVE_FLOAT, default=2e-3, show_default=True, help="learning rate")
@click.option("--crop", type=click.IntRange(min=14), default=112, show_default=True, callback=_crop,
              help="training crop in pixels (multiple of 14)")
@click.option("--curriculum/--no-curriculum", default=False, show_default=True,
              help="easy-to-hard sampling by nucleus density")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="token cache folder (default $OPTIMUS_CACHE_DIR or ~/.cache/cellvit-optimus/tokens)")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads")
@click.option("--max-minutes", type=_POSITIVE_FLOAT, default=None,
              help="stop after the epoch (--end-to-end: the step) that passes this")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="random seed")
@click.option("--end-to-end", "end_to_end", is_flag=True, default=False,
              help="train a small backbone (tiny/small preset) together with the head, step-based and "
              "resumable; the checkpoint carries the trained backbone")
@click.option("--steps", type=POSITIVE, default=1400, show_default=True, help="--end-to-end: optimiser steps")
@click.option("--val", "val_groups", multiple=True,
              help="--end-to-end: source-image groups kept out of training and scored every --eval-every steps")
@click.option("--negatives", "negative_slides", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="--end-to-end: slides whose glass/background crops are nucleus-free negatives "
              "(default: the bundled slide)")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, callback=writable_dir,
              help="--end-to-end: folder of the resumable training state (default: OUT + '.train')")
@click.option("--resume", is_flag=True, default=False, help="--end-to-end: continue the state in --work-dir")
@click.option("--checkpoint-every", type=POSITIVE, default=50, show_default=True,
              help="--end-to-end: save the training state every N steps")
@click.option("--eval-every", type=POSITIVE, default=250, show_default=True,
              help="--end-to-end: score the --val images every N steps")
@click.option("--decoder-channels", default="16,32,64,128", show_default=True, callback=_channels,
              help="UNETR widths c0,c1,c2,c3 (full, 1/2, 1/4, 1/8 resolution)")
@click.option("--out", type=click.Path(dir_okay=False), required=True, callback=writable_file,
              help="checkpoint (.safetensors)")
def train_nuclei_cmd(datasets, data_root, held_out, profile_name, source_mpp, nuclei_mpp, backbone,
                     backbone_weights, epochs, batch_size, lr, crop, curriculum, cache_dir, threads,
                     max_minutes, seed, end_to_end, steps, val_groups, negative_slides, work_dir, resume,
                     checkpoint_every, eval_every, decoder_channels, out):
    """Train a nuclei model: a UNETR head on a frozen backbone (token maps cached in HDF5), or with
    --end-to-end a small backbone and its head together."""
    from cellvit_optimus.engine.training.datasets import read_dataset, split_by_group
    from cellvit_optimus.engine.training.train import NucleiTrainConfig, train_nuclei

    channels = decoder_channels  # parsed by _channels
    if end_to_end and backbone_weights is not None:  # before any data is read
        raise click.UsageError("--end-to-end trains a randomly initialised small backbone; "
                               "--backbone-weights is for frozen-backbone training")
    try:
        profile = _profile(profile_name)
        samples = []
        for spec in datasets:
            samples += read_dataset(spec, profile=profile, root=data_root, mpp=source_mpp)
        train_s, test_s = split_by_group(samples, held_out)
        if end_to_end:
            return _train_e2e(train_s, test_s, profile, nuclei_mpp, backbone, backbone_weights, steps, batch_size,
                              lr, threads, max_minutes, seed, val_groups, negative_slides, work_dir, resume,
                              checkpoint_every, eval_every, channels, datasets, out)
        cfg = NucleiTrainConfig(nuclei_mpp=nuclei_mpp, backbone=backbone, backbone_weights=backbone_weights,
                                epochs=epochs, batch_size=batch_size, lr=lr, crop=crop, curriculum=curriculum,
                                cache_dir=cache_dir, threads=threads, max_minutes=max_minutes, seed=seed)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"{len(train_s)} training images, {len(test_s)} held out", err=True)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in click.get_current_context().params.items()}
    res = train_nuclei(train_s, out, cfg, profile=profile, val_samples=test_s,
                       progress=lambda rec: click.echo(json.dumps(_round(rec)), err=True),
                       extra_record={"datasets": list(datasets), "cli_params": params})
    click.echo(json.dumps({"checkpoint": str(res.checkpoint), "seconds": round(res.seconds, 1),
                           "train_tiles": res.n_train_tiles, "cache": str(res.cache_path),
                           "held_out": res.metrics}, indent=2))


def _train_e2e(train_s, test_s, profile, nuclei_mpp, backbone, backbone_weights, steps, batch_size, lr, threads,
               max_minutes, seed, val_groups, negative_slides, work_dir, resume, checkpoint_every, eval_every,
               channels, datasets, out) -> None:
    from cellvit_optimus.engine.training.datasets import split_by_group
    from cellvit_optimus.engine.training.train_e2e import E2ETrainConfig, background_crops, train_nuclei_e2e

    train_s, val_s = split_by_group(train_s, val_groups)
    cfg = E2ETrainConfig(nuclei_mpp=nuclei_mpp, backbone=backbone, decoder_channels=channels, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                         eval_every=eval_every, threads=threads, max_minutes=max_minutes)
    if not negative_slides:
        from cellvit_optimus.engine.data import DATA_DIR

        negative_slides = (str(DATA_DIR / "cmu_small_region.svs"),)
    negatives = background_crops(negative_slides, nuclei_mpp)
    click.echo(f"{len(train_s)} training images, {len(val_s)} validation, {len(test_s)} held out, "
               f"{len(negatives)} negative crops", err=True)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in click.get_current_context().params.items()}
    res = train_nuclei_e2e(train_s, work_dir or f"{out}.train", out, cfg, profile=profile, val_samples=val_s,
                           negatives=negatives, resume=resume,
                           progress=lambda rec: click.echo(json.dumps(rec), err=True),
                           extra_record={"datasets": list(datasets), "cli_params": params})
    metrics = None
    if res.finished and test_s:
        from cellvit_optimus.engine.pipeline import NucleiModel
        from cellvit_optimus.engine.training.scoring import evaluate

        metrics = evaluate(NucleiModel(res.checkpoint), test_s)
    click.echo(json.dumps({"checkpoint": str(res.checkpoint) if res.checkpoint else None,
                           "finished": res.finished, "step": res.step, "seconds": round(res.seconds, 1),
                           "held_out": metrics}, indent=2))
    if not res.finished:
        sys.exit(EXIT_PARTIAL)


@train.command("mil")
@click.argument("bags_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--epochs", type=POSITIVE, default=40, show_default=True, help="passes over the bags")
@click.option("--lr", type=_POSITIVE_FLOAT, default=2e-4, show_default=True, help="learning rate")
@click.option("--hidden-dim", type=POSITIVE, default=256, show_default=True, help="attention hidden width")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="random seed")
@click.option("--out", type=click.Path(dir_okay=False), required=True, callback=writable_file,
              help="checkpoint (.safetensors)")
def train_mil_cmd(bags_dir, labels_csv, epochs, lr, hidden_dim, seed, out):
    """Train a gated attention-MIL head on BAGS_DIR/*.h5 feature files with LABELS_CSV (slide,label)."""
    from cellvit_optimus.engine.training.train import train_mil

    try:
        res = train_mil(bags_dir, labels_csv, out, epochs=epochs, lr=lr, hidden_dim=hidden_dim, seed=seed)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps({"checkpoint": str(res.checkpoint), "classes": list(res.classes), "bags": res.n_bags,
                           "train_accuracy": round(res.train_accuracy, 4)}, indent=2))


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--mpp", type=MPP, required=True, help="microns per pixel of the images")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=writable_dir, required=True,
              help="output folder")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="nuclei checkpoint (default: the bundled model)")
@click.option("--backbone-weights", default=None, callback=existing_file,
              help="weights of the backbone the nuclei head was trained on (file or hf-hub[:repo])")
@click.option("--overlap", type=NON_NEGATIVE, default=64, show_default=True,
              help="pixels two neighbouring tiles share, at the nuclei resolution")
@click.option("--device", **DEVICE)
@click.option("--head-dtype", **HEAD_DTYPE)
def segment(images, mpp, out_dir, model_path, backbone_weights, overlap, device, head_dtype):
    """Segment and classify nuclei in plain IMAGES (PNG/JPEG/TIFF, any size).

    Writes <stem>_instances.npy (int32 ids), <stem>_types.npy (class ids) and <stem>_cells.geojson
    (QuPath detections) per image into OUT; a stem two inputs share gets a tag of each one's path.
    """
    missing = [name for name in images if not Path(name).is_file()]
    if len(missing) == len(images):  # nothing to do: fail now, not after loading the model
        raise click.BadParameter(f"{', '.join(missing)}: no such file", param_hint="IMAGES")
    from cellvit_optimus.engine.geojson import cells_to_geojson, write_geojson
    from cellvit_optimus.engine.io import atomic_path, output_names
    from cellvit_optimus.engine.pipeline import NucleiModel, segment_image
    from cellvit_optimus.engine.training.datasets import read_image

    try:
        model = NucleiModel(model_path, backbone_weights=backbone_weights, device=resolve_device(device),
                            head_dtype=head_dtype)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = bad = 0
    # triage's rule: a stem two inputs share gets each one's path tag, so neither overwrites the other
    stems = output_names([Path(n) for n in images])
    for name in images:
        p = Path(name)
        stem = stems[str(p)]
        try:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: not found")
            img = read_image(p)
            res = segment_image(img, mpp, model, overlap=overlap)
            for suffix, arr in (("instances", res.inst_map), ("types", res.type_map)):
                with atomic_path(out / f"{stem}_{suffix}.npy") as tmp:
                    with open(tmp, "wb") as fh:
                        import numpy as np

                        np.save(fh, arr)
            write_geojson(out / f"{stem}_cells.geojson",
                          cells_to_geojson(res.table, res.profile, extra_properties=None, mpp=mpp))
            shown = f"{p.name} -> {stem}" if stem != p.stem else p.name
            click.echo(f"{shown}: {len(res.table)} nuclei, {res.tiles} tiles, {res.seconds:.1f} s", err=True)
            ok += 1
        except (OptimusError, OSError, ValueError) as exc:
            click.echo(f"{p}: failed ({exc})", err=True)
            bad += 1
    sys.exit(EXIT_OK if bad == 0 else (EXIT_PARTIAL if ok else EXIT_FAILED))


def _profile(name: str | None):
    if name is None:
        return None
    from cellvit_optimus.heads.profiles import BUILTIN_PROFILES, ClassProfile, get_profile

    if name in BUILTIN_PROFILES:
        return get_profile(name)
    return ClassProfile.load(name)


def _round(rec: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}


# the names the wing exports (engine/training/__init__.py): a package attribute called ``train`` would be
# replaced by the submodule ``training.train`` as soon as anything imports that module
train_command = train
segment_command = segment
