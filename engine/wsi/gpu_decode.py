"""GPU read path: raw JPEG tiles out of a TIFF/SVS, decoded with nvJPEG, regions built on the GPU.

An optional alternative to :meth:`Slide.read_tiles <cellvit_optimus.engine.wsi.slide.Slide.read_tiles>`
for GPU runs whose bottleneck is CPU JPEG decoding. The compressed tile streams are read with tifffile
(``page.dataoffsets`` / ``databytecounts``), completed into stand-alone JPEG files
(:func:`splice_jpeg_tables`), decoded in batches by nvJPEG, through DALI (``fn.decoders.image`` on the
``mixed`` device) or through torchvision (``torchvision.io.decode_jpeg(device="cuda")``, which needs
nothing beyond torch's own image), copied into the requested regions on the GPU
(:func:`assemble_regions`), and resampled
with antialiasing to the tile size (:func:`resample`: Pillow's filters as matrices). The result is a
``(N, size, size, 3)`` uint8 torch tensor on the GPU, the CPU path's pixels up to decoder rounding.

Nothing here is picked blindly: :func:`choose_decoder` times both paths on a few batches of the slide at
hand and returns ``"gpu"`` only when the GPU path is measurably faster.

Why the JPEG surgery: SVS tiles are *abbreviated* streams (no quantisation or Huffman tables; those live
once in the page's JPEGTables tag), which a stand-alone decoder cannot read. And Aperio writes its
tiles with untransformed RGB components (TIFF photometric RGB) but with component ids 1, 2, 3 and no
Adobe marker, which decoders read as YCbCr, giving false colours; an Adobe APP14 segment with
transform 0 tells every conforming decoder (libjpeg-turbo, Pillow, nvJPEG) the components are RGB.

DALI, cuCIM, cupy and torchvision are imported only when a GPU decoder is built: importing this module
needs none of them, and asking for one that is missing raises :class:`BackendUnavailableError` naming the
package.

Streams: a decoder hands out tensors that are complete on the stream current at the call (DALI's copy runs
on a stream of its own and is waited for before DALI may reuse its buffer; torchvision makes the current
stream wait for its decoder's stream). Callers that must not wait behind other work on the device (the
read path's reader threads, whose default stream the backbone's hand-offs also use) run the reader under a
stream of their own (:func:`reader_stream`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError, CorruptSlideError, UnsupportedFormatError

if TYPE_CHECKING:
    import torch

    from cellvit_optimus.engine.wsi.slide import Slide

__all__ = (
    "GPU_DECODERS",
    "DecoderName",
    "DecoderChoice",
    "TileGeometry",
    "RawJpegTiles",
    "GpuTileReader",
    "gpu_decoders_available",
    "splice_jpeg_tables",
    "decode_jpeg_cpu",
    "assemble_regions",
    "resample",
    "resample_matrix",
    "choose_decoder",
    "gpu_array_to_tensor",
    "reader_stream",
)

log = logging.getLogger(__name__)

DecoderName = Literal["auto", "dali", "cucim", "nvjpeg", "cpu"]
#: GPU decoders in preference order ("cpu" is imagecodecs on the host: the reference, and for tests);
#: "nvjpeg" (torchvision's) comes last: it is in every CUDA torch image, so "auto" falls back on it
GPU_DECODERS: tuple[str, ...] = ("dali", "cucim", "nvjpeg")
#: TIFF compression code of JPEG ("new-style" JPEG, tag value 7)
_TIFF_JPEG = 7
_PHOTOMETRIC_RGB = 2
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
#: Adobe APP14, version 100, no flags, transform 0: "the three components are RGB, do not convert"
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
#: the GPU path must beat the CPU path by this factor to be chosen (timing noise, set-up cost)
MIN_SPEEDUP = 1.1
#: mean absolute difference (grey levels) above which the GPU path's pixels are refused: IDCT rounding
#: differs by well under one level; a decoder that ignores the Adobe marker (YCbCr read as RGB) by tens
MAX_MEAN_ABS_DIFF = 2.0


# -- JPEG streams -----------------------------------------------------------------------------------


def splice_jpeg_tables(tile: bytes, tables: bytes | None = None, *, rgb: bool = False) -> bytes:
    """a stand-alone JPEG file from an (abbreviated) TIFF tile stream.

    Parameters
    ----------
    tile : the tile's bytes as stored (SOI ... EOI), possibly without DQT/DHT segments
    tables : the page's JPEGTables tag (SOI, DQT/DHT segments, EOI), or None when the tiles are complete
    rgb : the components are untransformed RGB (TIFF photometric RGB): add an Adobe APP14 segment with
        transform 0 unless the stream has an APP14 of its own

    The result is SOI + [APP14] + the tables' segments + the tile's segments and scan; the tile's own
    tables, if any, come later and override the shared ones, as in an abbreviated TIFF stream.
    """
    if tile[:2] != _SOI:
        raise ValueError(f"tile stream does not start with SOI (got {tile[:2].hex() or 'nothing'}, "
                         f"{len(tile)} bytes)")
    body = b""
    if tables:
        if tables[:2] != _SOI or tables[-2:] != _EOI:
            raise ValueError(f"JPEGTables must be SOI ... EOI, got {tables[:2].hex()} ... {tables[-2:].hex()} "
                             f"({len(tables)} bytes)")
        body = tables[2:-2]
    from cellvit_optimus.kernels.jpeg import jpeg_segments

    app14 = _ADOBE_RGB if rgb and all(m != 0xEE for m, _, _ in jpeg_segments(tile)) else b""
    return _SOI + app14 + body + tile[2:]


def decode_jpeg_cpu(streams: Sequence[bytes]) -> np.ndarray:
    """decode equal-sized JPEG files with libjpeg-turbo (imagecodecs) into ``(n, h, w, 3)`` uint8: the
    CPU reference of the GPU decoders (honours Adobe APP14 like nvJPEG)"""
    import imagecodecs

    return np.stack([imagecodecs.jpeg8_decode(s) for s in streams]) if streams else np.zeros((0, 0, 0, 3), np.uint8)


# -- tile geometry and region assembly --------------------------------------------------------------


@dataclass(frozen=True)
class TileGeometry:
    """the tile grid of one pyramid level: image size and tile size in level pixels (row-major tiles)"""

    width: int
    height: int
    tile_width: int
    tile_height: int

    def __post_init__(self) -> None:
        if min(self.width, self.height, self.tile_width, self.tile_height) <= 0:
            raise ValueError(f"geometry sizes must be positive, got {self}")

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_height)

    def tiles_for(self, x: int, y: int, w: int, h: int) -> list[int]:
        """row-major indices of the tiles that hold pixels of region ``(x, y, w, h)`` (clipped to the image)"""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return []
        c0, c1 = x0 // self.tile_width, (x1 - 1) // self.tile_width
        r0, r1 = y0 // self.tile_height, (y1 - 1) // self.tile_height
        return [r * self.cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def assemble_regions(tiles: Mapping[int, Any], geometry: TileGeometry, origins: Sequence[tuple[int, int]],
                     size: tuple[int, int], out: Any) -> Any:
    """copy decoded tiles into regions; works on numpy arrays and torch tensors alike.

    Parameters
    ----------
    tiles : tile index -> ``(tile_height, tile_width, 3)`` decoded tile (full tile size, as stored)
    geometry : the level's tile grid
    origins : region top-left corners ``(x, y)`` in level pixels (may lie partly outside the image)
    size : region ``(w, h)`` in level pixels
    out : ``(N, h, w, 3)`` array to fill, already white (255) where no tile covers it (beyond the image)

    Returns ``out``. Tile padding beyond the image edge is never copied.
    """
    w, h = size
    g = geometry
    for i, (x, y) in enumerate(origins):
        for t in g.tiles_for(x, y, w, h):
            r, c = divmod(t, g.cols)
            tx, ty = c * g.tile_width, r * g.tile_height
            # intersection of region, tile and image, in level pixels
            ix0, iy0 = max(x, tx), max(y, ty)
            ix1 = min(x + w, tx + g.tile_width, g.width)
            iy1 = min(y + h, ty + g.tile_height, g.height)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            out[i, iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tiles[t][iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx]
    return out


def _filter_lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _filter_bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def resample_matrix(in_size: int, out_size: int, kind: Literal["lanczos", "bicubic"]) -> np.ndarray:
    """``(out_size, in_size)`` float64 weights of Pillow's separable resampling along one axis.

    Pillow's ``precompute_coeffs``: the filter (Lanczos-3 or bicubic a=-0.5) is stretched by the scale
    factor when reducing, which is the antialiasing; each output pixel's weights are normalised to 1.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    filt, support = (_filter_lanczos, 3.0) if kind == "lanczos" else (_filter_bicubic, 2.0)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    m = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        w = filt((np.arange(lo, hi) - centre + 0.5) / filterscale)
        total = w.sum()
        m[o, lo:hi] = w / total if total != 0 else w
    return m


