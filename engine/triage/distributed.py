"""Scale-out on Ray: one streaming :class:`~cellvit_optimus.engine.triage.engine.Engine` per GPU (or per group
of CPUs), slides handed out by the driver, the same outputs as one process.

Where it sits: above :mod:`.triage`. Each Ray actor holds one ``Engine`` and triages one slide per call,
writing that slide's outputs (``OUT/<slide>/``, ``OUT/features/<slide>.h5``, atomically, ``summary.json``
last) straight into the shared output folder. The driver keeps a queue ordered largest file first (the
big slides start early, so the batch does not end waiting on one straggler), gives the next slide to
whichever actor is free, polls the busy actors for progress, and writes the worklist once at the end
with the single-process ranking. Everything a slide needs (slides, output folder, weights) must be
visible under the same paths on every node: a shared filesystem.

Faults:

- an actor that dies (process killed, node lost, out of memory) loses only its in-flight slide: the
  slide's leftover temporaries are removed and it goes back to the head of the queue for another
  actor; a replacement actor is started while the restart budget lasts. A slide whose actor dies
  ``max_attempts`` times fails alone (``reason="worker died"``), like a bad slide in one process;
- finished slides are never recomputed: ``summary.json`` with the same run key marks them, and a
  slide whose actor died after writing it comes back as cached;
- a slide that raises (corrupt file, no tissue, ...) is a :class:`~.inspect.Failure` as in one process.

Shadow mode: the site's first N slides are counted in :class:`~cellvit_optimus.safety.ShadowMode`'s
state file, which every actor shares (file lock, atomic writes). Completion order across actors
depends on timing, so the driver reserves the shadow positions of the batch's new slides in input
order before dispatching: the tags and reasons do not depend on the number of actors or on which
finishes first. Slides that cannot be opened are not reserved (the driver opens each candidate's
header while the window is open, at most about N files). One difference from a single process
remains: a slide that opens but fails later (no tissue, corrupt tiles) keeps its reserved position
(its log entry says it was reserved and never computed), so the window holds one real slide fewer.

Ray is an optional extra (``pip install "cellvit-optimus[ray]"``); importing this module does not need it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError
from cellvit_optimus.engine.settings import DEFAULT_DEVICE, resolve_device
from cellvit_optimus.engine.wsi import Failure
from cellvit_optimus.engine.pipeline import Progress
from cellvit_optimus.engine.triage.config import TriageConfig
from cellvit_optimus.engine.triage.engine import Engine
from cellvit_optimus.engine.triage.outputs import finished_result, retire_outputs, write_worklist
from cellvit_optimus.engine.triage.results import BatchResult, SlideResult
from cellvit_optimus.engine.io import (TMP_PREFIX, atomic_write_bytes, clean_stale_temporaries, folder_lock,
                                       output_names)

__all__ = ("ClusterConfig", "ClusterProgress", "WorkerProgress", "SlideAttempt", "RayTriage")

log = logging.getLogger(__name__)

#: what a shadow log entry says for a position reserved by the driver but not (yet) computed
RESERVED_REASON = "position reserved in input order by a distributed run; replaced when the slide finishes"


@dataclass(frozen=True)
class ClusterConfig:
    """where to run and how to size the actors

    ``address`` (used when Ray is not yet initialised in this process): ``None`` is ``ray.init()``'s
    default (``RAY_ADDRESS``, else a cluster started on this machine with ``ray start``, else a new
    local instance); ``"local"`` always starts a new local instance; ``"auto"`` joins the cluster
    started with ``ray start`` (head or worker node); ``"ray://head:10001"`` connects a remote client.
    ``num_actors``: default one per GPU of the cluster, else one per ``cpus_per_actor`` CPUs.
    ``gpus_per_actor``: default 1 when the cluster has GPUs, else 0 (the actor runs on CPU with
    ``cpus_per_actor`` torch threads).
    """

    address: str | None = None
    num_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: int = 1
    max_attempts: int = 3  # per slide: actor deaths before the slide fails alone
    max_actor_restarts: int | None = None  # replacement actors over the batch (default: num_actors)
    poll_s: float = 0.5  # how often busy actors are asked for progress

    def __post_init__(self) -> None:
        if self.num_actors is not None and (not isinstance(self.num_actors, int) or self.num_actors < 1):
            raise ConfigError(f"num_actors={self.num_actors!r} must be a positive integer")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor={self.gpus_per_actor!r} must be >= 0")
        if not isinstance(self.cpus_per_actor, int) or self.cpus_per_actor < 1:
            raise ConfigError(f"cpus_per_actor={self.cpus_per_actor!r} must be a positive integer")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts={self.max_attempts!r} must be a positive integer")
        if self.max_actor_restarts is not None and self.max_actor_restarts < 0:
            raise ConfigError(f"max_actor_restarts={self.max_actor_restarts!r} must be >= 0")
        if self.poll_s <= 0:
            raise ConfigError(f"poll_s={self.poll_s!r} must be > 0")


@dataclass
class WorkerProgress:
    """one busy actor: its slide and how far it is"""

    actor: int
    slide: str
    tiles_done: int
    tiles_total: int


@dataclass
class ClusterProgress(Progress):
    """the batch across all actors; ``workers`` lists the busy ones"""

    workers: tuple[WorkerProgress, ...] = ()


@dataclass
class SlideAttempt:
    """one hand-out of a slide to an actor, as the driver saw it end"""

    slide: str
    actor: int
    attempt: int  # 1 for the first hand-out of this slide
    order: int  # position in the driver's hand-out sequence (0: first slide handed out)
    status: str  # "done", "cached", "failed" (the slide failed) or "died" (the actor died)
    tiles_computed: int  # backbone tiles the actor ran for it (for "died": the last progress seen)
    wall_s: float


class ActorInfo(NamedTuple):
    """what a started actor reports: its engine's run key and where it runs"""

    run_key: str
    pid: int
    host: str


