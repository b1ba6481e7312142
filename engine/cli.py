"""The ``cellvit-optimus`` command line: maps flags onto the engine's configuration objects.

Exit codes (all commands): 0 every input succeeded, 1 some inputs failed (partial), 2 every input
failed or the command was used wrongly. Progress output and colour live here only; the library
stays silent.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .errors import OptimusError
from .extract import DECODERS as _DECODERS

__all__ = ("main", "cli", "EXIT_OK", "EXIT_PARTIAL", "EXIT_FAILED")

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def _exit_code(n_ok: int, n_failed: int) -> int:
    if n_failed == 0:
        return EXIT_OK
    return EXIT_PARTIAL if n_ok else EXIT_FAILED


def _inputs(slides: tuple[str, ...]) -> list[Path]:
    from .data import bundled_slide
    from .slide import iter_slide_paths

    if not slides:
        return [bundled_slide()]
    return list(iter_slide_paths(slides))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cellvit-optimus")
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
def cli(verbose: int) -> None:
    """CellViT-Optimus: streaming whole-slide H&E triage."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def _tiling_options(f):
    f = click.option("--mpp", type=float, default=None,
                     help="level-0 microns per pixel, overriding or replacing the slide's metadata")(f)
    f = click.option("--target-mpp", type=float, default=0.5, show_default=True,
                     help="resolution of the tiles (um/px)")(f)
    f = click.option("--tile-size", type=int, default=224, show_default=True, help="tile side in pixels")(f)
    f = click.option("--overlap", type=float, default=0.0, show_default=True,
                     help="fraction of a tile shared with its neighbour")(f)
    f = click.option("--min-tissue", type=float, default=0.25, show_default=True,
                     help="minimum tissue fraction of a kept tile")(f)
    f = click.option("--backend", type=click.Choice(["auto", "cucim", "tiffslide", "dicom", "openslide"]),
                     default="auto", show_default=True, help="slide reader")(f)
    return f


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@_tiling_options
@click.option("--thumbnails", "thumbnail_dir", type=click.Path(file_okay=False), default=None,
              help="write a PNG per slide with the tissue mask and the tile grid drawn on it")
@click.option("--json", "as_json", is_flag=True, help="print the facts as JSON instead of a table")
def inspect(slides, mpp, target_mpp, tile_size, overlap, min_tissue, backend, thumbnail_dir, as_json):
    """Describe SLIDES (files or folders; default: the bundled real slide) and count tissue tiles."""
    from .inspect import Failure, inspect_many
    from .tissue import TilingConfig

    try:
        tiling = TilingConfig(tile_size=tile_size, target_mpp=target_mpp, overlap=overlap,
                              min_tissue_fraction=min_tissue)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    paths = _inputs(slides)
    if not paths:
        raise click.UsageError("no slides found in the given inputs")
    results = list(inspect_many(paths, mpp=mpp, backend=backend, tiling=tiling,
                                thumbnail_dir=thumbnail_dir))
    ok = [r for r in results if not isinstance(r, Failure)]
    bad = [r for r in results if isinstance(r, Failure)]
    if as_json:
        click.echo(json.dumps({"slides": [r.to_dict() for r in ok], "failures": [f.to_dict() for f in bad]},
                              indent=2))
    else:
        _print_table(ok, bad, target_mpp)
    sys.exit(_exit_code(len(ok), len(bad)))


def _print_table(ok, bad, target_mpp: float) -> None:
    head = ("slide", "backend", "vendor", "dimensions", "levels", "mpp", f"tiles@{target_mpp:g}")
    rows = []
    for r in ok:
        mpp = f"{r.mpp[0]:.3f}" + ("*" if r.mpp_source == "override" else "") if r.mpp else "-"
        rows.append((Path(r.path).name, r.backend, r.vendor or "-", f"{r.dimensions[0]}x{r.dimensions[1]}",
                     str(r.level_count), mpp, str(r.tissue_tiles)))
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


_DECODER_HELP = ("tile read path: auto (GPU JPEG decode when the backbone is on CUDA and it measures faster), "
                 "slide (host reader), dali, cucim (that GPU decoder), reference (host decoder, GPU-path logic)")