def resample(batch: torch.Tensor, size: int) -> torch.Tensor:
    """antialiased resampling of ``(N, h, w, 3)`` uint8 tiles to ``(N, size, size, 3)`` on their device.

    The GPU twin of :func:`~.slide.resize_batch`: Pillow's filters (Lanczos when reducing, bicubic when
    enlarging, support widened by the scale factor) as two weight matrices, applied as batched matmuls
    with Pillow's pass order and rounding (horizontal, round to uint8, vertical, round). It agrees with
    Pillow to within rounding (mostly exact, never more than a grey level or two). torch's own
    ``interpolate(mode="bicubic", antialias=True)`` differs from Pillow's Lanczos by about one grey level
    on average on H&E, too much for a path that must give the CPU path's pixels.
    """
    import torch

    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected (N, h, w, 3) tiles, got shape {tuple(batch.shape)}")
    n, h, w = (int(v) for v in batch.shape[:3])
    if (h, w) == (size, size):
        return batch
    kind: Literal["lanczos", "bicubic"] = "lanczos" if (h >= size and w >= size) else "bicubic"
    x = batch.to(torch.float32)
    if w != size:
        mx = torch.as_tensor(resample_matrix(w, size, kind), dtype=torch.float32, device=batch.device)
        x = torch.einsum("nhwc,ow->nhoc", x, mx).round_().clamp_(0, 255)
    if h != size:
        my = torch.as_tensor(resample_matrix(h, size, kind), dtype=torch.float32, device=batch.device)
        x = torch.einsum("nhwc,oh->nowc", x, my).round_().clamp_(0, 255)
    return x.to(torch.uint8).contiguous()


