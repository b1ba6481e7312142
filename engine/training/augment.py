"""Training-time augmentation of annotated nuclei crops (numpy, CPU).

Sits in the nuclei training loop (:mod:`.train_e2e`) between sampling a crop and computing its
NP/HV/NT targets. Geometric transforms (rot90, flips, scale jitter) act on the image and its instance
and type maps alike; photometric ones (HED stain jitter, brightness/contrast, Gaussian blur) on the
image only. Every function takes an explicit ``numpy.random.Generator`` so a training step is
reproducible from ``(seed, step)`` alone, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellvit_optimus.engine.errors import ConfigError

__all__ = ("AugmentConfig", "augment", "geometric", "hed_jitter", "resize_crop")

# Ruifrok & Johnston's optical-density vectors (haematoxylin, eosin, DAB), as scikit-image's rgb2hed
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of each augmentation; 0 switches one off."""

    #: HED stain jitter: per-channel scale ~ U(1 - s, 1 + s) and shift ~ U(-s, s) in optical density
    hed_sigma: float = 0.05
    #: brightness shift ~ U(-b, b) (fraction of 255) and contrast factor ~ U(1 - c, 1 + c)
    brightness: float = 0.1
    contrast: float = 0.15
    #: probability of a Gaussian blur with sigma ~ U(0.3, blur_sigma_max) pixels
    blur_p: float = 0.15
    blur_sigma_max: float = 1.2
    #: scale jitter: the crop is read at ``out * f`` pixels, f ~ U(1 - s, 1 + s), and resized to ``out``
    scale_jitter: float = 0.15
    #: probability of a lower-resolution scan: the image box-downsampled by ``lowres_factor`` and
    #: bilinearly upsampled back, as a 20x slide looks at a 40x model's resolution (0: off, and the
    #: random stream of every other augmentation stays as it was)
    lowres_p: float = 0.0
    lowres_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("hed_sigma", "brightness", "contrast", "scale_jitter"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        if not 0.0 <= self.blur_p <= 1.0:
            raise ConfigError(f"blur_p={self.blur_p} must be a probability in [0, 1]")
        if self.blur_sigma_max < 0.3:
            raise ConfigError(f"blur_sigma_max={self.blur_sigma_max} must be >= 0.3")
        if not 0.0 <= self.lowres_p <= 1.0:
            raise ConfigError(f"lowres_p={self.lowres_p} must be a probability in [0, 1]")
        if not 1.0 < self.lowres_factor <= 4.0:
            raise ConfigError(f"lowres_factor={self.lowres_factor} must be in (1, 4]")


def resize_crop(image: np.ndarray, inst: np.ndarray, types: np.ndarray, out: int) -> tuple[np.ndarray, ...]:
    """Resize a square crop to ``out`` pixels: bilinear image, nearest-neighbour labels."""
    from PIL import Image

    if image.shape[0] == out and image.shape[1] == out:
        return image, inst, types
    img = np.asarray(Image.fromarray(image).resize((out, out), Image.Resampling.BILINEAR))
    ins = np.asarray(Image.fromarray(inst.astype(np.int32)).resize((out, out), Image.Resampling.NEAREST))
    typ = np.asarray(Image.fromarray(types.astype(np.uint8)).resize((out, out), Image.Resampling.NEAREST))
    return np.ascontiguousarray(img), ins.astype(np.int32), typ.astype(np.uint8)


def geometric(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same random rot90 (k = 0..3) and horizontal flip applied to every array (H, W[, C])."""
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        b = np.rot90(a, k, axes=(0, 1))
        if flip:
            b = b[:, ::-1]
        out.append(np.ascontiguousarray(b))
    return tuple(out)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Perturb the haematoxylin / eosin / DAB optical densities of a uint8 RGB image (Tellez et al.)."""
    if sigma <= 0:
        return image
    rgb = np.maximum(image.astype(np.float64), 1.0) / 255.0
    od = -np.log(rgb) @ _HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3)
    od = od * alpha + beta
    out = np.exp(-(od @ _RGB_FROM_HED)) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, inst: np.ndarray, types: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random geometric + photometric augmentation of one crop (image uint8 (H, W, 3), maps (H, W))."""
    image, inst, types = geometric(rng, image, inst, types)
    image = hed_jitter(image, rng, cfg.hed_sigma)
    if cfg.brightness > 0 or cfg.contrast > 0:
        x = image.astype(np.float32)
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        b = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
        mean = x.mean()
        image = np.clip((x - mean) * c + mean + b, 0, 255).astype(np.uint8)
    if cfg.blur_p > 0 and rng.random() < cfg.blur_p:
        from scipy.ndimage import gaussian_filter

        s = rng.uniform(0.3, cfg.blur_sigma_max)
        image = gaussian_filter(image.astype(np.float32), sigma=(s, s, 0)).round().clip(0, 255).astype(np.uint8)
    if cfg.lowres_p > 0 and rng.random() < cfg.lowres_p:
        image = lower_resolution(image, cfg.lowres_factor)
    return image, inst, types


def lower_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` as a scan ``factor`` times coarser would give it after resampling back to this size:
    box-downsampled (what a coarser sensor integrates), then bilinearly upsampled (what the engine's
    resampling does); uint8 (H, W, 3) in and out"""
    from PIL import Image

    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, round(w / factor)), max(1, round(h / factor))),
                                          Image.Resampling.BOX)
    return np.ascontiguousarray(np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)))
