"""The ``cellvit-optimus`` command line: maps flags onto the engine's configuration objects.

Exit codes (all commands): 0 every input succeeded, 1 some inputs failed (partial), 2 every input
failed or the command was used wrongly. Progress output and colour live here only; the library
stays silent.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from pathlib import Path

import click

from cellvit_optimus.engine.cli_params import (
    DEVICE,
    HEAD_DTYPE,
    MIL_FORMAT,
    MPP,
    NON_NEGATIVE,
    NUCLEI_FORMAT,
    POSITIVE,
    SLIDE_SUFFIXES,
    checkpoint_file,
    existing_file,
    resolve_device,
    thresholds_file,
    validate_device,
    writable_dir,
)
from cellvit_optimus.engine.errors import OptimusError
from cellvit_optimus.engine.settings import (FORWARD_BATCH, MIN_TISSUE_FRACTION, READER_THREADS,
                                             TRIAGE_OVERLAP_PX, TRIAGE_READ_CHUNK)
from cellvit_optimus.engine.wsi import NATIVE_NOISE, collect_inputs

__all__ = ("main", "cli", "EXIT_OK", "EXIT_PARTIAL", "EXIT_FAILED", "EXIT_INTERRUPTED", "MPP", "DEVICE",
           "validate_device", "collect_inputs")

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2
#: Ctrl-C (128 + SIGINT, what shells report for a process the signal ended)
EXIT_INTERRUPTED = 130


def _exit_code(n_ok: int, n_failed: int) -> int:
    if n_failed == 0:
        return EXIT_OK
    return EXIT_PARTIAL if n_ok else EXIT_FAILED


# -- argument types ---------------------------------------------------------------------------------
# Every flag is checked by click before the command body runs, so a bad value fails in well under a
# second (no model load, no Numba warm-up) with the flag's own name, exit code 2 and one line.

#: a tiling resolution in microns per pixel (the tiling accepts 0.01..50)
_TARGET_MPP = click.FloatRange(0.01, 50)
_FRACTION = click.FloatRange(0.0, 1.0)
#: readpath.DECODERS, repeated so that parsing the command line imports no numpy (a test keeps them equal)
_DECODERS = ("auto", "slide", "dali", "cucim", "nvjpeg", "reference")


def _outputs(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    # the names are repeated from triage.OUTPUTS so that checking them does not import the engine
    known = ("features", "cells", "regions", "thumbnail", "summary")
    got = tuple(o.strip() for o in value.split(",") if o.strip())
    unknown = [o for o in got if o not in known]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} unknown; choose from {', '.join(known)}", ctx=ctx,
                                 param=param)
    if "summary" not in got:
        raise click.BadParameter("must include 'summary' (it marks a finished slide)", ctx=ctx, param=param)
    return got


class _Overlap(click.ParamType):
    """tile overlap in pixels at the tile resolution; a value below 1 is read as the former fraction of
    a tile (inspect/extract took a fraction before; triage and segment always took pixels)"""

    name = "PIXELS"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            v = float(value)
        else:
            try:
                v = float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number of pixels", param, ctx)
        if v < 0 or (v >= 1 and not v.is_integer()):
            self.fail(f"{value} is not a whole number of pixels >= 0 (or a fraction of a tile below 1)",
                      param, ctx)
        return v


_OVERLAP_HELP = "pixels two neighbouring tiles share, at the tile resolution (a value < 1: fraction of a tile)"


def _overlap_fraction(overlap: float, tile_size: int) -> float:
    """the tiling's overlap fraction from ``--overlap``"""
    fraction = overlap if overlap < 1 else overlap / tile_size
    if fraction >= 0.9:
        given = f"{overlap:g} of a tile" if overlap < 1 else f"{overlap:g} px of a {tile_size} px tile"
        raise click.BadParameter(f"{given} leaves less than 10 % of it unshared; use less than "
                                 f"{int(0.9 * tile_size)} px", param_hint="'--overlap'")
    return fraction