# -- raw tiles of a TIFF ----------------------------------------------------------------------------


class RawJpegTiles:
    """the compressed JPEG tiles of a tiled TIFF/SVS, as stand-alone JPEG files, read with tifffile.

    ``level(dims)`` finds the pyramid level of the given ``(width, height)``; ``streams(level, idx)``
    returns the spliced tile files (``None`` for a sparse tile of zero bytes). Thread-safe reads.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tf = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise UnsupportedFormatError(self.path, f"GPU decode needs a TIFF-based slide: {exc}") from exc
        self._lock = threading.Lock()
        series = self._tf.series[0]
        self._pages = [lvl.keyframe for lvl in series.levels]

    def close(self) -> None:
        self._tf.close()

    def level_index(self, dims: tuple[int, int]) -> int:
        """index of the tifffile level with ``(width, height) == dims``"""
        for i, p in enumerate(self._pages):
            if (int(p.imagewidth), int(p.imagelength)) == tuple(dims):
                return i
        raise UnsupportedFormatError(self.path, f"no TIFF level of size {dims[0]}x{dims[1]} (have "
                                     f"{[(p.imagewidth, p.imagelength) for p in self._pages]})")

    def check_level(self, index: int) -> TileGeometry:
        """the level's tile grid; raises UnsupportedFormatError unless it is JPEG-tiled, RGB or YCbCr"""
        p = self._pages[index]
        if not p.is_tiled or int(p.compression) != _TIFF_JPEG or p.samplesperpixel != 3 or int(p.planarconfig) != 1:
            raise UnsupportedFormatError(
                self.path, f"GPU decode needs 3-sample contiguous JPEG tiles; level {index} has "
                f"tiled={p.is_tiled}, compression={int(p.compression)}, samples={p.samplesperpixel}")
        return TileGeometry(int(p.imagewidth), int(p.imagelength), int(p.tilewidth), int(p.tilelength))

    def streams(self, index: int, tile_indices: Sequence[int]) -> list[bytes | None]:
        p = self._pages[index]
        tables = p.jpegtables
        rgb = int(p.photometric) == _PHOTOMETRIC_RGB
        offsets, counts = p.dataoffsets, p.databytecounts
        fh = self._tf.filehandle
        out: list[bytes | None] = []
        with self._lock:
            for t in tile_indices:
                if not 0 <= t < len(offsets):
                    raise ValueError(f"tile index {t} out of range (level {index} has {len(offsets)} tiles)")
                if counts[t] == 0:
                    out.append(None)
                    continue
                fh.seek(offsets[t])
                raw = fh.read(counts[t])
                try:
                    out.append(splice_jpeg_tables(raw, tables, rgb=rgb))
                except ValueError as exc:
                    raise CorruptSlideError(self.path, f"tile {t} of level {index}: {exc}") from exc
        return out


# -- decoders ---------------------------------------------------------------------------------------


class _StreamDecoder(Protocol):
    def __call__(self, streams: Sequence[bytes]) -> torch.Tensor: ...


