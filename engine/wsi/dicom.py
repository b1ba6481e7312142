"""The DICOM VL whole-slide image reader backend (pydicom; frames decoded with Pillow / imagecodecs)."""

from __future__ import annotations

import io
import logging
import math
import threading
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.errors import CorruptSlideError, CorruptTilesError, UnsupportedFormatError
from cellvit_optimus.engine.wsi.backend import Backend, plausible_mpp, rgb
from cellvit_optimus.engine.wsi.jpegcheck import strict_decode

__all__ = ("DicomBackend", "decode_frame")

log = logging.getLogger(__name__)


class DicomBackend(Backend):
    """DICOM VL whole-slide images (one file per level) read with pydicom.

    wsidicom and OpenSlide 4 refuse files without the WSI ``ImageType`` or pixel-spacing attributes that
    some exporters omit; this reader needs only the total pixel matrix, the frame size and (for
    sparse tiling) the per-frame plane positions. Frames are JPEG/JPEG 2000 and decoded with Pillow /
    imagecodecs, which honour the codestream's own colour transform: some files say RGB in the
    header while the JPEG data is YCbCr, and decoding by the header would give false colours.
    """

    name = "dicom"

    def __init__(self, path: Path) -> None:
        import pydicom

        ds = pydicom.dcmread(str(path), defer_size="1 KB")
        if "TotalPixelMatrixColumns" not in ds or "PixelData" not in ds:
            raise UnsupportedFormatError(path, "DICOM file is not a tiled whole-slide image "
                                         "(no TotalPixelMatrixColumns / PixelData)")
        self._ds = ds
        self._path = path
        W, H = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        self._fw, self._fh = int(ds.Columns), int(ds.Rows)
        if min(W, H, self._fw, self._fh) <= 0:
            raise CorruptSlideError(path, f"total pixel matrix {W} x {H} px of {self._fw} x {self._fh} px "
                                    "frames: no image")
        self.level_dimensions = ((W, H),)
        self.level_downsamples = (1.0,)
        self.vendor = str(ds.get("Manufacturer", "") or "dicom").lower() or "dicom"
        self.properties = {"dicom.sop_class_uid": str(ds.get("SOPClassUID", "")),
                           "dicom.transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
                           "dicom.photometric": str(ds.get("PhotometricInterpretation", ""))}
        self.mpp = self._find_mpp(ds, W, H)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._n_frames = int(ds.get("NumberOfFrames", 1))
        self._frames = self._frame_index(ds)

    @staticmethod
    def _find_mpp(ds, W, H):
        try:
            sp = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            # PixelSpacing is (row spacing, column spacing) in mm
            my, mx = plausible_mpp(float(sp[0]) * 1000), plausible_mpp(float(sp[1]) * 1000)
            if mx and my:
                return (mx, my)
        except (AttributeError, IndexError, KeyError):
            pass
        vw, vh = ds.get("ImagedVolumeWidth"), ds.get("ImagedVolumeHeight")
        if vw and vh:  # mm across the total pixel matrix
            mx, my = plausible_mpp(float(vw) * 1000 / W), plausible_mpp(float(vh) * 1000 / H)
            if mx and my:
                return (mx, my)
        return None

    def _frame_index(self, ds) -> dict[tuple[int, int], int]:
        """(column, row) of each frame's top-left pixel -> frame number"""
        n = int(ds.get("NumberOfFrames", 1))
        index: dict[tuple[int, int], int] = {}
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and ds.get("DimensionOrganizationType", "") != "TILED_FULL":
            for i, item in enumerate(per_frame):
                try:
                    pos = item.PlanePositionSlideSequence[0]
                    col = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
                    row = int(pos.RowPositionInTotalImagePixelMatrix) - 1
                except (AttributeError, IndexError):
                    break
                index[(col, row)] = i
            if len(index) == n:
                return index
            index.clear()
        cols = math.ceil(self.level_dimensions[0][0] / self._fw)
        rows = math.ceil(self.level_dimensions[0][1] / self._fh)
        if n < cols * rows:
            # frames without positions tile the whole matrix; fewer cannot (a header that claims a
            # far larger image than the file holds would otherwise be read as blank glass, slowly)
            W, H = self.level_dimensions[0]
            raise CorruptSlideError(self._path, f"{n} frames of {self._fw} x {self._fh} px without positions "
                                    f"cannot tile a {W} x {H} px matrix (it needs {cols * rows})")
        row_major = {((i % cols) * self._fw, (i // cols) * self._fh): i for i in range(n)}
        if ds.get("DimensionOrganizationType", "") == "TILED_FULL" or n != cols * rows or cols < 2 or rows < 2:
            return row_major
        # No positions and no declared organisation: exporters exist that write frames column by
        # column. Pick the order under which neighbouring frames continue each other across seams.
        col_major = {((i // rows) * self._fw, (i % rows) * self._fh): i for i in range(n)}
        self._frames = {}
        scores = [self._seam_score(order, cols, rows) for order in (row_major, col_major)]
        if scores[1] < scores[0]:
            log.warning("%s: no frame positions; frames are in column-major order (seam mismatch "
                        "%.1f vs %.1f grey levels row-major)", self._path, scores[1], scores[0])
            return col_major
        return row_major

    def _seam_score(self, order: dict[tuple[int, int], int], cols: int, rows: int) -> float:
        """mean absolute grey-level jump across interior frame seams (sampled)"""
        diffs = []
        for r in range(rows - 1):
            for c in range(cols - 1):
                a = self._frame(order[(c * self._fw, r * self._fh)])
                right = self._frame(order[((c + 1) * self._fw, r * self._fh)])
                below = self._frame(order[(c * self._fw, (r + 1) * self._fh)])
                diffs.append(np.abs(a[:, -1].astype(np.int16) - right[:, 0]).mean())
                diffs.append(np.abs(a[-1].astype(np.int16) - below[0]).mean())
                if len(diffs) >= 64:
                    return float(np.mean(diffs))
        return float(np.mean(diffs)) if diffs else 0.0

    def _frame(self, i: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(i)
        if hit is not None:
            return hit
        from pydicom.encaps import get_frame

        try:
            data = bytes(get_frame(self._ds.PixelData, i, number_of_frames=self._n_frames))
        except Exception as exc:
            raise CorruptSlideError(self._path, f"frame {i} cannot be read: {exc}") from exc
        if data[:2] == b"\xff\xd8":  # JPEG: Pillow decodes damaged data silently, so check it first
            try:
                strict_decode(data)
            except (ValueError, RuntimeError) as exc:
                raise CorruptTilesError(self._path,
                                        f"corrupt JPEG frame {i} of {self._n_frames}: {exc}") from exc
        try:
            arr = decode_frame(data)
        except Exception as exc:
            raise CorruptSlideError(self._path, f"frame {i} cannot be decoded: {exc}") from exc
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[i] = arr
        return arr

    def blank(self, x, y, level, w, h):
        fw, fh = self._fw, self._fh
        return not any((fx, fy) in self._frames for fy in range((y // fh) * fh, y + h, fh)
                       for fx in range((x // fw) * fw, x + w, fw))

    def read(self, x, y, level, w, h):
        out = np.full((h, w, 3), 255, np.uint8)  # sparse tiling: absent frames are background
        fw, fh = self._fw, self._fh
        for fy in range((y // fh) * fh, y + h, fh):
            for fx in range((x // fw) * fw, x + w, fw):
                i = self._frames.get((fx, fy))
                if i is None:
                    continue
                tile = self._frame(i)
                x0, y0 = max(x, fx), max(y, fy)
                x1, y1 = min(x + w, fx + tile.shape[1]), min(y + h, fy + tile.shape[0])
                if x1 > x0 and y1 > y0:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - fy:y1 - fy, x0 - fx:x1 - fx]
        return out


def decode_frame(data: bytes) -> np.ndarray:
    """RGB uint8 of one JPEG / JPEG 2000 frame, decoded by its codestream (not the DICOM header's colour)"""
    if data[:4] in (b"\x00\x00\x00\x0c", b"\xff\x4f\xff\x51"):  # JPEG 2000 (jp2 box or raw codestream)
        import imagecodecs

        return rgb(imagecodecs.jpeg2k_decode(data))
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return rgb(np.asarray(im.convert("RGB")))
