"""Classical nuclei baseline: Otsu threshold on the haematoxylin channel + distance-transform watershed.

What the bundled nuclei model must beat (tests/engine/pipeline/test_nuclei.py, bench/eval_nuclei.py). Plain
scikit-image / scipy, parameters in micrometres so it works at any MPP:

1. haematoxylin optical density by colour deconvolution (``skimage.color.rgb2hed``), Gaussian blur;
2. foreground = H above its Otsu threshold, holes filled, objects smaller than 6 um^2 removed;
3. distance transform; markers = its local maxima at least 2 um apart;
4. watershed of the negated distance inside the foreground.
"""

from __future__ import annotations

import numpy as np

#: smallest object kept (um^2) and the least distance between two markers (um)
MIN_AREA_UM2 = 6.0
MIN_DISTANCE_UM = 2.0


def otsu_watershed(image: np.ndarray, mpp: float = 0.25) -> np.ndarray:
    """(H, W) int32 instance map of an RGB uint8 image at ``mpp`` microns per pixel."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    h = gaussian(rgb2hed(image[..., :3])[..., 0], sigma=0.25 / mpp)
    fg = h > threshold_otsu(h)
    fg = ndi.binary_fill_holes(fg)
    lab, n = ndi.label(fg)
    small = np.bincount(lab.ravel(), minlength=n + 1) < MIN_AREA_UM2 / (mpp * mpp)
    small[0] = False
    fg &= ~small[lab]
    dist = ndi.distance_transform_edt(fg)
    lab, _ = ndi.label(fg)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(MIN_DISTANCE_UM / mpp))), labels=lab, exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    inst = watershed(-dist, markers, mask=fg)
    return inst.astype(np.int32)