def _cuda_ok() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_decoders_available() -> tuple[str, ...]:
    """names of the GPU decoders usable here (a CUDA device and the package), in preference order"""
    if not _cuda_ok():
        return ()
    names = []
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        names.append("dali")
    if importlib.util.find_spec("cucim") is not None and importlib.util.find_spec("cupy") is not None:
        names.append("cucim")
    if importlib.util.find_spec("torchvision") is not None:
        names.append("nvjpeg")
    return tuple(names)


def _require(decoder: str) -> None:
    if not _cuda_ok():
        raise BackendUnavailableError(f"decoder={decoder!r} needs a CUDA device; torch.cuda.is_available() is False")
    if decoder not in gpu_decoders_available():
        pkg = {"dali": "nvidia-dali-cuda130", "cucim": "cucim-cu13 and cupy-cuda13x",
               "nvjpeg": "torchvision (with its CUDA build)"}[decoder]
        raise BackendUnavailableError(
            f"decoder={decoder!r} needs {pkg}: pip install 'cellvit-optimus[gpu]'")


class _CopyStream:
    """the CUDA stream a decoder copies out of a producer's buffer on, and the events that say when a copy
    is done: waiting for them waits for that copy only, not for the backbone's work queued elsewhere"""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device)

    @property
    def handle(self) -> int:
        return int(self.stream.cuda_stream)

    def context(self) -> Any:
        import torch

        return torch.cuda.stream(self.stream)

    def record(self) -> Any:
        return self.stream.record_event()

    def hand_over(self, tensors: Sequence[torch.Tensor]) -> None:
        """make the caller's current stream wait for the copies (a device-side wait) and tell the caching
        allocator it uses the outputs, so their memory is not reused under it"""
        import torch

        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in tensors:
            t.record_stream(current)