# -- inputs -------------------------------------------------------------------------------------------

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _not_a_slide(path: Path) -> str | None:
    """why a file given by name is surely not a slide (a suffix no reader takes, and neither a TIFF nor a
    DICOM header), or None: anything else is left to the slide readers, in the batch"""
    if path.suffix.lower() in SLIDE_SUFFIXES or not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head[:4] in _TIFF_MAGICS or head[128:132] == b"DICM":
        return None
    return f"not a slide file type ({path.suffix or 'no suffix'}; no TIFF or DICOM header)"



def _inputs(slides: tuple[str, ...], recursive: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """the slides to run (default: the bundled one) and the skipped folder entries; fails as a usage
    error, before any model is loaded, when nothing given exists or no folder holds a slide"""
    if not slides:
        from cellvit_optimus.engine.data import bundled_slide

        return [bundled_slide()], []
    paths, skipped, missing = collect_inputs(slides, recursive)
    if missing and len(missing) == len(paths):
        raise click.BadParameter(f"{', '.join(missing)}: no such file or folder", param_hint="SLIDES")
    wrong = {str(p): why for p in paths if (why := _not_a_slide(p)) is not None}
    if wrong and len(wrong) + len(missing) == len(paths):  # nothing to run: say so now, not after the model
        why_each = [f"{p}: {w}" for p, w in wrong.items()] + [f"{p}: no such file or folder" for p in missing]
        raise click.BadParameter("; ".join(why_each), param_hint="SLIDES")
    if not paths:
        why = f" (skipped {len(skipped)}: {'; '.join(f'{p}: {w}' for p, w in skipped[:3])})" if skipped else ""
        raise click.BadParameter(f"no slides found in {', '.join(slides)}{why}", param_hint="SLIDES")
    return paths, skipped


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cellvit-optimus")
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
def cli(verbose: int) -> None:
    """CellViT-Optimus: streaming whole-slide H&E triage."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def _tiling_options(f):
    f = click.option("--mpp", type=MPP, default=None,
                     help="level-0 microns per pixel, overriding or replacing the slide's metadata")(f)
    f = click.option("--target-mpp", type=_TARGET_MPP, default=0.5, show_default=True,
                     help="resolution of the tiles (um/px)")(f)
    f = click.option("--tile-size", type=click.IntRange(min=16), default=224, show_default=True,
                     help="tile side in pixels")(f)
    f = click.option("--overlap", type=_Overlap(), default=0, show_default=True, help=_OVERLAP_HELP)(f)
    f = click.option("--min-tissue", type=_FRACTION, default=MIN_TISSUE_FRACTION, show_default=True,
                     help="minimum tissue fraction of a kept tile (0..1)")(f)
    f = click.option("--backend", type=click.Choice(_BACKENDS), default="auto", show_default=True,
                     help=_BACKEND_HELP)(f)
    f = click.option("-r", "--recursive", is_flag=True, help="search folders given as SLIDES recursively")(f)
    return f


_BACKENDS = ("auto", "cucim", "tiffslide", "dicom", "openslide")
_BACKEND_HELP = ("slide reader: auto (DICOM files: the DICOM reader, then OpenSlide; others: cuCIM, then "
                 "tiffslide, then OpenSlide), or force one")


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@_tiling_options
@click.option("--thumbnails", "thumbnail_dir", type=click.Path(file_okay=False), default=None, callback=writable_dir,
              help="write a PNG per slide with the tissue mask and the tile grid drawn on it")
@click.option("--json", "as_json", is_flag=True, help="print the facts as JSON instead of a table")
def inspect(slides, mpp, target_mpp, tile_size, overlap, min_tissue, backend, recursive, thumbnail_dir, as_json):
    """Describe SLIDES (files or folders; default: the bundled real slide) and count tissue tiles.

    The tile count is for the tiling given here (default 224 px at 0.5 um/px, no overlap, as extract);
    triage tiles at its nuclei model's resolution with 64 px overlap, so it counts more tiles.
    """
    overlap = _overlap_fraction(overlap, tile_size)
    paths, skipped = _inputs(slides, recursive)
    from cellvit_optimus.engine.wsi import Failure, TilingConfig, inspect_many

    try:
        tiling = TilingConfig(tile_size=tile_size, target_mpp=target_mpp, overlap=overlap,
                              min_tissue_fraction=min_tissue)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    results = list(inspect_many(paths, mpp=mpp, backend=backend, tiling=tiling,
                                thumbnail_dir=thumbnail_dir))
    ok = [r for r in results if not isinstance(r, Failure)]
    bad = [r for r in results if isinstance(r, Failure)]
    if as_json:
        click.echo(json.dumps({"slides": [r.to_dict() for r in ok], "failures": [f.to_dict() for f in bad],
                               "skipped": [{"path": p, "reason": why} for p, why in skipped]}, indent=2))
    else:
        _print_table(ok, bad, target_mpp)
        _print_skipped(skipped)
    sys.exit(_exit_code(len(ok), len(bad)))


def _print_table(ok, bad, target_mpp: float) -> None:
    from cellvit_optimus.engine.io import escape_path  # a file name need not be UTF-8; stdout must be

    head = ("slide", "backend", "vendor", "dimensions", "levels", "mpp", f"tiles@{target_mpp:g}")
    rows = []
    for r in ok:
        mpp = f"{r.mpp[0]:.3f}" + ("*" if r.mpp_source == "override" else "") if r.mpp else "-"
        rows.append((escape_path(Path(r.path).name), r.backend, r.vendor or "-",
                     f"{r.dimensions[0]}x{r.dimensions[1]}", str(r.level_count), mpp, str(r.tissue_tiles)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo(fmt.format(*head))
    for row in rows:
        click.echo(fmt.format(*row))
    for r in ok:
        if r.thumbnail_path:
            click.echo(f"thumbnail: {r.thumbnail_path}")
    if any(r.mpp_source == "override" for r in ok):
        click.echo("* MPP given with --mpp")
    for f in bad:
        click.echo(f"FAILED {f.message}", err=True)


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for p, why in skipped:
        click.echo(f"skipped {p}: {why}", err=True)


_TRIDENT_HELP = ("also make OUT a Trident coordinates folder: OUT/features_<encoder>/<slide>.h5 and "
                 "OUT/patches/<slide>_patches.h5 (Trident: job_dir = OUT's parent, coords_dir = OUT's name)")
_DECODER_HELP = ("tile read path: auto (GPU JPEG decode when the backbone is on CUDA and it measures faster), "
                 "slide (host reader), dali, cucim, nvjpeg (that GPU decoder; nvjpeg is torchvision's), "
                 "reference (host decoder, GPU-path logic)")


def _backbone_options(f):
    f = click.option("--backbone", default="hoptimus0", show_default=True,
                     help="backbone preset: hoptimus0, small, tiny")(f)
    f = click.option("--weights", default=None, callback=existing_file,
                     help="weights file (.safetensors / .pt), or hf-hub[:repo] for the local Hugging Face "
                          "cache (never downloads); default: hf-hub for hoptimus0, random init for test presets")(f)
    f = click.option("--device", **DEVICE)(f)
    f = click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
                     help="compute precision (default: fp16 on CUDA, fp32 on CPU)")(f)
    f = click.option("--batch-size", type=POSITIVE, default=None,
                     help="tiles per backbone call (default: fitted)")(f)
    f = click.option("--vram-gb", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True,
                     help="GPU memory budget the batch size is fitted to")(f)
    f = click.option("--workers", type=POSITIVE, default=READER_THREADS, show_default=True,
                     help="slide reader threads")(f)
    f = click.option("--decoder", type=click.Choice(_DECODERS), default="auto", show_default=True,
                     help=_DECODER_HELP)(f)
    f = click.option("-q", "--quiet", is_flag=True, help="no progress bars")(f)
    return f


_device = resolve_device


def _make_runner(backbone, weights, device, dtype, batch_size, vram_gb, tokens=False):
    from cellvit_optimus.engine.pipeline import BackboneRunner

    if weights is None and backbone == "hoptimus0":
        weights = "hf-hub"
    return BackboneRunner(backbone, weights=weights, device=_device(device), dtype=dtype,
                          batch_size=batch_size, vram_budget_gb=vram_gb, tokens=tokens)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class _Bars:
    """tqdm bars for the CLI (slides and tiles, with tiles/s and ETA) and, also with ``-q``, one plan line
    per slide (its tiles, and the ETA of the tiles planned so far) and one rate line once the first
    batches ran, so that a long run is never silent"""

    def __init__(self, quiet: bool, n_slides: int) -> None:
        self.quiet = quiet
        self.planned = 0  # tiles of the slides announced so far
        self.rate_said = False
        if quiet:
            return
        from tqdm import tqdm

        self.slides = tqdm(total=n_slides, unit="slide", position=0, desc="slides")
        self.tiles = tqdm(total=0, unit="tile", position=1, desc="tiles", smoothing=0.1)

    def say(self, text: str) -> None:
        if self.quiet:
            click.echo(text, err=True)
        else:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def _eta(self, p) -> str:
        left = p.tiles_total - p.tiles_done
        return f"ETA {_duration(left / p.tiles_per_s)} for {left} tiles at {p.tiles_per_s:.2g} tiles/s"

    def __call__(self, p) -> None:
        if p.tiles_total > self.planned:
            n, self.planned = p.tiles_total - self.planned, p.tiles_total
            known = p.tiles_done > 0 and p.tiles_per_s > 0
            eta = self._eta(p) if known else "ETA after the first tiles"
            self.say(f"plan: {p.current}: {n} tiles; {eta}")
        elif not self.rate_said and p.tiles_done > 0 and p.tiles_per_s > 0 and p.tiles_done < p.tiles_total:
            self.rate_said = True
            self.say(f"rate: {self._eta(p)}")
        if self.quiet:
            return
        if p.tiles_total != self.tiles.total:
            self.tiles.total = p.tiles_total
        self.tiles.n = p.tiles_done
        self.tiles.set_postfix_str(p.current or "", refresh=False)
        self.tiles.refresh()
        self.slides.n = p.slides_done
        self.slides.refresh()

    def close(self) -> None:
        if not self.quiet:
            self.tiles.close()
            self.slides.close()
            self.quiet = True  # closing twice (Ctrl-C, then finally) is harmless


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=writable_dir, required=True,
              help="output folder")
@_tiling_options
@_backbone_options
@click.option("--clam-layout", is_flag=True,
              help="also make OUT a CLAM feature folder: OUT/h5_files (link to features/) and OUT/pt_files/*.pt")
@click.option("--trident-layout", is_flag=True, help=_TRIDENT_HELP)
def extract(slides, out_dir, mpp, target_mpp, tile_size, overlap, min_tissue, backend, recursive, backbone,
            weights, device, dtype, batch_size, vram_gb, workers, decoder, quiet, clam_layout,
            trident_layout):
    """Tile embeddings of SLIDES into OUT/features/<slide>.h5 (CLAM/Trident layout; a versioned cache)."""
    overlap = _overlap_fraction(overlap, tile_size)
    paths, skipped = _inputs(slides, recursive)
    from cellvit_optimus.engine.pipeline import ExtractConfig, extract_features
    from cellvit_optimus.engine.wsi import Failure
    from cellvit_optimus.engine.pipeline import SchedulerConfig
    from cellvit_optimus.engine.wsi import TilingConfig

    try:
        config = ExtractConfig(
            tiling=TilingConfig(tile_size=tile_size, target_mpp=target_mpp, overlap=overlap,
                                min_tissue_fraction=min_tissue),
            scheduler=SchedulerConfig(reader_threads=workers), mpp=mpp, backend=backend, decoder=decoder)
        runner = _make_runner(backbone, weights, device, dtype, batch_size, vram_gb)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    bars = _Bars(quiet, len(paths))
    try:
        results = extract_features(paths, out_dir, runner, config, progress=bars)
    except OptimusError as exc:  # the output folder is locked or unwritable: the whole batch stops, named
        _batch_failed(exc)
    finally:
        bars.close()
    from cellvit_optimus.engine.io import escape_path  # a file name need not be UTF-8; stdout must be

    ok = [r for r in results if not isinstance(r, Failure)]
    bad = [r for r in results if isinstance(r, Failure)]
    for r in ok:
        click.echo(f"{'cached' if r.cached else 'done  '} {escape_path(r.path)}: {r.tiles} tiles -> "
                   f"{escape_path(str(r.consumer_facts.get('features') or ''))}")
    for f in bad:
        click.echo(f"FAILED {f.message}", err=True)
    if clam_layout and ok:
        from cellvit_optimus.engine.pipeline import write_clam_layout

        try:
            write_clam_layout(out_dir)
        except OptimusError as exc:
            raise click.UsageError(str(exc)) from exc
        click.echo(f"CLAM layout: {Path(out_dir) / 'h5_files'}, {Path(out_dir) / 'pt_files'}")
    if trident_layout and ok:
        _trident_layout(out_dir)
    _print_skipped(skipped)
    sys.exit(_exit_code(len(ok), len(bad)))


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=writable_dir, default="out",
              show_default=True, help="output folder")
@click.option("--mpp", type=MPP, default=None,
              help="level-0 microns per pixel, overriding or replacing the slide's metadata")
@click.option("--nuclei-mpp", type=_TARGET_MPP, default=None,
              help="resolution of the nuclei path in um/px (default: the nuclei model's)")
@click.option("--overlap", "overlap_px", type=NON_NEGATIVE, default=TRIAGE_OVERLAP_PX, show_default=True,
              help="pixels two neighbouring tiles share, at the nuclei resolution")
@click.option("--min-tissue", type=_FRACTION, default=MIN_TISSUE_FRACTION, show_default=True,
              help="minimum tissue fraction of a kept tile (0..1)")
@click.option("--backend", type=click.Choice(_BACKENDS), default="auto", show_default=True, help=_BACKEND_HELP)
@click.option("-r", "--recursive", is_flag=True, help="search folders given as SLIDES recursively")
@click.option("--nuclei-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              callback=checkpoint_file(NUCLEI_FORMAT, "nuclei"),
              help="nuclei checkpoint (default: the bundled model)")
@click.option("--backbone-weights", default=None, callback=existing_file,
              help="weights of the backbone the nuclei head was trained on (file or hf-hub[:repo])")
@click.option("--mil-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              callback=checkpoint_file(MIL_FORMAT, "MIL"),
              help="attention-MIL checkpoint for the slide score")
@click.option("--thresholds", default=None, type=click.Path(exists=True, dir_okay=False),
              callback=thresholds_file,
              help="trust-tag thresholds JSON")
@click.option("--ood-state", default=None, type=click.Path(exists=True, dir_okay=False),
              help="OOD reference state (.npz)")
@click.option("--shadow-slides", type=NON_NEGATIVE, default=30, show_default=True,
              help="cold start: a site's first N slides are never cleared from review (0: off)")
@click.option("--site-id", default="default", show_default=True,
              help="site name for the shadow-mode counter (kept in OUT/site_state.json)")
@click.option("--outputs", default=",".join(("features", "cells", "regions", "thumbnail", "summary")),
              show_default=True, callback=_outputs, help="what to write (comma-separated; summary is required)")
@click.option("--device", **DEVICE)
@click.option("--batch-size", type=POSITIVE, default=None,
              help=f"forward micro-batch: tiles per backbone call [default: {FORWARD_BATCH['cpu']} on the "
                   f"CPU, {FORWARD_BATCH['cuda']} on a GPU]")
@click.option("--read-chunk", type=POSITIVE, default=None,
              help=f"read chunk: tiles a reader hands on at once [default: --batch-size when given, else "
                   f"{TRIAGE_READ_CHUNK}]")
@click.option("--workers", type=POSITIVE, default=READER_THREADS, show_default=True,
              help="slide reader threads")
@click.option("--decoder", type=click.Choice(_DECODERS), default="auto", show_default=True, help=_DECODER_HELP)
@click.option("-q", "--quiet", is_flag=True, help="no progress bars (services, logs)")
@click.option("--gzip", "gzip_cells", is_flag=True,
              help="write cells.geojson.gz (gzip; QuPath >= 0.4 imports it as it is)")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="distribute slides over a Ray cluster (no value: start/attach locally; 'auto'; "
                   "'ray://head:10001')")
@click.option("--ray-actors", type=POSITIVE, default=None,
              help="Ray actors (default: one per GPU, or per CPU group)")
@click.option("--ray-cpus-per-actor", type=POSITIVE, default=1, show_default=True,
              help="CPUs per CPU-only actor")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=None,
              help="seconds to wait when another run is writing to OUT (default: wait until it ends; 0: fail at once)")
@click.option("--trident-layout", is_flag=True, help=_TRIDENT_HELP)
@click.option("--head-dtype", **HEAD_DTYPE)
def triage(slides, out_dir, mpp, nuclei_mpp, overlap_px, min_tissue, backend, recursive, nuclei_weights,
           backbone_weights, mil_weights, thresholds, ood_state, shadow_slides, site_id, outputs, device, batch_size,
           read_chunk, workers, decoder, quiet, gzip_cells, ray_address, ray_actors, ray_cpus_per_actor,
           lock_timeout, trident_layout, head_dtype):
    """Triage SLIDES (files or folders; default: the bundled real slide) into a ranked worklist.

    Writes per slide OUT/<slide>/{cells.geojson[.gz], regions.geojson, overview.png, summary.json} and
    OUT/features/<slide>.h5, and per batch OUT/worklist.{csv,json} (failed inputs and skipped folder
    entries listed with their reasons). Exit code: 0 complete, 1 partial (some slides failed; see the
    worklist), 2 failed or a bad argument.
    """
    if not site_id.strip():
        raise click.BadParameter("must not be empty", param_hint="'--site-id'")
    paths, skipped = _inputs(slides, recursive)  # before any model is loaded: a bad path fails at once
    from cellvit_optimus.engine.pipeline import SchedulerConfig
    from cellvit_optimus.engine.triage import Engine, TriageConfig
    from cellvit_optimus.safety.config import SafetyConfig

    try:
        safety = SafetyConfig(thresholds_path=thresholds, ood_state_path=ood_state, shadow_slides=shadow_slides,
                              site_id=site_id)
        chunk = read_chunk or batch_size or TRIAGE_READ_CHUNK  # a chunk at least one forward batch long
        sched = SchedulerConfig(batch_tiles=chunk, reader_threads=workers)
        config = TriageConfig(scheduler=sched, mpp=mpp, backend=backend, decoder=decoder, nuclei_mpp=nuclei_mpp,
                              overlap_px=overlap_px, min_tissue_fraction=min_tissue, outputs=outputs, safety=safety,
                              gzip_cells=gzip_cells, lock_timeout_s=lock_timeout)
        weights = dict(nuclei_weights=nuclei_weights, backbone_weights=backbone_weights, mil_weights=mil_weights,
                       device=device, batch_size=batch_size, head_dtype=head_dtype)
        if ray_address is None:
            from cellvit_optimus.kernels import kernels_cached

            if kernels_cached() is False:  # else minutes of silence before the first progress line
                click.echo("compiling the nuclei kernels (once per install; minutes on a small CPU)",
                           err=True)
            engine = Engine(config, **weights)
        else:
            from cellvit_optimus.engine.triage import ClusterConfig, RayTriage

            engine = RayTriage(config, cluster=ClusterConfig(address=ray_address or None, num_actors=ray_actors,
                                                             cpus_per_actor=ray_cpus_per_actor), **weights)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    bars = _Bars(quiet, len(paths))
    try:
        if ray_address is None:
            batch = engine.run(paths, out_dir, progress=bars, skipped=skipped)
        else:
            with engine:
                batch = engine.run(paths, out_dir, progress=bars, skipped=skipped)
    except OptimusError as exc:  # the output folder is locked or unwritable (disk full): named, clean exit
        _batch_failed(exc)
    except KeyboardInterrupt:  # Ctrl-C: the engine wrote the worklist of what finished before re-raising
        bars.close()
        _interrupted(Path(out_dir) / "worklist.csv")
    finally:
        bars.close()
    for r in batch.results:
        click.echo(f"{'cached' if r.cached else 'done  '} {r.name}: {r.tag} (priority {r.priority:.3f}, "
                   f"{r.nuclei} nuclei in {r.tiles} tiles) -> {Path(out_dir) / r.name}")
    for f in batch.failures:
        click.echo(f"FAILED {f.message}", err=True)
    if trident_layout and batch.results and "features" in outputs:
        _trident_layout(out_dir)
    _print_skipped(skipped)
    click.echo(f"worklist: {batch.worklist_csv} ({batch.status})")
    sys.exit(_exit_code(len(batch.results), len(batch.failures)))


def _interrupted(worklist: Path | None = None) -> None:
    """Ctrl-C: say what was kept, exit 130 (128 + SIGINT, as shells report it; 1 means a partial batch)"""
    if worklist is not None and worklist.is_file():
        click.echo(f"\ninterrupted: {worklist} lists the slides that finished; a rerun resumes the rest",
                   err=True)
    else:
        click.echo("\ninterrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _trident_layout(out_dir: str) -> None:
    from cellvit_optimus.engine.pipeline import write_trident_layout

    try:
        written = write_trident_layout(out_dir)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    folders = sorted({str(p.parent) for p in written})
    click.echo(f"Trident layout: {', '.join(folders) or 'up to date'}, {Path(out_dir) / 'patches'}")


def _batch_failed(exc: OptimusError) -> None:
    """a whole batch stopped by a named error (output folder locked, disk full): say so, exit 2"""
    click.echo(f"FAILED {exc}", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.exit(EXIT_FAILED)


def _register_model_commands() -> None:
    from cellvit_optimus.engine.training import segment_command as segment, train_command as train

    cli.add_command(train)
    cli.add_command(segment)


_register_model_commands()


def _register_doctor() -> None:
    from cellvit_optimus.engine.doctor import doctor_command

    cli.add_command(doctor_command())


_register_doctor()




def _route_native_output() -> None:
    """Keep native libraries' printing out of our output: Python's ``sys.stdout`` / ``sys.stderr`` keep the
    real standard output and error, while what C code writes to file descriptors 1 and 2 goes through a
    pipe whose reader drops :data:`NATIVE_NOISE` (logged at debug level) and passes the rest to stderr.

    With CUDA 13 libraries installed but no GPU, cuCIM's cuFile start-up prints "dlopen error libcuda.so.1
    ... cuFile initialization failed" on every run (seen on the CPU CI with torch 2.14.1+cu130), and on
    stdout it lands in the JSON and result lines that scripts read. Only for a real process: under a test
    runner's captured streams (no file descriptors) nothing changes.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return
    if fds != (1, 2):
        return
    real_out, real_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stdout = os.fdopen(real_out, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    sys.stderr = os.fdopen(real_err, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if NATIVE_NOISE.search(line):
                    text = line.decode(errors="replace").strip()
                    logging.getLogger(__name__).debug("native output: %s", text)
                else:
                    os.write(real_err, line)

    reader = threading.Thread(target=forward, name="cellvit-optimus-native-output", daemon=True)
    reader.start()

    def close() -> None:  # the pipe's last write ends are fds 1 and 2: point them back, let the reader drain
        os.dup2(real_err, 1)
        os.dup2(real_err, 2)
        reader.join(timeout=2)

    atexit.register(close)


def main(argv: list[str] | None = None) -> None:
    """console-script entry point"""
    _route_native_output()
    try:  # not click's standalone mode, which ends Ctrl-C with "Aborted!" and exit 1, the partial-batch code
        rv = cli.main(args=argv, prog_name="cellvit-optimus", standalone_mode=False)
    except click.Abort:  # Ctrl-C outside a batch (click turns KeyboardInterrupt into Abort)
        _interrupted()
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # the reader of our output went away (`... | head`): as click's standalone mode
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  nothing left to flush to at exit
        sys.exit(EXIT_PARTIAL)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
