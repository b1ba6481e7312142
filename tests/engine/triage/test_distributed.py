"""Triage on a local Ray cluster: same outputs as one process, largest slide first, and a killed actor
costs only its in-flight slide (re-queued once, nothing else recomputed).

The batch is the real CMU slide plus copies padded with trailing bytes (readers ignore them; the
size, so the slide fingerprint and the shadow-mode identity, differ), later copies larger so that
largest-first dispatch runs against input order, plus two real inputs that fail alone (a slide
without MPP, a text file). Nuclei at 4 um/px: two tiles per slide, so the mechanics are tested, not
the model. The Ray tests skip when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cellvit_optimus.engine.data import DATA_DIR
from cellvit_optimus.engine.triage.distributed import ClusterConfig, RayTriage
from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
from cellvit_optimus.engine.triage.engine import Engine, TriageConfig
from cellvit_optimus.safety import shadow_prefix

COARSE = dict(nuclei_mpp=4.0, overlap_px=32)
#: the bundled nuclei model when it is there (Engine's default); else a seeded random checkpoint
USE_BUNDLED = (DATA_DIR / "default_nuclei.safetensors").is_file()


@pytest.fixture(scope="module")
def nuclei_weights(tmp_path_factory) -> str | None:
    if USE_BUNDLED:
        return None
    import torch

    from cellvit_optimus.heads import CONSEP, SMALL_DECODER, UNETRHead, save_nuclei_head

    path = tmp_path_factory.mktemp("weights") / "random_nuclei.safetensors"
    torch.manual_seed(0)
    head = UNETRHead(192, CONSEP.num_classes, decoder_channels=SMALL_DECODER)
    save_nuclei_head(path, head, profile=CONSEP, backbone_id="tiny", backbone_hash="random:tiny:seed=0",
                     nuclei_mpp=0.5)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # "local": a cluster of our own even when someone ran `ray start` on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _batch(folder: Path, slides_dir: Path, copies: int) -> list[str]:
    folder.mkdir()
    data = (slides_dir / "cmu-1-small-region.svs").read_bytes()
    paths = []
    for i in range(copies):
        p = folder / f"cmu-{i}.svs"
        p.write_bytes(data + b"\0" * (1024 * i))
        paths.append(str(p))
    (folder / "notes.svs").write_text("patient notes\n")
    return [*paths, str(slides_dir / "kidney-48-5.tif"), str(folder / "notes.svs")]


def _in_order(cfg: TriageConfig) -> TriageConfig:
    """the single-process reference with one slide in flight: a process counts shadow slides in the
    order they finish, which with two in flight follows the reader threads' timing; the distributed
    run counts in input order by construction. Nothing else in the outputs depends on this setting."""
    return replace(cfg, scheduler=replace(cfg.scheduler, slides_in_flight=1))


def _digest(out: Path) -> dict[str, str]:
    """every file under ``out``; summary timings and the output folder's own path left out"""
    d = {}
    for p in sorted(out.rglob("*")):
        if p.is_dir() or p.name.endswith(".lock"):
            continue
        data = p.read_bytes()
        if p.name == "summary.json":
            doc = json.loads(data)
            doc["result"].pop("timings")
            doc["result"]["outputs"] = {k: Path(v).name for k, v in doc["result"]["outputs"].items()}
            data = json.dumps(doc, sort_keys=True).encode()
        d[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return d


def _by_status(attempts, status):
    return sorted(a.slide for a in attempts if a.status == status)


# --------------------------------------------------------------------------------------------------
# without a cluster
# --------------------------------------------------------------------------------------------------


def test_cluster_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="num_actors=0"):
        ClusterConfig(num_actors=0)
    with pytest.raises(ConfigError, match="cpus_per_actor=0"):
        ClusterConfig(cpus_per_actor=0)
    with pytest.raises(ConfigError, match="max_attempts=0"):
        ClusterConfig(max_attempts=0)
    with pytest.raises(ConfigError, match="gpus_per_actor=-1"):
        ClusterConfig(gpus_per_actor=-1)


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"cellvit-optimus\[ray\]"):
        RayTriage(TriageConfig(**COARSE)).start()