class _DaliDecoder:
    """nvJPEG batch decode through a synchronous DALI pipeline (external source -> decoders.image, mixed)

    ``run()`` returns DALI's own output buffer, which its next ``run()`` overwrites; ``feed_ndarray`` only
    *queues* the copy out of it on the stream it is given. So every copy goes on a stream of the
    decoder's own and is waited for (its event) before DALI runs again: without that wait a batch can be
    overwritten by the next one before it is copied, and two chunks come out the same.
    ``pipe``, ``feed`` and ``copy_stream`` stand in for DALI and CUDA in tests.
    """

    def __init__(self, device_id: int, max_batch: int, num_threads: int = 2, *, pipe: Any = None,
                 feed: Callable[..., Any] | None = None, copy_stream: Any = None,
                 device: str | None = None) -> None:
        self.max_batch = int(max_batch)
        self.device_id = int(device_id)
        self.device = device or f"cuda:{self.device_id}"
        if pipe is None or feed is None:
            try:
                from nvidia.dali import fn, pipeline_def, types
                from nvidia.dali.plugin.pytorch import feed_ndarray
            except ImportError as exc:
                raise BackendUnavailableError(f"nvidia.dali is not importable: {exc}") from exc

            @pipeline_def(batch_size=self.max_batch, num_threads=num_threads, device_id=self.device_id,
                          exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
            def build():  # type: ignore[no-untyped-def]
                jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
                return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)

            pipe = build()
            pipe.build()
            feed = feed_ndarray
        if copy_stream is None:
            import torch

            copy_stream = _CopyStream(torch.device(self.device))
        self._pipe, self._feed, self._copies = pipe, feed, copy_stream
        self._copied: Any = None  # event of the last copy out of DALI's buffer
        self._lock = threading.Lock()

    def __call__(self, streams: Sequence[bytes]) -> torch.Tensor:
        import torch

        parts = []
        with self._lock:  # a DALI pipeline runs one batch at a time
            for s in range(0, len(streams), self.max_batch):
                chunk = [np.frombuffer(b, np.uint8) for b in streams[s : s + self.max_batch]]
                if self._copied is not None:  # DALI may not overwrite its buffer before the last copy is done
                    self._copied.synchronize()
                self._pipe.feed_input("jpegs", chunk)
                (tl,) = self._pipe.run()
                t = tl.as_tensor()  # equal tile sizes: one dense (n, h, w, 3) tensor
                with self._copies.context():  # allocated on the copy stream, written by it
                    dst = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=self.device)
                    self._feed(t, dst, cuda_stream=self._copies.handle)
                    self._copied = self._copies.record()
                parts.append(dst)
            self._copies.hand_over(parts)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class _NvjpegDecoder:
    """nvJPEG batch decode through torchvision: ``torchvision.io.decode_jpeg(list, device="cuda")``.

    torchvision is part of every CUDA torch image, so this GPU decoder needs nothing installed or carried.
    Its batched call decodes baseline JPEGs on the hardware decoder where the GPU has one (A100, H100)
    and with CUDA kernels otherwise; the outputs are ``(3, h, w)`` tensors, made ready for the current
    stream by torchvision. ``device="cpu"`` runs the same call on torchvision's libjpeg-turbo (tests).
    """

    def __init__(self, device: str | torch.device, max_batch: int) -> None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as exc:
            raise BackendUnavailableError(f"torchvision is not importable: {exc}") from exc
        import torch

        self._decode, self._mode = decode_jpeg, ImageReadMode.RGB
        self.device = torch.device(device)
        self.max_batch = int(max_batch)

    def __call__(self, streams: Sequence[bytes]) -> torch.Tensor:
        import torch

        parts = []
        for s in range(0, len(streams), self.max_batch):
            # host uint8 tensors, as nvJPEG reads its input from the host (a copy: bytes are read-only)
            chunk = streams[s : s + self.max_batch]
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in chunk]
            imgs = self._decode(data, mode=self._mode, device=self.device)
            shapes = {tuple(i.shape) for i in imgs}
            if len(shapes) != 1:
                raise ValueError(f"decoded tiles differ in size: {sorted(shapes)}")
            parts.append(torch.stack(imgs).permute(0, 2, 3, 1))  # (n, h, w, 3) views, assembled by copy
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def gpu_array_to_tensor(obj: Any, device: str | torch.device,
                        as_tensor: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """a torch tensor on ``device`` holding a *copy* of a GPU array handed out by a decoder.

    cuCIM's GPU ``read_region`` yields ``CuImage`` objects that expose only ``__cuda_array_interface__``
    (no ``__dlpack__``), so ``torch.from_dlpack`` refuses them; ``torch.as_tensor(obj, device=...)``
    reads the interface and wraps the memory without a copy. cuCIM reuses that buffer for its next
    batch, so the copy is made here, at once, before anything else runs. Objects with ``__dlpack__``
    (cupy arrays) and host arrays (``__array_interface__``) are taken too.

    ``as_tensor`` stands in for ``torch.as_tensor`` (tests drive this logic on the CPU with it).
    Raises TypeError naming the type when the object exposes none of the three interfaces.
    """
    import torch

    as_tensor = torch.as_tensor if as_tensor is None else as_tensor
    borrowed = hasattr(obj, "__cuda_array_interface__")
    if borrowed:
        stream = obj.__cuda_array_interface__.get("stream")
        if stream:  # CAI v3: the consumer must wait for the producer's stream before reading
            _wait_for_stream(int(stream), device)
        view = as_tensor(obj, device=device)
    elif hasattr(obj, "__dlpack__"):
        view = torch.from_dlpack(obj)
    elif hasattr(obj, "__array_interface__") or isinstance(obj, np.ndarray):
        view = torch.from_numpy(np.asarray(obj))
    else:
        raise TypeError(f"GPU decoder returned a {type(obj).__module__}.{type(obj).__qualname__}, which has "
                        "no __cuda_array_interface__, __dlpack__ or __array_interface__")
    # copy=True even where .to() would be a no-op: the producer's buffer is reused for its next batch
    out = view.to(device, copy=True)
    if borrowed and out.is_cuda:  # the copy must be done before the producer writes its next batch there
        torch.cuda.current_stream(out.device).synchronize()
    return out


def _wait_for_stream(stream: int, device: str | torch.device) -> None:
    import torch

    if stream in (1, 2):  # the legacy / per-thread default stream: no handle to wait on, so wait for all
        torch.cuda.synchronize(device)
    else:
        torch.cuda.current_stream(device).wait_stream(torch.cuda.ExternalStream(stream, device=device))


def _cpu_decoder(device: str) -> _StreamDecoder:
    def decode(streams: Sequence[bytes]) -> torch.Tensor:
        import torch

        return torch.from_numpy(decode_jpeg_cpu(streams)).to(device)

    return decode


_reader_streams = threading.local()


class reader_stream:  # noqa: N801  (a context manager used like a function)
    """run GPU reads under a CUDA stream of the calling thread's own and wait for it on leaving.

    The scheduler's reader threads use it: their decodes, copies and ``.cpu()`` calls then wait for their
    own work only, not for graph replays or hand-offs that other threads queued on the default stream.
    On leaving, the host waits for the stream, so what was read is complete when handed on. A no-op
    for a CPU ``device``.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = str(device)
        self._ctx: Any = None
        self.stream: Any = None

    def __enter__(self) -> reader_stream:
        if not self.device.startswith("cuda"):
            return self
        import torch

        dev = torch.device(self.device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        streams = _reader_streams.__dict__.setdefault("by_device", {})
        if dev not in streams:
            streams[dev] = torch.cuda.Stream(dev)
        self.stream = streams[dev]
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is None:
            return
        try:
            self.stream.synchronize()
        finally:
            self._ctx.__exit__(*exc)
            self._ctx = None


# -- the reader -------------------------------------------------------------------------------------


class GpuTileReader:
    """tiles of a slide decoded and assembled on the GPU, mirroring :meth:`Slide.read_regions` /
    :meth:`Slide.read_tiles` but returning uint8 torch tensors on ``device``.

    Parameters
    ----------
    slide : the open slide (its levels, MPP and level choice are reused)
    decoder : ``"dali"`` (nvJPEG through DALI), ``"cucim"`` (cuCIM's GPU batch read), ``"nvjpeg"``
        (nvJPEG through ``torchvision.io.decode_jpeg``), ``"cpu"`` (libjpeg-turbo on the host; the
        reference, for tests), or ``"auto"``: the first GPU decoder available (:data:`GPU_DECODERS`)
    device : torch device of the output (``"cuda"``, ``"cuda:1"``, ``"cpu"`` with ``decoder="cpu"``)
    max_batch : tiles per decoder call

    Raises BackendUnavailableError without the decoder's package or a CUDA device, and
    UnsupportedFormatError for slides whose tiles are not JPEG (JPEG 2000 SVS, DICOM, plain TIFF).
    """

    def __init__(self, slide: Slide, decoder: DecoderName = "auto", device: str = "cuda",
                 max_batch: int = 256) -> None:
        if decoder not in ("auto", "dali", "cucim", "nvjpeg", "cpu"):
            raise ConfigError(f"decoder={decoder!r} is not one of 'auto', 'dali', 'cucim', 'nvjpeg', 'cpu'")
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1")
        if decoder == "auto":
            found = gpu_decoders_available()
            if not found:
                _require("dali")  # raises the clear message
            decoder = found[0]  # type: ignore[assignment]
        elif decoder != "cpu":
            _require(decoder)
        self.slide = slide
        self.decoder: str = decoder
        self.device = device
        self.max_batch = int(max_batch)
        #: why the GPU decoder last failed and its tiles were read by the host reader (None: never)
        self.fallback_reason: str | None = None
        #: read calls answered by the host reader after a GPU decoder failure
        self.fallbacks = 0
        self._cucim: Any = None
        self._raw: RawJpegTiles | None = None
        self._decode: _StreamDecoder
        if decoder == "cucim":
            from cellvit_optimus.engine.wsi.cucim import open_cuimage

            self._cucim = open_cuimage(slide.path)
            return
        self._raw = RawJpegTiles(slide.path)
        self._levels = [self._raw.level_index(d) for d in slide.level_dimensions]
        self._raw.check_level(self._levels[0])  # fail now, not on the first batch
        if decoder == "dali":
            import torch

            dev = torch.device(device)
            self._decode = _DaliDecoder(dev.index if dev.index is not None else torch.cuda.current_device(),
                                        self.max_batch)
        elif decoder == "nvjpeg":
            self._decode = _NvjpegDecoder(device, self.max_batch)
        else:
            self._decode = _cpu_decoder(device)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._cucim is not None:
            self._cucim.close()

    def __enter__(self) -> GpuTileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def synchronize(self) -> None:
        """wait for queued GPU work (for timing)"""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int]) -> torch.Tensor:
        """``(N, h, w, 3)`` uint8 on ``device``; ``locations`` (x, y) in level-0 pixels, ``size`` (w, h) at
        ``level``; pixels beyond the slide are white, as on the CPU path"""
        import torch

        if not 0 <= level < len(self.slide.level_dimensions):
            raise ConfigError(f"{self.slide.path}: level={level} out of range (0..{len(self.slide.level_dimensions) - 1})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ConfigError(f"{self.slide.path}: size={size} must be positive")
        ds = self.slide.level_downsamples[level]
        origins = [(int(math.floor(x / ds)), int(math.floor(y / ds))) for x, y in locations]
        if self._cucim is not None:
            try:
                return self._read_cucim(locations, origins, level, w, h)
            except Exception as exc:  # noqa: BLE001  any decoder failure: the host reader answers
                return self._fall_back(exc, locations, level, w, h)
        assert self._raw is not None
        tl = self._levels[level]
        geom = self._raw.check_level(tl)
        needed = sorted({t for x, y in origins for t in geom.tiles_for(x, y, w, h)})
        streams = self._raw.streams(tl, needed)
        present = [(t, s) for t, s in zip(needed, streams) if s is not None]
        tiles: dict[int, Any] = {}
        for s in range(0, len(present), self.max_batch):
            chunk = present[s : s + self.max_batch]
            try:
                dec = self._decode([b for _, b in chunk])
            except Exception as exc:
                if self.decoder != "cpu":  # a GPU decoder failed: the host reader answers
                    return self._fall_back(exc, locations, level, w, h)
                raise CorruptSlideError(self.slide.path, f"GPU decode ({self.decoder}) failed at level {level}: "
                                        f"{exc}") from exc
            tiles.update({t: dec[k] for k, (t, _) in enumerate(chunk)})
        blank = torch.full((geom.tile_height, geom.tile_width, 3), 255, dtype=torch.uint8, device=self.device)
        for t, s in zip(needed, streams):
            if s is None:  # sparse tile: nothing stored, white like the CPU readers
                tiles[t] = blank
        out = torch.full((len(origins), h, w, 3), 255, dtype=torch.uint8, device=self.device)
        return assemble_regions(tiles, geom, origins, (w, h), out)

    def _fall_back(self, exc: BaseException, locations: Sequence[tuple[int, int]], level: int, w: int,
                   h: int) -> torch.Tensor:
        """the regions read by the host slide reader, uploaded, after a GPU decoder failure (recorded)"""
        import torch

        reason = f"{self.decoder} failed at level {level}: {type(exc).__name__}: {exc}".splitlines()[0]
        if self.fallbacks == 0:
            log.warning("%s: GPU decode failed, reading with the host reader instead (%s)",
                        self.slide.path.name, reason)
        self.fallback_reason = reason
        self.fallbacks += 1
        locs = [(int(x), int(y)) for x, y in locations]
        return torch.from_numpy(self.slide.read_regions(locs, level, (w, h))).to(self.device)

    def _read_cucim(self, locations: Sequence[tuple[int, int]], origins: list[tuple[int, int]], level: int,
                    w: int, h: int) -> torch.Tensor:
        import torch

        W, H = self.slide.level_dimensions[level]
        out = torch.full((len(origins), h, w, 3), 255, dtype=torch.uint8, device=self.device)
        inside = [i for i, (x, y) in enumerate(origins) if x >= 0 and y >= 0 and x + w <= W and y + h <= H]
        if inside:
            locs = [tuple(map(int, locations[i])) for i in inside]
            regions = self._cucim.read_region(locs, (w, h), level, device="cuda", num_workers=2,
                                              batch_size=min(len(locs), self.max_batch))
            k = 0
            for batch in regions:  # cuCIM yields batches of (b, h, w, 3) GPU CuImages
                b = gpu_array_to_tensor(batch, self.device)  # copied now: cuCIM reuses the buffer
                b = b[None] if b.ndim == 3 else b
                out[inside[k : k + b.shape[0]]] = b[..., :3]
                k += b.shape[0]
            if k != len(inside):
                raise RuntimeError(f"cuCIM returned {k} regions for {len(inside)} locations")
        for i in sorted(set(range(len(origins))) - set(inside)):  # slide edge: CPU path, then upload
            x, y = locations[i]
            out[i] = torch.from_numpy(self.slide.read_region((int(x), int(y)), level, (w, h))).to(self.device)
        return out

    def read_tiles(self, locations: Sequence[tuple[int, int]], tile_size: int = 224,
                   target_mpp: float = 0.5) -> torch.Tensor:
        """``(N, tile_size, tile_size, 3)`` uint8 tiles at ``target_mpp`` on ``device`` (same level choice and
        region size as :meth:`Slide.read_tiles`)"""
        if tile_size <= 0 or target_mpp <= 0:
            raise ConfigError(f"tile_size={tile_size} and target_mpp={target_mpp} must be positive")
        level = self.slide.best_level_for(target_mpp)
        w0, h0 = self.slide.level0_tile_size(tile_size, target_mpp)
        ds = self.slide.level_downsamples[level]
        rw, rh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        return resample(self.read_regions(locations, level, (rw, rh)), tile_size)


# -- choosing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderChoice:
    """which read path a run uses and the measurements behind it"""

    decoder: Literal["cpu", "gpu"]
    cpu_tiles_per_s: float | None
    gpu_tiles_per_s: float | None
    reason: str


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _time_path(read: Callable[[Sequence[tuple[int, int]]], Any], batches: list[list[tuple[int, int]]],
               sync: Callable[[], None], clock: Callable[[], float]) -> tuple[float, Any]:
    """tiles/s over ``batches[1:]`` after ``batches[0]`` as warm-up, and the warm-up batch's tiles"""
    first = read(batches[0])
    sync()
    t0 = clock()
    n = 0
    for b in batches[1:]:
        read(b)
        n += len(b)
    sync()
    dt = clock() - t0
    return (n / dt if dt > 0 else math.inf), first


def choose_decoder(slide: Slide, locations: Sequence[tuple[int, int]], tile_size: int = 224,
                   target_mpp: float = 0.5, *, batch_size: int = 64, n_batches: int = 3,
                   min_speedup: float = MIN_SPEEDUP, gpu_reader: Any = None, decoder: DecoderName = "auto",
                   clock: Callable[[], float] = time.perf_counter) -> DecoderChoice:
    """time the CPU path (``slide.read_tiles``) and the GPU path on the same tiles; pick the GPU only
    when it is at least ``min_speedup`` times faster.

    One batch of ``batch_size`` tiles warms each path up (decoder start, nvJPEG handles, page cache),
    then up to ``n_batches`` batches are timed. Without a usable GPU decoder, for a slide whose tiles
    the GPU path cannot read, when the GPU path fails (to start, or while timed) or when its warm-up
    pixels differ from the host reader's by more than :data:`MAX_MEAN_ABS_DIFF` grey levels on average,
    the answer is ``"cpu"`` with the reason. ``gpu_reader`` (anything with
    ``read_tiles`` and ``synchronize``) is built from ``decoder`` when not given; it is not closed.
    """
    if batch_size < 1 or n_batches < 1:
        raise ConfigError(f"batch_size={batch_size} and n_batches={n_batches} must be >= 1")
    if min_speedup <= 0:
        raise ConfigError(f"min_speedup={min_speedup} must be > 0")
    locs = [tuple(map(int, loc)) for loc in locations][: batch_size * (n_batches + 1)]
    if not locs:
        return DecoderChoice("cpu", None, None, "no tiles to time")
    if gpu_reader is None:
        try:
            gpu_reader = GpuTileReader(slide, decoder=decoder)
        except (BackendUnavailableError, UnsupportedFormatError) as exc:
            return DecoderChoice("cpu", None, None, f"GPU decode unavailable: {exc}")
        except Exception as exc:  # noqa: BLE001  e.g. a DALI pipeline or cuCIM that fails to start
            return DecoderChoice("cpu", None, None, f"GPU decoder failed to start: {_why(exc)}")
    batches = [locs[i : i + batch_size] for i in range(0, len(locs), batch_size)]
    if len(batches) == 1:  # too few tiles for a separate warm-up: time the one batch again
        batches = batches * 2
    cpu, cpu_tiles = _time_path(lambda b: slide.read_tiles(b, tile_size, target_mpp), batches, lambda: None,
                                clock)
    before = getattr(gpu_reader, "fallbacks", 0)
    try:
        gpu, gpu_tiles = _time_path(lambda b: gpu_reader.read_tiles(b, tile_size, target_mpp), batches,
                                    gpu_reader.synchronize, clock)
    except Exception as exc:  # noqa: BLE001  any GPU-path failure keeps the host reader
        return DecoderChoice("cpu", cpu, None, f"GPU path failed while timing: {_why(exc)}")
    if getattr(gpu_reader, "fallbacks", 0) > before:  # the reader fell back: its timing is the host's
        return DecoderChoice("cpu", cpu, None, f"GPU path failed while timing: {gpu_reader.fallback_reason}")
    got = np.asarray(gpu_tiles.cpu() if hasattr(gpu_tiles, "cpu") else gpu_tiles, dtype=np.float32)
    diff = float(np.abs(got - np.asarray(cpu_tiles, dtype=np.float32)).mean()) if got.size else 0.0
    if not diff <= MAX_MEAN_ABS_DIFF:  # wrong colours (e.g. YCbCr taken for RGB): never worth the speed
        return DecoderChoice("cpu", cpu, gpu, f"GPU pixels differ from the host reader's by {diff:.1f} grey "
                             f"levels on average (> {MAX_MEAN_ABS_DIFF:g}): wrong colours")
    if gpu >= cpu * min_speedup:
        return DecoderChoice("gpu", cpu, gpu, f"GPU {gpu:.0f} tiles/s >= {min_speedup:g} x CPU {cpu:.0f} tiles/s")
    return DecoderChoice("cpu", cpu, gpu, f"GPU {gpu:.0f} tiles/s < {min_speedup:g} x CPU {cpu:.0f} tiles/s")