def _backbone_options(f):
    f = click.option("--backbone", default="hoptimus0", show_default=True,
                     help="backbone preset: hoptimus0, small, tiny")(f)
    f = click.option("--weights", default=None,
                     help="weights file (.safetensors / .pt), or hf-hub[:repo] for the local Hugging Face "
                          "cache (never downloads); default: hf-hub for hoptimus0, random init for test presets")(f)
    f = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")(f)
    f = click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
                     help="compute precision (default: fp16 on CUDA, fp32 on CPU)")(f)
    f = click.option("--batch-size", type=int, default=None, help="tiles per backbone call (default: fitted)")(f)
    f = click.option("--vram-gb", type=float, default=12.0, show_default=True,
                     help="GPU memory budget the batch size is fitted to")(f)
    f = click.option("--workers", type=int, default=2, show_default=True, help="slide reader threads")(f)
    f = click.option("--decoder", type=click.Choice(_DECODERS), default="auto", show_default=True,
                     help=_DECODER_HELP)(f)
    f = click.option("-q", "--quiet", is_flag=True, help="no progress bars")(f)
    return f


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_runner(backbone, weights, device, dtype, batch_size, vram_gb, tokens=False):
    from .runner import BackboneRunner

    if weights is None and backbone == "hoptimus0":
        weights = "hf-hub"
    return BackboneRunner(backbone, weights=weights, device=_device(device), dtype=dtype,
                          batch_size=batch_size, vram_budget_gb=vram_gb, tokens=tokens)


class _Bars:
    """tqdm bars for the CLI: slides and tiles, with tiles/s and ETA"""

    def __init__(self, quiet: bool, n_slides: int) -> None:
        self.quiet = quiet
        if quiet:
            return
        from tqdm import tqdm

        self.slides = tqdm(total=n_slides, unit="slide", position=0, desc="slides")
        self.tiles = tqdm(total=0, unit="tile", position=1, desc="tiles", smoothing=0.1)

    def __call__(self, p) -> None:
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


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="output folder")
@_tiling_options
@_backbone_options
@click.option("--clam-layout", is_flag=True,
              help="also make OUT a CLAM feature folder: OUT/h5_files (link to features/) and OUT/pt_files/*.pt")
def extract(slides, out_dir, mpp, target_mpp, tile_size, overlap, min_tissue, backend, backbone, weights,
            device, dtype, batch_size, vram_gb, workers, decoder, quiet, clam_layout):
    """Tile embeddings of SLIDES into OUT/features/<slide>.h5 (CLAM/Trident layout; a versioned cache)."""
    from .extract import ExtractConfig, extract_features
    from .inspect import Failure
    from .scheduler import SchedulerConfig
    from .tissue import TilingConfig

    try:
        config = ExtractConfig(
            tiling=TilingConfig(tile_size=tile_size, target_mpp=target_mpp, overlap=overlap,
                                min_tissue_fraction=min_tissue),
            scheduler=SchedulerConfig(reader_threads=workers), mpp=mpp, backend=backend, decoder=decoder)
        runner = _make_runner(backbone, weights, device, dtype, batch_size, vram_gb)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    paths = _inputs(slides)
    bars = _Bars(quiet, len(paths))
    try:
        results = extract_features(paths, out_dir, runner, config, progress=bars)
    except OptimusError as exc:  # the output folder is locked or unwritable: the whole batch stops, named
        _batch_failed(exc)
    finally:
        bars.close()
    ok = [r for r in results if not isinstance(r, Failure)]
    bad = [r for r in results if isinstance(r, Failure)]
    for r in ok:
        click.echo(f"{'cached' if r.cached else 'done  '} {r.path}: {r.tiles} tiles -> {r.info.get('features')}")
    for f in bad:
        click.echo(f"FAILED {f.message}", err=True)
    if clam_layout and ok:
        from .features import write_clam_layout

        try:
            write_clam_layout(out_dir)
        except OptimusError as exc:
            raise click.UsageError(str(exc)) from exc
        click.echo(f"CLAM layout: {Path(out_dir) / 'h5_files'}, {Path(out_dir) / 'pt_files'}")
    sys.exit(_exit_code(len(ok), len(bad)))


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out", show_default=True,
              help="output folder")
@click.option("--mpp", type=float, default=None, help="level-0 microns per pixel override")
@click.option("--nuclei-mpp", type=float, default=None, help="resolution of the nuclei path (default: the model's)")
@click.option("--overlap", "overlap_px", type=int, default=64, show_default=True,
              help="tile overlap in pixels at the nuclei resolution")
@click.option("--min-tissue", type=float, default=0.25, show_default=True, help="minimum tissue fraction")
@click.option("--backend", type=click.Choice(["auto", "cucim", "tiffslide", "dicom", "openslide"]), default="auto")
@click.option("--nuclei-weights", default=None, help="nuclei checkpoint (default: the bundled model)")
@click.option("--backbone-weights", default=None, help="weights of the backbone the nuclei head was trained on")
@click.option("--mil-weights", default=None, help="attention-MIL checkpoint for the slide score")
@click.option("--thresholds", default=None, type=click.Path(dir_okay=False), help="trust-tag thresholds JSON")
@click.option("--ood-state", default=None, type=click.Path(dir_okay=False), help="OOD reference state (.npz)")
@click.option("--shadow-slides", type=int, default=30, show_default=True,
              help="cold start: a site's first N slides are never cleared from review (0: off)")