# --------------------------------------------------------------------------------------------------
# on a local 2-CPU cluster
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_actors_write_what_one_process_writes(tmp_path, slides_dir, nuclei_weights, ray_cluster):
    paths = _batch(tmp_path / "batch", slides_dir, copies=4)
    cfg = TriageConfig(**COARSE)  # shadow mode on: tags and reasons depend on the counting order
    single = Engine(_in_order(cfg), nuclei_weights=nuclei_weights).run(paths, tmp_path / "single")
    seen = []
    with RayTriage(cfg, cluster=ClusterConfig(num_actors=2, poll_s=0.2), nuclei_weights=nuclei_weights,
                   device="cpu") as rt:
        multi = rt.run(paths, tmp_path / "multi", progress=seen.append)
        multi_digest = _digest(tmp_path / "multi")  # before the rerun, whose worklist says "cached"
        attempts = list(rt.attempts)
        again = rt.run(paths, tmp_path / "multi")

    # same files, byte for byte: features (HDF5), cells, regions, overview, summaries, site state,
    # worklist (same ranking, same failure rows)
    assert multi_digest == _digest(tmp_path / "single")
    assert [r.to_dict() | {"timings": None, "outputs": None} for r in multi.results] == \
        [r.to_dict() | {"timings": None, "outputs": None} for r in single.results]
    assert multi.failures == single.failures and multi.status == single.status == "partial"
    assert [r.reason.split(";")[0] for r in multi.results] == [shadow_prefix(k, 30) for k in range(1, 5)]
    assert {Path(f.path).name: f.reason for f in multi.failures} == {"kidney-48-5.tif": "no MPP",
                                                                     "notes.svs": "not a slide"}

    # largest file first; every input handed out once; each tile computed once
    sizes = {Path(p).name: os.path.getsize(p) for p in paths}
    handed = [a.slide for a in sorted(attempts, key=lambda a: a.order)]
    assert handed == sorted(sizes, key=lambda n: -sizes[n])
    assert sorted(a.slide for a in attempts) == sorted(sizes) and {a.attempt for a in attempts} == {1}
    assert sum(a.tiles_computed for a in attempts) == sum(r.tiles for r in multi.results)
    assert {a.actor for a in attempts} == {0, 1}

    # progress aggregated over both actors
    assert seen[-1].slides_done == seen[-1].slides_total == len(paths)
    assert seen[-1].tiles_done == sum(r.tiles for r in multi.results)
    assert any(len(p.workers) == 2 for p in seen)

    # a rerun finds every finished slide and recomputes nothing
    assert [r.cached for r in again.results] == [True] * 4
    assert _by_status(rt.attempts, "done") == [] and sum(a.tiles_computed for a in rt.attempts) == 0