class SlideOutcome(NamedTuple):
    """what an actor hands back for one slide: a :class:`SlideResult` or :class:`Failure` as a plain
    mapping (``kind`` says which), the backbone tiles it computed and its wall time"""

    kind: str  # "result" or "failure"
    value: dict[str, object]
    tiles_computed: int
    wall_s: float


class _SlideWorker:
    """a Ray actor's body: one Engine, one slide per call (plus progress queries from a second thread)"""

    def __init__(self, config: TriageConfig, engine_kwargs: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        device = resolve_device(engine_kwargs.pop("device", DEFAULT_DEVICE))
        self.engine = Engine(config, device=device, **engine_kwargs)
        self._progress: tuple[str, int, int] | None = None

    def ready(self) -> ActorInfo:
        return ActorInfo(self.engine.run_key(), os.getpid(), socket.gethostname())

    def set_batch_delay(self, seconds: float) -> None:
        """test and diagnostics hook: sleep this long before every backbone batch (``Engine.batch_delay_s``)"""
        self.engine.batch_delay_s = float(seconds)

    def progress(self) -> tuple[str, int, int] | None:
        return self._progress

    def triage(self, path: str, out_dir: str, output_name: str | None = None) -> SlideOutcome:
        import anyio

        name = Path(path).name
        self._progress = (name, 0, 0)

        def on_progress(p: Progress) -> None:
            self._progress = (name, p.tiles_done, p.tiles_total)

        async def one() -> list[Any]:
            # the driver cleans stale temporaries once before dispatching; actors never do, or they
            # would delete the temporaries of slides in flight on other actors
            names = {path: output_name} if output_name else None  # the driver names slides for the whole batch
            return [r async for r in self.engine.stream([path], out_dir, on_progress, clean_temporaries=False,
                                                        names=names)]

        before = self.engine.model.runner.tiles_processed
        t0 = time.perf_counter()
        try:
            got = anyio.run(one)
        finally:
            self._progress = None
        tiles = self.engine.model.runner.tiles_processed - before
        [r] = got
        kind = "failure" if isinstance(r, Failure) else "result"
        return SlideOutcome(kind, r.to_dict(), tiles, time.perf_counter() - t0)


@dataclass
class _Slot:
    """an actor and its bookkeeping on the driver"""

    index: int
    handle: Any
    pid: int = -1
    host: str = ""
    busy: Any = None  # ObjectRef of the in-flight triage call
    starting: Any = None  # ObjectRef of a replacement actor's ready() call
    slide: int = -1
    order: int = -1
    started: float = 0.0
    seen: tuple[str, int, int] | None = None  # last progress
    alive: bool = True


@dataclass
class _State:
    results: dict[int, SlideResult | Failure] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    tiles_done: int = 0  # tiles of finished slides
    tiles_known: int = 0


class RayTriage:
    """:class:`~cellvit_optimus.engine.triage.engine.Engine` over a Ray cluster, with the same outputs

    ``RayTriage(config, cluster=ClusterConfig(num_actors=4)).run(slides, out)`` returns the same
    :class:`~cellvit_optimus.engine.triage.engine.BatchResult` as ``Engine(config).run(slides, out)``.
    ``start()`` creates the actors (``run`` does it when needed); ``close()`` ends them and the Ray
    instance if this object started it. Usable as a context manager.

    Parameters
    ----------
    config : the triage configuration (identical on every actor)
    cluster : address and actor sizing
    nuclei_weights, backbone_weights, mil_weights : as for ``Engine``; paths must exist on every node
    device : ``"auto"`` (CUDA on actors given a GPU), ``"cpu"`` or ``"cuda"``
    batch_size : tiles per backbone call (default: the nuclei model's for each actor's device)
    head_dtype : the nuclei decoder's precision on every actor, as for ``Engine``
    ray_init : extra keyword arguments for ``ray.init`` when this object starts or joins Ray
    """

    def __init__(self, config: TriageConfig | None = None, *, cluster: ClusterConfig | None = None,
                 nuclei_weights: str | os.PathLike[str] | None = None,
                 backbone_weights: str | os.PathLike[str] | None = None,
                 mil_weights: str | os.PathLike[str] | None = None, device: str = DEFAULT_DEVICE,
                 batch_size: int | None = None, head_dtype: str = "fp32",
                 ray_init: dict[str, Any] | None = None) -> None:
        self.config = config or TriageConfig()
        self.cluster = cluster or ClusterConfig()
        self.engine_kwargs: dict[str, Any] = {
            "nuclei_weights": None if nuclei_weights is None else os.path.abspath(nuclei_weights),
            "backbone_weights": None if backbone_weights is None else os.path.abspath(backbone_weights),
            "mil_weights": None if mil_weights is None else os.path.abspath(mil_weights),
            "device": device, "batch_size": batch_size, "head_dtype": head_dtype}
        self.ray_init = dict(ray_init or {})
        self.slots: list[_Slot] = []
        self.attempts: list[SlideAttempt] = []  # every hand-out of the last run, in the order they ended
        self.run_key: str | None = None
        self._owns_ray = False
        self._restarts_left = 0
        self._remote: Any = None
        self._resources: dict[str, Any] = {}
        self._threads = 1

    # -- cluster -----------------------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """handles of the live actors, by slot"""
        return [s.handle for s in self.slots if s.alive]

    @property
    def pids(self) -> dict[int, int]:
        """process id of each live actor, by slot (``host`` may differ from the driver's)"""
        return {s.index: s.pid for s in self.slots if s.alive}

    def start(self) -> RayTriage:
        """connect to (or start) Ray and create the actors; raises if an actor cannot load the models"""
        if self.slots:
            return self
        ray = _import_ray()
        c = self.cluster
        if not ray.is_initialized():
            ray.init(address=c.address, **self.ray_init)
            self._owns_ray = True
        total = ray.cluster_resources()
        gpus = c.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
        if c.num_actors is not None:
            n = c.num_actors
        elif gpus > 0:
            n = max(1, int(total.get("GPU", 0) // gpus))
        else:
            n = max(1, int(total.get("CPU", 1) // c.cpus_per_actor))
        self._resources = {"num_cpus": c.cpus_per_actor, "num_gpus": gpus}
        self._threads = c.cpus_per_actor
        # two concurrent calls: the slide, and the driver's progress queries while it runs
        self._remote = ray.remote(max_concurrency=2, max_restarts=0)(_SlideWorker)
        self._restarts_left = n if c.max_actor_restarts is None else c.max_actor_restarts
        self.slots = [self._new_slot(i) for i in range(n)]
        infos = self._ready(self.slots)
        keys = {i.run_key for i in infos}
        if len(keys) != 1:
            raise ConfigError(f"actors disagree on the run key ({sorted(keys)}): different package "
                              "versions or weights files on the nodes")
        self.run_key = keys.pop()
        log.info("ray: %d actors (%s per actor)", n, self._resources)
        return self

    def _new_slot(self, index: int) -> _Slot:
        handle = self._remote.options(**self._resources).remote(self.config, dict(self.engine_kwargs),
                                                                self._threads)
        return _Slot(index=index, handle=handle)

    def _ready(self, slots: list[_Slot]) -> list[ActorInfo]:
        ray = _import_ray()
        infos: list[ActorInfo] = ray.get([s.handle.ready.remote() for s in slots])
        for s, info in zip(slots, infos):
            s.pid, s.host = info.pid, info.host
        return infos

    def close(self) -> None:
        """end the actors (and Ray, when this object started it)"""
        if not self.slots and not self._owns_ray:
            return
        ray = _import_ray()
        for s in self.slots:
            if s.alive or s.starting is not None:
                try:
                    ray.kill(s.handle)
                except Exception:  # already gone
                    pass
        self.slots = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayTriage:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the batch ---------------------------------------------------------------------------------
    def run(self, slides: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            progress: Callable[[ClusterProgress], None] | None = None,
            skipped: Sequence[tuple[str, str]] = ()) -> BatchResult:
        """triage ``slides`` into ``out_dir`` on the cluster; returns the batch with its worklist
        (``skipped``: inputs not run, as ``(path, why)``, listed in the worklist too)

        The driver holds the output folder's lock for the whole batch (actors write under it)."""
        out = Path(os.path.realpath(out_dir))
        with folder_lock(out, self.config.lock_timeout_s):
            return self._run_locked(slides, out, progress, skipped)

    def _run_locked(self, slides: Sequence[str | os.PathLike[str]], out: Path,
                    progress: Callable[[ClusterProgress], None] | None,
                    skipped: Sequence[tuple[str, str]]) -> BatchResult:
        from cellvit_optimus.engine.triage.outputs import output_owner

        ray = _import_ray()
        self.start()
        clean_stale_temporaries(out)  # once, before any actor writes (they never clean: see _SlideWorker)
        # real paths (links and ".." resolved by the OS): an actor's working directory is not the driver's
        paths = list(dict.fromkeys(Path(os.path.realpath(p)) for p in slides))
        self._names = output_names(paths, lambda n: output_owner(out, n))
        assert self.run_key is not None
        self._reserve_shadow(paths, out)

        queue = deque(sorted(range(len(paths)), key=lambda i: (-_size(paths[i]), i)))
        st = _State()
        self.attempts = []
        handed = 0
        t0 = time.perf_counter()
        last_poll = 0.0

        while queue or any(s.busy is not None for s in self.slots):  # (starting ones only serve the queue)
            for s in self.slots:
                if s.alive and s.starting is None and s.busy is None and queue:
                    i = queue.popleft()
                    st.attempts[i] = st.attempts.get(i, 0) + 1
                    s.busy, s.slide, s.order, s.started = (s.handle.triage.remote(str(paths[i]), str(out),
                                                                                   self._names[str(paths[i])]), i,
                                                           handed, time.perf_counter())
                    s.seen = (paths[i].name, 0, 0)
                    handed += 1
            busy = {s.busy: s for s in self.slots if s.busy is not None}
            starting = {s.starting: s for s in self.slots if s.starting is not None}
            if not busy and not starting:  # every actor is gone and none can be replaced
                for i in queue:
                    st.results[i] = Failure(str(paths[i]), "ActorDiedError", "worker died",
                                            f"{paths[i]}: no Ray actor left to triage it")
                queue.clear()
                break
            ready, _ = ray.wait([*busy, *starting], num_returns=1, timeout=self.cluster.poll_s)
            for ref in ready:
                if ref in starting:
                    self._started(starting[ref], ref)
                else:
                    self._collect(busy[ref], ref, paths, queue, st, out)
            now = time.perf_counter()
            if progress is not None and (ready or now - last_poll >= self.cluster.poll_s):
                last_poll = now
                progress(self._progress(st, len(paths), now - t0))

        got = [st.results[i] for i in range(len(paths))]
        # the same ranking as one process, without loading a model on the driver
        return write_worklist(out, got, skipped, {str(p): self._names[str(p)] for p in paths})

    def _collect(self, slot: _Slot, ref: Any, paths: list[Path], queue: deque[int], st: _State,
                 out: Path) -> None:
        """one finished call: a result, a failure, or a dead actor whose slide goes back to the queue"""
        ray = _import_ray()
        from cellvit_optimus.engine.wsi import failure_from

        i, slot.busy = slot.slide, None
        wall = time.perf_counter() - slot.started
        try:
            doc = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            done_tiles = slot.seen[1] if slot.seen else 0
            self.attempts.append(SlideAttempt(paths[i].name, slot.index, st.attempts[i], slot.order, "died",
                                              done_tiles, wall))
            log.warning("ray actor %d (pid %d on %s) died on %s: %s", slot.index, slot.pid, slot.host,
                        paths[i], exc)
            _remove_temporaries(out, self._names[str(paths[i])])
            self._replace(slot)
            if st.attempts[i] < self.cluster.max_attempts:
                queue.appendleft(i)  # it was the largest left when it was handed out
            else:
                st.results[i] = Failure(str(paths[i]), "ActorDiedError", "worker died",
                                        f"{paths[i]}: its Ray actor died {st.attempts[i]} times ({exc})")
                # failed on the driver's side: as in one process, no earlier output may look current (an
                # actor retires a slide's outputs itself when the slide fails inside it)
                retire_outputs(out, self._names[str(paths[i])], str(paths[i]))
            return
        except Exception as exc:  # the call itself raised (a bug, not the slide): this slide fails alone
            self.attempts.append(SlideAttempt(paths[i].name, slot.index, st.attempts[i], slot.order, "failed",
                                              0, wall))
            cause = getattr(exc, "cause", None) or exc
            st.results[i] = failure_from(paths[i], cause)
            retire_outputs(out, self._names[str(paths[i])], str(paths[i]))
            return
        if doc.kind == "failure":
            st.results[i] = Failure(**doc.value)
            status = "failed"
        else:
            res = SlideResult(**doc.value)
            st.results[i] = res
            st.tiles_done += res.tiles
            status = "cached" if res.cached else "done"
        self.attempts.append(SlideAttempt(paths[i].name, slot.index, st.attempts[i], slot.order, status,
                                          int(doc.tiles_computed), wall))

    def _replace(self, slot: _Slot) -> None:
        """start a fresh actor in a dead one's slot while the restart budget lasts (without waiting:
        the others keep working while it loads its models)"""
        slot.alive, slot.seen, slot.pid, slot.host = False, None, -1, ""
        if self._restarts_left <= 0:
            log.warning("ray actor %d is not replaced (restart budget spent)", slot.index)
            return
        self._restarts_left -= 1
        slot.handle = self._new_slot(slot.index).handle
        slot.starting = slot.handle.ready.remote()

    def _started(self, slot: _Slot, ref: Any) -> None:
        ray = _import_ray()
        slot.starting = None
        try:
            info: ActorInfo = ray.get(ref)
        except Exception as exc:  # the cluster cannot host another one: go on with the rest
            log.warning("could not replace ray actor %d: %s", slot.index, exc)
            return
        slot.pid, slot.host, slot.alive = info.pid, info.host, True

    def _progress(self, st: _State, total: int, elapsed: float) -> ClusterProgress:
        ray = _import_ray()
        busy = [s for s in self.slots if s.busy is not None and s.alive]
        refs = {s.handle.progress.remote(): s for s in busy}
        ready = ray.wait(list(refs), num_returns=len(refs), timeout=self.cluster.poll_s)[0] if refs else []
        for ref in ready:
            try:
                seen = ray.get(ref)
            except Exception:  # the actor died meanwhile; its slide call will say so
                continue
            if seen is not None:
                refs[ref].seen = seen
        workers = tuple(WorkerProgress(s.index, s.seen[0], s.seen[1], s.seen[2]) for s in busy if s.seen)
        tiles_done = st.tiles_done + sum(w.tiles_done for w in workers)
        tiles_total = st.tiles_done + sum(w.tiles_total for w in workers)
        current = workers[0].slide if workers else None
        return ClusterProgress(slides_done=len(st.results), slides_total=total, tiles_done=tiles_done,
                               tiles_total=tiles_total,
                               tiles_per_s=tiles_done / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed,
                               current=current, workers=workers)

    # -- shadow mode ---------------------------------------------------------------------------------
    def _reserve_shadow(self, paths: list[Path], out: Path) -> None:
        """count the batch's new slides in input order before any actor finishes one (see module doc)"""
        from cellvit_optimus.safety import ShadowMode, Tag, TagDecision

        from cellvit_optimus.engine.pipeline import slide_fingerprint
        from cellvit_optimus.engine.wsi import open_slide

        cfg = self.config
        safety = cfg.safety
        if not safety.shadow_slides:
            return
        site = Path(safety.site_state_path) if safety.site_state_path else out / "site_state.json"
        shadow = ShadowMode(site, safety.site_id, n_slides=safety.shadow_slides, write=atomic_write_bytes)
        known = set()
        if site.is_file():
            known = {e["slide_id"] for e in json.loads(site.read_text()).get("shadow_log", [])}
        for p in paths:
            if not shadow.active:
                break
            if not p.is_file() or _finished(out, p, self.run_key, self._names[str(p)]):
                continue  # a missing file fails before tagging; a finished slide is not tagged again
            try:
                # a slide that cannot even be opened (not a slide, no MPP, ...) fails before it is
                # tagged in one process too; checking costs a header read, and only while the window is open
                with open_slide(p, backend=cfg.backend, mpp=cfg.mpp) as s:  # type: ignore[arg-type]
                    s.require_mpp()
                sid = slide_fingerprint(p)
            except Exception:
                continue
            if sid in known:
                continue  # counted before (or a copy of a slide counted before): keeps its place
            shadow.apply(sid, TagDecision(Tag.REVIEW, RESERVED_REASON))
            known.add(sid)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(
            'Ray is not installed; install the extra: pip install "cellvit-optimus[ray]"') from exc
    return ray


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _finished(out: Path, path: Path, key: str | None, name: str) -> bool:
    """the resume rule of the single-process engine (:func:`~.outputs.finished_result`), for a slide
    file the driver has not opened (a file that vanished or cannot be read counts as not finished)"""
    from cellvit_optimus.engine.pipeline import slide_fingerprint

    try:
        return finished_result(out / name / "summary.json", path, key, slide_fingerprint(path, mtime=True)) is not None
    except OSError:
        return False


def _remove_temporaries(out: Path, name: str) -> None:
    """what a dead actor left half-written for the slide named ``name`` (finished files are complete and stay)"""
    stem = name
    for p in [*(out / stem).glob(TMP_PREFIX + "*"), *(out / "features").glob(f"{TMP_PREFIX}{stem}.h5*")]:
        try:
            p.unlink()
        except OSError:
            pass