@click.option("--site-id", default="default", show_default=True, help="site name for the shadow-mode counter")
@click.option("--outputs", default=",".join(("features", "cells", "regions", "thumbnail", "summary")),
              show_default=True, help="what to write (comma-separated)")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--batch-size", type=int, default=16, show_default=True, help="tiles per backbone call")
@click.option("--workers", type=int, default=2, show_default=True, help="slide reader threads")
@click.option("--decoder", type=click.Choice(_DECODERS), default="auto", show_default=True, help=_DECODER_HELP)
@click.option("-q", "--quiet", is_flag=True, help="no progress bars (services, logs)")
@click.option("--gzip", "gzip_cells", is_flag=True,
              help="write cells.geojson.gz (gzip; QuPath imports .geojson/.json/.zip: gunzip before importing)")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="distribute slides over a Ray cluster (no value: start/attach locally; 'auto'; "
                   "'ray://head:10001')")
@click.option("--ray-actors", type=int, default=None, help="Ray actors (default: one per GPU, or per CPU group)")
@click.option("--ray-cpus-per-actor", type=int, default=1, show_default=True, help="CPUs per CPU-only actor")
@click.option("--lock-timeout", type=float, default=None,
              help="seconds to wait when another run is writing to OUT (default: wait until it ends; 0: fail at once)")
def triage(slides, out_dir, mpp, nuclei_mpp, overlap_px, min_tissue, backend, nuclei_weights, backbone_weights,
           mil_weights, thresholds, ood_state, shadow_slides, site_id, outputs, device, batch_size, workers, decoder, quiet,
           gzip_cells, ray_address, ray_actors, ray_cpus_per_actor, lock_timeout):
    """Triage SLIDES (files or folders; default: the bundled real slide) into a ranked worklist.

    Writes per slide OUT/<slide>/{cells.geojson[.gz], regions.geojson, overview.png, summary.json} and
    OUT/features/<slide>.h5, and per batch OUT/worklist.{csv,json}. Exit code: 0 complete,
    1 partial (some slides failed; see the worklist), 2 failed.
    """
    from .scheduler import SchedulerConfig
    from .triage import Engine, TriageConfig

    try:
        config = TriageConfig(scheduler=SchedulerConfig(batch_tiles=batch_size, reader_threads=workers), mpp=mpp,
                              backend=backend, decoder=decoder, nuclei_mpp=nuclei_mpp, overlap_px=overlap_px,
                              min_tissue_fraction=min_tissue,
                              outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()),
                              thresholds=thresholds, ood_state=ood_state, shadow_slides=shadow_slides,
                              site_id=site_id, gzip_cells=gzip_cells, lock_timeout_s=lock_timeout)
        weights = dict(nuclei_weights=nuclei_weights, backbone_weights=backbone_weights, mil_weights=mil_weights,
                       device=device, batch_size=batch_size)
        if ray_address is None:
            engine = Engine(config, **weights)
        else:
            from .distributed import ClusterConfig, RayTriage

            engine = RayTriage(config, cluster=ClusterConfig(address=ray_address or None, num_actors=ray_actors,
                                                             cpus_per_actor=ray_cpus_per_actor), **weights)
    except OptimusError as exc:
        raise click.UsageError(str(exc)) from exc
    paths = _inputs(slides)
    bars = _Bars(quiet, len(paths))
    try:
        if ray_address is None:
            batch = engine.run(paths, out_dir, progress=bars)
        else:
            with engine:
                batch = engine.run(paths, out_dir, progress=bars)
    except OptimusError as exc:  # the output folder is locked or unwritable (disk full): named, clean exit
        _batch_failed(exc)
    finally:
        bars.close()
    for r in batch.results:
        click.echo(f"{'cached' if r.cached else 'done  '} {r.name}: {r.tag} (priority {r.priority:.3f}, "
                   f"{r.nuclei} nuclei in {r.tiles} tiles) -> {Path(r.outputs['summary']).parent}")
    for f in batch.failures:
        click.echo(f"FAILED {f.message}", err=True)
    click.echo(f"worklist: {batch.worklist_csv} ({batch.status})")
    sys.exit(_exit_code(len(batch.results), len(batch.failures)))


def _batch_failed(exc: OptimusError) -> None:
    """a whole batch stopped by a named error (output folder locked, disk full): say so, exit 2"""
    click.echo(f"FAILED {exc}", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.exit(EXIT_FAILED)


def _register_model_commands() -> None:
    from .cli_models import segment, train

    cli.add_command(train)
    cli.add_command(segment)


_register_model_commands()


def main(argv: list[str] | None = None) -> None:
    """console-script entry point"""
    cli.main(args=argv, prog_name="cellvit-optimus")


if __name__ == "__main__":  # pragma: no cover
    main()