@pytest.mark.slow
def test_killed_actor_loses_only_its_slide(tmp_path, slides_dir, nuclei_weights, ray_cluster):
    paths = _batch(tmp_path / "batch", slides_dir, copies=5)[:5]
    # one tile per backbone call, so a slide is two batches and "mid-slide" is observable; one reader
    # thread, since cells.geojson lists nuclei in batch arrival order (two readers may swap batches)
    cfg = TriageConfig(**COARSE, scheduler=SchedulerConfig(batch_tiles=1, reader_threads=1))
    reference = Engine(_in_order(cfg), nuclei_weights=nuclei_weights).run(paths, tmp_path / "single")
    killed: dict[str, object] = {}

    rt = RayTriage(cfg, cluster=ClusterConfig(num_actors=2, poll_s=0.2), nuclei_weights=nuclei_weights,
                   device="cpu").start()
    try:
        ray_cluster.get(rt.actors[0].set_batch_delay.remote(1.5))  # actor 0 is slow: time to catch it
        victim = rt.pids[0]

        def progress(p):
            for w in p.workers:
                if not killed and w.actor == 0 and 0 < w.tiles_done < w.tiles_total:
                    killed.update(slide=w.slide, tiles_done=w.tiles_done)
                    os.kill(victim, signal.SIGKILL)

        batch = rt.run(paths, tmp_path / "multi", progress=progress)
        multi_digest = _digest(tmp_path / "multi")  # before the rerun, whose worklist says "cached"
        attempts = list(rt.attempts)
        # a fresh actor took the dead one's slot (it may still be loading its models)
        assert victim not in rt.pids.values() and (rt.slots[0].alive or rt.slots[0].starting is not None)
        rerun = rt.run(paths, tmp_path / "multi")
    finally:
        rt.close()

    assert killed, "actor 0 was never seen mid-slide"
    assert batch.status == "complete" and [r.name for r in batch.results] == [Path(p).stem for p in paths]
    assert multi_digest == _digest(tmp_path / "single")
    assert not list((tmp_path / "multi").rglob(".tmp-*"))

    # counted: one death, its slide redone once elsewhere; every other slide computed exactly once
    died = [a for a in attempts if a.status == "died"]
    assert [(a.slide, a.actor, a.attempt) for a in died] == [(killed["slide"], 0, 1)]
    assert _by_status(attempts, "done") == sorted(Path(p).name for p in paths)
    redo = [a for a in attempts if a.slide == killed["slide"] and a.status == "done"]
    assert [a.attempt for a in redo] == [2]
    assert all(a.attempt == 1 for a in attempts if a.slide != killed["slide"])
    tiles = {r.name + ".svs": r.tiles for r in batch.results}
    assert all(a.tiles_computed == tiles[a.slide] for a in attempts if a.status == "done")
    assert died[0].tiles_computed == killed["tiles_done"] < tiles[killed["slide"]]  # its partial work
    assert [(r.tag, r.reason, r.nuclei) for r in batch.results] == \
        [(r.tag, r.reason, r.nuclei) for r in reference.results]

    # finished slides are never recomputed
    assert [r.cached for r in rerun.results] == [True] * len(paths)
    assert sum(a.tiles_computed for a in rt.attempts) == 0


@pytest.mark.slow
def test_a_slide_whose_actor_keeps_dying_leaves_no_earlier_output_looking_current(tmp_path, slides_dir,
                                                                                  nuclei_weights, ray_cluster):
    [path] = _batch(tmp_path / "batch", slides_dir, copies=1)[:1]
    out = tmp_path / "out"
    cfg = TriageConfig(**COARSE, scheduler=SchedulerConfig(batch_tiles=1, reader_threads=1))
    # one attempt per slide, and no replacement actor (it would only load models for nothing here)
    rt = RayTriage(cfg, cluster=ClusterConfig(num_actors=1, poll_s=0.2, max_attempts=1, max_actor_restarts=0),
                   nuclei_weights=nuclei_weights, device="cpu").start()
    try:
        first = rt.run([path], out)
        assert first.status == "complete" and (out / "cmu-0" / "summary.json").is_file()
        with open(path, "ab") as f:  # the slide changed since: the earlier outputs are not its outputs now
            f.write(b"\0" * 512)
        ray_cluster.get(rt.actors[0].set_batch_delay.remote(1.0))
        victim = rt.pids[0]
        killed: list[int] = []

        def progress(p):
            for w in p.workers:
                if not killed and 0 < w.tiles_done < w.tiles_total:
                    killed.append(w.tiles_done)
                    os.kill(victim, signal.SIGKILL)

        second = rt.run([path], out, progress=progress)
    finally:
        rt.close()

    assert killed, "the actor was never seen mid-slide"
    assert second.results == []
    [r] = second.failures
    assert r.error == "ActorDiedError" and "died 1 times" in r.message, r
    # as one process does for a failed slide: the earlier run's files are moved aside, none left current
    left = sorted(p.name for p in (out / "cmu-0").iterdir())
    assert left and all(".stale-" in n for n in left), left
    assert "summary.json" in {n.split(".stale-")[0] for n in left}
    assert list((out / "features").glob("cmu-0.h5.stale-*")) and not (out / "features" / "cmu-0.h5").exists()
