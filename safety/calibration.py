"""Temperature scaling, calibration errors (ECE/MCE) and reliability diagrams.

A classifier head's logits are divided by one temperature fitted on a calibration split by
minimising the negative log-likelihood; the calibrated probabilities then feed conformal
prediction and the tag rule. The temperature is saved with the model and backbone ids it belongs to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from cellvit_optimus.engine.errors import ConfigError

from ._state import STATE_VERSION, check_ids, json_bytes, read_json

__all__ = ("TemperatureScaler", "CalibrationReport", "calibration_errors", "reliability_diagram")

_KIND = "temperature_scaling"


def _check_logits_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {z.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    return z, y.astype(np.int64)


class TemperatureScaler:
    """one temperature ``T`` for all classes: ``p = softmax(logits / T)``.

    Probabilities can be passed as ``np.log(p)`` (softmax is shift invariant, so log-probabilities
    are valid logits).
    """

    def __init__(self, temperature: float = 1.0, bounds: tuple[float, float] = (0.05, 20.0)) -> None:
        if not (np.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature={temperature!r} must be a positive finite number")
        if not (0 < bounds[0] < bounds[1]):
            raise ConfigError(f"bounds={bounds!r} must satisfy 0 < low < high")
        self.temperature = float(temperature)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.model_id: str | None = None
        self.backbone_id: str | None = None

    @staticmethod
    def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
        """mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
        z, y = _check_logits_labels(logits, labels)
        lp = log_softmax(z / temperature, axis=1)
        return float(-lp[np.arange(y.size), y].mean())

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> TemperatureScaler:
        """fit ``T`` by minimising NLL over ``log T`` (bounded, so it cannot run off to 0 or inf)."""
        z, y = _check_logits_labels(logits, labels)
        if y.size == 0:
            raise ValueError("cannot fit a temperature on an empty calibration split")
        lo, hi = np.log(self.bounds[0]), np.log(self.bounds[1])
        res = minimize_scalar(
            lambda lt: self.nll(z, y, float(np.exp(lt))), bounds=(lo, hi), method="bounded",
            options={"xatol": 1e-4},
        )
        self.temperature = float(np.exp(res.x))
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """calibrated probabilities ``(N, K)`` float64."""
        z = np.asarray(logits, dtype=np.float64)
        return softmax(z / self.temperature, axis=-1)

    def to_bytes(self, *, model_id: str, backbone_id: str) -> bytes:
        """the state file's bytes, with the ids it is valid for (write them with
        ``cellvit_optimus.engine.io.atomic_write_bytes``; :meth:`load` reads them)"""
        return json_bytes({"kind": _KIND, "version": STATE_VERSION, "model_id": model_id,
                           "backbone_id": backbone_id, "temperature": self.temperature,
                           "bounds": list(self.bounds)})

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, model_id: str | None = None, backbone_id: str | None = None
    ) -> TemperatureScaler:
        """load a saved temperature; refuses (StateMismatchError) one fitted for other ids."""
        obj = read_json(path, _KIND)
        check_ids(path, _KIND, obj, model_id=model_id, backbone_id=backbone_id)
        out = cls(obj["temperature"], tuple(obj["bounds"]))  # type: ignore[arg-type]
        out.model_id, out.backbone_id = obj["model_id"], obj["backbone_id"]
        return out


@dataclass(frozen=True)
class CalibrationReport:
    """top-label calibration: ``ece`` and ``mce`` in [0, 1], per-bin ``confidence``, ``accuracy``
    and ``count`` (``(n_bins,)``; empty bins have NaN confidence/accuracy)."""

    ece: float
    mce: float
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def calibration_errors(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> CalibrationReport:
    """expected and maximum calibration error of the top-label confidence, equal-width bins."""
    if n_bins < 1:
        raise ConfigError(f"n_bins={n_bins!r} must be >= 1")
    p, y = _check_logits_labels(probs, labels)
    if y.size == 0:
        raise ValueError("cannot compute calibration errors on an empty split")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bins (lo, hi]; confidence exactly 0 cannot occur for a top label of >= 1 class
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        c_mean = np.bincount(idx, weights=conf, minlength=n_bins) / count
        a_mean = np.bincount(idx, weights=correct, minlength=n_bins) / count
    gap = np.abs(a_mean - c_mean)
    nz = count > 0
    ece = float(np.sum(gap[nz] * count[nz]) / y.size)
    mce = float(gap[nz].max())
    return CalibrationReport(ece, mce, c_mean, a_mean, count)


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    n_bins: int = 15,
    title: str = "",
    size: int = 420,
) -> CalibrationReport:
    """draw a reliability diagram (accuracy per confidence bin against the diagonal) as a PNG.

    Drawn with Pillow so the package needs no plotting library. Bars are per-bin accuracy, the red
    outline the per-bin mean confidence, the dashed line perfect calibration.
    """
    from PIL import Image, ImageDraw

    rep = calibration_errors(probs, labels, n_bins)
    m = 40  # margin in pixels
    w = h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = m, m // 2 + 10, w - m // 2, h - m

    def px(cx: float, cy: float) -> tuple[float, float]:
        return x0 + cx * (x1 - x0), y1 - cy * (y1 - y0)

    for k in range(n_bins):
        if rep.count[k] == 0:
            continue
        lo, hi = k / n_bins, (k + 1) / n_bins
        d.rectangle([px(lo, rep.accuracy[k]), px(hi, 0)], fill=(70, 110, 200), outline=(30, 50, 120))
        d.rectangle([px(lo, rep.confidence[k]), px(hi, 0)], outline=(220, 40, 40))
    steps = 40
    for i in range(0, steps, 2):  # dashed diagonal
        d.line([px(i / steps, i / steps), px((i + 1) / steps, (i + 1) / steps)], fill="gray", width=1)
    d.rectangle([x0, y0, x1, y1], outline="black")
    for t in (0.0, 0.5, 1.0):
        d.text((px(t, 0)[0] - 8, y1 + 4), f"{t:.1f}", fill="black")
        d.text((x0 - 26, px(0, t)[1] - 6), f"{t:.1f}", fill="black")
    d.text((x0 + 4, y1 + 18), "confidence", fill="black")
    d.text((x0 + 4, 4), f"{title}  ECE={rep.ece:.3f}  MCE={rep.mce:.3f}".strip(), fill="black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return rep
