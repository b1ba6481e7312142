"""Trust tags: reliable / review / out_of_domain per tile, per region and per slide, each with a reason.

The last step of the safety layer: it combines the OOD score, conformal set sizes, entropies, HV
consistency and quality flags into one tag by one rule, documented here and nowhere else.

Tile rule (first matching line wins; every review reason that applies is listed)::

    out_of_domain  ood_score > ood_out
    review         ood_score > ood_review
                   or a quality flag is set (blur, pen, fold, ...)
                   or the tile-label conformal set has size > max_set_size, or is empty
                   or the mean nucleus-type set size > max_mean_nucleus_set_size   (NaN = no nuclei: not judged)
                   or np_entropy > np_entropy_max or nt_entropy > nt_entropy_max
                   or hv_consistency < hv_consistency_min   (NaN = no nuclei: not judged)
                   or a given signal is NaN, or no OOD score was given and require_ood is set
    reliable       otherwise

Region rule: a region is an 8-connected group of tiles on the tile grid. It is out_of_domain when at
least ``region_ood_fraction`` of its tiles are; otherwise review when more than
``region_review_fraction`` of its tiles are not reliable (default 0: any one such tile, i.e. the
worst-tag rule short of out_of_domain); otherwise reliable.

Slide rule: the same two fractions (``slide_ood_fraction``, ``slide_review_fraction``) over all its
tiles, and a slide is never reliable while one of its regions is not; a slide without tiles is review.

Cold start: the defaults of :class:`TagThresholds` are deliberately conservative, and
:class:`ShadowMode` keeps a new site's first N slides (default 30) in review whatever they compute:
the computed tag is logged and recorded, but a slide is never cleared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError

from ._state import STATE_VERSION, StateWriter, json_bytes, read_json
from .uncertainty import label_regions

__all__ = (
    "Tag",
    "TagDecision",
    "TagThresholds",
    "TileSignals",
    "SlideTags",
    "tag_tiles",
    "quality_flags",
    "tag_regions",
    "tag_slide",
    "tag_all",
    "ShadowMode",
    "shadow_prefix",
)

logger = logging.getLogger(__name__)

_THRESHOLDS_KIND = "tag_thresholds"
_SITE_KIND = "site_state"


class Tag(str, enum.Enum):
    """trust tag, ordered by severity (reliable < review < out_of_domain)."""

    RELIABLE = "reliable"
    REVIEW = "review"
    OUT_OF_DOMAIN = "out_of_domain"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Tag.RELIABLE: 0, Tag.REVIEW: 1, Tag.OUT_OF_DOMAIN: 2}


@dataclass(frozen=True)
class TagDecision:
    tag: Tag
    reason: str


def _check_fraction(name: str, v: float, allow_one: bool = True) -> None:
    if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0 and (allow_one or v < 1.0)):
        raise ConfigError(f"{name}={v!r} must be a fraction in [0, 1{']' if allow_one else ')'}")


@dataclass(frozen=True)
class TagThresholds:
    """thresholds of the tag rule; the defaults are the conservative cold-start values.

    ``ood_review`` / ``ood_out`` have no code default on purpose: they come from the fitted OOD
    state (:meth:`with_ood`) or from a site's threshold file (:meth:`load`).
    """

    ood_review: float | None = None
    ood_out: float | None = None
    require_ood: bool = True
    max_set_size: int = 1
    max_mean_nucleus_set_size: float = 1.25
    np_entropy_max: float = 0.35
    nt_entropy_max: float = 0.35
    hv_consistency_min: float = 0.85
    region_ood_fraction: float = 0.5
    region_review_fraction: float = 0.0
    slide_ood_fraction: float = 0.5
    slide_review_fraction: float = 0.0
    #: a tile whose pen/artefact fraction exceeds this carries the "pen/artefact" quality flag
    artefact_flag_fraction: float = 0.25
    #: a tile whose sharpness (variance of the Laplacian, :func:`~cellvit_optimus.engine.wsi.tissue.tile_quality`)
    #: is below this carries the "blur" quality flag
    blur_flag_min: float = 15.0

    def __post_init__(self) -> None:
        for name in ("ood_review", "ood_out"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}={v!r} must be a finite number >= 0 or None")
        if self.ood_review is not None and self.ood_out is not None and self.ood_review > self.ood_out:
            raise ConfigError(f"ood_review={self.ood_review!r} must be <= ood_out={self.ood_out!r}")
        if not isinstance(self.max_set_size, int) or isinstance(self.max_set_size, bool) \
                or self.max_set_size < 1:
            raise ConfigError(f"max_set_size={self.max_set_size!r} must be an int >= 1")
        if not (isinstance(self.max_mean_nucleus_set_size, (int, float))
                and self.max_mean_nucleus_set_size >= 1):
            raise ConfigError(
                f"max_mean_nucleus_set_size={self.max_mean_nucleus_set_size!r} must be a number >= 1"
            )
        for name in ("np_entropy_max", "nt_entropy_max", "hv_consistency_min"):
            _check_fraction(name, getattr(self, name))
        for name in ("region_ood_fraction", "slide_ood_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                raise ConfigError(f"{name}={v!r} must be a fraction in (0, 1]")
        for name in ("region_review_fraction", "slide_review_fraction"):
            _check_fraction(name, getattr(self, name), allow_one=False)
        if not isinstance(self.require_ood, bool):
            raise ConfigError(f"require_ood={self.require_ood!r} must be a bool")
        _check_fraction("artefact_flag_fraction", self.artefact_flag_fraction)
        if not (isinstance(self.blur_flag_min, (int, float)) and math.isfinite(self.blur_flag_min)
                and self.blur_flag_min >= 0):
            raise ConfigError(f"blur_flag_min={self.blur_flag_min!r} must be a finite number >= 0")

    def with_ood(self, ood: Any) -> TagThresholds:
        """fill unset OOD thresholds from a fitted :class:`~.ood.MahalanobisOOD` (its ``thresholds``)."""
        t = ood.thresholds
        if t is None:
            raise ConfigError("the OOD detector has no thresholds: fit or load it first")
        return dataclasses.replace(
            self,
            ood_review=self.ood_review if self.ood_review is not None else float(t.review),
            ood_out=self.ood_out if self.ood_out is not None else float(t.out_of_domain),
        )

    def to_bytes(self) -> bytes:
        """the thresholds file's bytes (:meth:`load` reads them; write with
        ``cellvit_optimus.engine.io.atomic_write_bytes``)"""
        return json_bytes({"kind": _THRESHOLDS_KIND, "version": STATE_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TagThresholds:
        """load from JSON; keys not in the file keep their conservative defaults, unknown keys fail."""
        obj = read_json(path, _THRESHOLDS_KIND)
        fields = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in obj.items() if k not in ("kind", "version")}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ConfigError(f"{path}: unknown threshold field(s) {unknown}; allowed: {sorted(fields)}")
        try:
            return cls(**body)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def quality_flags(artefact_fraction: Sequence[float] | np.ndarray, blur: Sequence[float] | np.ndarray,
                  thresholds: TagThresholds) -> list[str]:
    """one :attr:`TileSignals.quality_flags` entry per tile: ``"pen/artefact"`` above
    ``thresholds.artefact_flag_fraction``, ``"blur"`` below ``thresholds.blur_flag_min``, comma-joined
    ("" for a clean tile). A tile whose sharpness was never measured (``inf``) is not flagged."""
    art = np.asarray(artefact_fraction, np.float64).ravel()
    sharp = np.asarray(blur, np.float64).ravel()
    if art.shape != sharp.shape:
        raise ValueError(f"artefact_fraction has {art.size} tiles, blur {sharp.size}")
    flags = []
    for a, b in zip(art.tolist(), sharp.tolist()):
        f = []
        if a > thresholds.artefact_flag_fraction:
            f.append("pen/artefact")
        if b < thresholds.blur_flag_min:
            f.append("blur")
        flags.append(",".join(f))
    return flags


@dataclass(frozen=True)
class TileSignals:
    """per-tile signals, each ``(N,)`` or None when not computed.

    ``quality_flags`` holds one string per tile ("" when none, e.g. "blur" or "pen").
    """

    ood_score: np.ndarray | None = None
    set_size: np.ndarray | None = None
    nucleus_set_size: np.ndarray | None = None
    np_entropy: np.ndarray | None = None
    nt_entropy: np.ndarray | None = None
    hv_consistency: np.ndarray | None = None
    quality_flags: Sequence[str] | None = None

    def __len__(self) -> int:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return len(v)
        return 0


def _arr(name: str, v: Any, n: int) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"signal {name} has shape {a.shape}, expected ({n},)")
    return a


def tag_tiles(signals: TileSignals, thresholds: TagThresholds) -> list[TagDecision]:
    """apply the tile rule (module docstring) to every tile."""
    n = len(signals)
    t = thresholds
    ood = _arr("ood_score", signals.ood_score, n)
    if ood is not None and (t.ood_review is None or t.ood_out is None):
        raise ConfigError(
            "ood_review/ood_out are not set: load them from a threshold file or the OOD state (with_ood)"
        )
    flags = signals.quality_flags
    if flags is not None and len(flags) != n:
        raise ValueError(f"quality_flags has {len(flags)} entries, expected {n}")
    vals = {name: _arr(name, getattr(signals, name), n) for name in
            ("set_size", "nucleus_set_size", "np_entropy", "nt_entropy", "hv_consistency")}
    out: list[TagDecision] = []
    for i in range(n):
        if ood is not None and np.isnan(ood[i]):
            out.append(TagDecision(Tag.REVIEW, "ood score is NaN"))
            continue
        if ood is not None and ood[i] > t.ood_out:  # type: ignore[operator]
            out.append(TagDecision(
                Tag.OUT_OF_DOMAIN, f"ood score {ood[i]:.3g} > out-of-domain threshold {t.ood_out:.3g}"))
            continue
        why: list[str] = []
        if ood is None:
            if t.require_ood:
                why.append("no ood score")
        elif ood[i] > t.ood_review:  # type: ignore[operator]
            why.append(f"ood score {ood[i]:.3g} > review threshold {t.ood_review:.3g}")
        if flags is not None and flags[i]:
            why.append(f"quality flag: {flags[i]}")
        v = vals["set_size"]
        if v is not None:
            if np.isnan(v[i]):
                why.append("set size is NaN")
            elif v[i] > t.max_set_size:
                why.append(f"label set size {int(v[i])} > {t.max_set_size}")
            elif v[i] < 1:
                why.append("empty label set")
        v = vals["nucleus_set_size"]
        # NaN: the tile has no nuclei, nothing to judge
        if v is not None and not np.isnan(v[i]) and v[i] > t.max_mean_nucleus_set_size:
            why.append(f"mean nucleus-type set size {v[i]:.2f} > {t.max_mean_nucleus_set_size:.2f}")
        for name, lim, label in (("np_entropy", t.np_entropy_max, "NP entropy"),
                                 ("nt_entropy", t.nt_entropy_max, "NT entropy")):
            v = vals[name]
            if v is not None:
                if np.isnan(v[i]):
                    why.append(f"{label} is NaN")
                elif v[i] > lim:
                    why.append(f"{label} {v[i]:.3f} > {lim:.3f}")
        v = vals["hv_consistency"]
        if v is not None and not np.isnan(v[i]) and v[i] < t.hv_consistency_min:
            why.append(f"HV consistency {v[i]:.3f} < {t.hv_consistency_min:.3f}")
        if why:
            out.append(TagDecision(Tag.REVIEW, "; ".join(why)))
        else:
            out.append(TagDecision(Tag.RELIABLE, "all signals within thresholds"))
    return out


def _cause(reason: str) -> str:
    """``"NP entropy 0.356 > 0.350; ..."`` -> ``"NP entropy"``: the first clause without its numbers."""
    clause = reason.split(";")[0].split(" > ")[0].split(" < ")[0].strip()
    return re.sub(r"(\s+[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?)+$", "", clause) or clause


#: a tile cause (:func:`_cause`) in words a pathologist reads without the signal's definition
_PLAIN = {
    "mean nucleus-type set size": "nucleus types ambiguous",
    "NT entropy": "nucleus types uncertain",
    "NP entropy": "nuclei hard to tell from background",
    "HV consistency": "nucleus boundaries inconsistent",
    "ood score": "tissue unlike the reference",
    "ood score is NaN": "tissue not scored against the reference",
    "no ood score": "tissue not scored against the reference",
    "label set size": "slide label ambiguous",
    "empty label set": "slide label ambiguous",
    "blur": "blurred",
    "pen/artefact": "pen mark or artefact",
}


def _plain(cause: str) -> str:
    if cause.startswith("quality flag: "):
        return ", ".join(_PLAIN.get(f, f) for f in cause[len("quality flag: "):].split(","))
    return _PLAIN.get(cause, cause)


def _summarise(decisions: Sequence[TagDecision], ood_fraction: float, review_fraction: float,
               what: str) -> TagDecision:
    n = len(decisions)
    if n == 0:
        return TagDecision(Tag.REVIEW, f"{what} has no tiles")
    n_ood = sum(d.tag is Tag.OUT_OF_DOMAIN for d in decisions)
    n_bad = sum(d.tag is not Tag.RELIABLE for d in decisions)
    if n_ood / n >= ood_fraction:
        return TagDecision(Tag.OUT_OF_DOMAIN, f"{n_ood} of {n} tiles out of domain: tissue unlike the "
                                              f"reference (threshold {ood_fraction:.0%} of the {what})")
    if n_bad / n > review_fraction:
        # the most frequent causes (each tile's first reason without its value, in plain words), with
        # the number of tiles for each, so the reader sees why without the signals' definitions
        counts = Counter(_plain(_cause(d.reason)) for d in decisions if d.tag is not Tag.RELIABLE)
        top = counts.most_common(2)
        causes = ", ".join(c if k == n_bad else f"{c} ({k})" for c, k in top)
        rest = n_bad - sum(k for _, k in top)
        if rest:  # the parts add up to the count they explain
            others = len(counts) - len(top)
            causes += f", {others} other cause{'s' if others > 1 else ''} ({rest})"
        return TagDecision(Tag.REVIEW, f"{n_bad} of {n} tiles uncertain: {causes}")
    return TagDecision(Tag.RELIABLE, f"{n - n_bad} of {n} tiles reliable")


def tag_regions(
    tile_decisions: Sequence[TagDecision],
    coords: np.ndarray,
    stride: int | tuple[int, int],
    thresholds: TagThresholds,
) -> tuple[np.ndarray, list[TagDecision]]:
    """group tiles into 8-connected regions and tag each; returns (region label per tile, decisions)."""
    regions = label_regions(coords, stride)
    if regions.shape[0] != len(tile_decisions):
        raise ValueError(f"{len(tile_decisions)} tile decisions but {regions.shape[0]} tile coords")
    n_reg = int(regions.max()) + 1 if regions.size else 0
    members: list[list[TagDecision]] = [[] for _ in range(n_reg)]
    for r, d in zip(regions.tolist(), tile_decisions):
        members[r].append(d)
    out = [_summarise(m, thresholds.region_ood_fraction, thresholds.region_review_fraction, "region")
           for m in members]
    return regions, out


def tag_slide(
    tile_decisions: Sequence[TagDecision],
    region_decisions: Sequence[TagDecision],
    thresholds: TagThresholds,
) -> TagDecision:
    """slide tag from its tiles and regions (module docstring)."""
    d = _summarise(tile_decisions, thresholds.slide_ood_fraction, thresholds.slide_review_fraction, "slide")
    if d.tag is Tag.RELIABLE:
        bad = [i for i, r in enumerate(region_decisions) if r.tag is not Tag.RELIABLE]
        if bad:
            return TagDecision(Tag.REVIEW, f"{len(bad)} of {len(region_decisions)} regions uncertain")
    return d


@dataclass(frozen=True)
class SlideTags:
    tiles: list[TagDecision]
    region_of_tile: np.ndarray
    regions: list[TagDecision]
    slide: TagDecision


def tag_all(
    signals: TileSignals,
    coords: np.ndarray,
    stride: int | tuple[int, int],
    thresholds: TagThresholds,
    shadow: ShadowMode | None = None,
    slide_id: str | None = None,
) -> SlideTags:
    """tiles, regions and slide in one call; with ``shadow`` the slide goes through shadow mode."""
    tiles = tag_tiles(signals, thresholds)
    reg_of, regions = tag_regions(tiles, coords, stride, thresholds)
    slide = tag_slide(tiles, regions, thresholds)
    if shadow is not None:
        if slide_id is None:
            raise ValueError("shadow mode needs a slide_id to count slides")
        slide = shadow.apply(slide_id, slide)
    return SlideTags(tiles, reg_of, regions, slide)


# --- cold start ------------------------------------------------------------------------------------

_process_lock = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """serialise read-modify-write of the site state across threads and (POSIX) processes."""
    with _process_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: threads only
            yield
            return
        with open(path.with_name(path.name + ".lock"), "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ShadowMode:
    """a site's cold-start counter, persisted in a JSON file that ``write`` replaces atomically.

    The first ``n_slides`` distinct slides of a site are shadow slides: their computed tag is logged
    and recorded in the state file, and the tag handed back is never reliable (reliable becomes review
    with reason ``"new site: first N slides stay in review (k of N); computed reliable (...)"``; review and
    out_of_domain stay, their reason prefixed the same way).
    A slide seen again keeps its place in the count.
    """

    def __init__(self, path: str | os.PathLike[str], site_id: str, n_slides: int = 30, *,
                 write: StateWriter) -> None:
        if not isinstance(n_slides, int) or isinstance(n_slides, bool) or n_slides < 0:
            raise ConfigError(f"n_slides={n_slides!r} must be an int >= 0")
        if not site_id:
            raise ConfigError("site_id must be a non-empty string")
        self.path = Path(path)
        self.site_id = site_id
        self.n_slides = n_slides
        #: replaces the state file atomically (the engine passes its ``io.atomic_write_bytes``)
        self.write = write

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"kind": _SITE_KIND, "version": STATE_VERSION, "site_id": self.site_id,
                    "shadow_slides": self.n_slides, "slides_seen": 0, "shadow_log": []}
        obj = read_json(self.path, _SITE_KIND)
        if obj.get("site_id") != self.site_id:
            from cellvit_optimus.engine.errors import StateMismatchError

            raise StateMismatchError(
                f"{self.path}: site state belongs to site_id={obj.get('site_id')!r}, not {self.site_id!r}"
            )
        return obj

    @property
    def slides_seen(self) -> int:
        with _file_lock(self.path):
            return int(self._read()["slides_seen"])

    @property
    def active(self) -> bool:
        """True while the next new slide would still be a shadow slide."""
        return self.slides_seen < self.n_slides

    def apply(self, slide_id: str, decision: TagDecision) -> TagDecision:
        """count the slide and return the tag to report for it (never reliable during shadow)."""
        with _file_lock(self.path):
            state = self._read()
            log: list[dict[str, Any]] = state["shadow_log"]
            seen_before = next((e for e in log if e["slide_id"] == slide_id), None)
            if seen_before is not None:
                k = int(seen_before["k"])
                seen_before.update(computed_tag=decision.tag.value, computed_reason=decision.reason)
            else:
                k = int(state["slides_seen"]) + 1
                state["slides_seen"] = k
                if k <= self.n_slides:
                    log.append({"k": k, "slide_id": slide_id, "computed_tag": decision.tag.value,
                                "computed_reason": decision.reason})
            state["shadow_slides"] = self.n_slides
            self.write(self.path, json_bytes(state))
        if k > self.n_slides:
            return decision
        logger.info("shadow mode %d/%d site=%s slide=%s computed=%s (%s)", k, self.n_slides,
                    self.site_id, slide_id, decision.tag.value, decision.reason)
        prefix = shadow_prefix(k, self.n_slides)
        if decision.tag is Tag.RELIABLE:
            return TagDecision(Tag.REVIEW, f"{prefix}; computed reliable ({decision.reason})")
        return TagDecision(decision.tag, f"{prefix}; {decision.reason}")


def shadow_prefix(k: int, n_slides: int) -> str:
    """the reason's opening for the ``k``-th of a new site's ``n_slides`` shadow slides"""
    return f"new site: first {n_slides} slides stay in review ({k} of {n_slides})"
