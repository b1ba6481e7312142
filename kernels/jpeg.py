"""Exact syntax check of baseline JPEG entropy-coded data (a slide tile's integrity check).

libjpeg, and every decoder built on it, decodes damaged entropy-coded data with at most a warning, and
a strict decode (``simplejpeg.decode_jpeg(strict=True)``) raises only on what libjpeg warns about:
a segment that ends before the last block, or whole bytes left over after it. A flipped byte that
desynchronises the Huffman stream can still land inside the last byte, and libjpeg also lets a
block's run of zeros overrun the 63 AC positions (it indexes a padded table). Such tiles decode to
garbage from the damaged block onwards and passed that check.

:func:`jpeg_scan_check` walks every Huffman code of the scan without transforming anything and checks
what libjpeg lets through:

- every code is in its table, no AC run passes the end of a block, no magnitude category exceeds the
  8-bit limits (DC 11, AC 10);
- every DC coefficient, once its differences are summed, is one an 8-bit block can have (the
  dequantised DC term of 8-bit samples lies in [-1024, 1016]): a flip that keeps the stream in step
  but changes a DC difference shifts every later block of that component and usually leaves the range;
- restart markers come in order, where the restart interval puts them;
- the scan ends exactly in its last byte, padded with 1 bits, followed only by fill bytes and EOI.

JPEG has no checksum: a flip that swaps a Huffman code for another of the same length, or changes the
magnitude bits of one coefficient, gives another valid stream (one block of other pixels). No syntax
check can see those. Only baseline and extended sequential Huffman scans (SOF0/SOF1, one scan) are
walked; anything else returns ``None`` (not checked), never a false alarm.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ("JPEG_PROBLEMS", "JpegScan", "jpeg_scan_check", "jpeg_segments", "parse_jpeg")

#: what each non-zero status of the scan walk means
JPEG_PROBLEMS: dict[int, str] = {
    1: "a Huffman code that is in no table",
    2: "an AC run past the end of a block",
    3: "a coefficient magnitude category over the 8-bit limit",
    4: "a DC coefficient outside the 8-bit range",
    5: "entropy-coded data ends before the last block",
    6: "a restart marker missing or out of order",
    7: "padding bits that are not all ones",
    8: "data left after the last block",
}


@dataclass(frozen=True)
class JpegScan:
    """what the walk needs from the headers: geometry, tables in the spec's decoding form, scan start"""

    width: int
    height: int
    mcus_x: int
    mcus_y: int
    restart_interval: int
    #: per component (scan order): block rows and columns in one MCU, DC/AC table slot, quant DC step
    comp_h: np.ndarray
    comp_v: np.ndarray
    comp_dc: np.ndarray
    comp_ac: np.ndarray
    comp_q0: np.ndarray
    #: Huffman tables (slot = class * 4 + id): spec F.2.2.3 MINCODE/MAXCODE/VALPTR for lengths 1..16
    mincode: np.ndarray
    maxcode: np.ndarray
    valptr: np.ndarray
    huffval: np.ndarray
    #: LOOKAHEAD-bit decoding tables (see :func:`_lookahead`)
    lut_len: np.ndarray
    lut_sym: np.ndarray
    #: offset of the first entropy-coded byte in the stream passed to :func:`parse_jpeg`
    start: int


def jpeg_segments(data: bytes):
    """(marker, payload start, payload end) for each marker segment of a JPEG stream, from SOI up to and
    including SOS; ValueError where the header is corrupt or cut off"""
    i, n = 0, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            raise ValueError(f"expected a marker at byte {i}")
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in (0xD8, 0xD9) or 0xD0 <= m <= 0xD7 or m == 0x01:
            yield m, i + 2, i + 2
            i += 2
            continue
        if i + 4 > n:
            raise ValueError(f"marker 0x{m:02X} at byte {i} is cut off")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            raise ValueError(f"marker 0x{m:02X} at byte {i} has length {length} past the end")
        yield m, i + 4, i + 2 + length
        if m == 0xDA:
            return
        i += 2 + length


def _huffman(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """spec F.2.2.3 decoding tables from the 16 code-length counts"""
    mincode = np.zeros(17, np.int32)
    maxcode = np.full(17, -1, np.int32)
    valptr = np.zeros(17, np.int32)
    code = k = 0
    for length in range(1, 17):
        count = int(bits[length - 1])
        if count:
            valptr[length] = k
            mincode[length] = code
            code += count
            k += count
            maxcode[length] = code - 1
        code <<= 1
    return mincode, maxcode, valptr


def parse_jpeg(data: bytes, tables: bytes | None = None) -> JpegScan | None:
    """headers of one JPEG stream (``tables``: an abbreviated table stream such as TIFF JPEGTables)

    Returns None for a stream the walk does not cover (progressive, arithmetic, lossless, 12-bit,
    several scans); raises ``ValueError`` for headers that are broken. The tiles of one slide level
    share their headers byte for byte, so the tables are built once per distinct header (cached).
    """
    end = 0
    for m, _a, b in jpeg_segments(data):
        end = b
        if m == 0xDA:
            break
    else:
        raise ValueError("no scan")
    return _parse_headers(tables, bytes(data[:end]))


@functools.lru_cache(maxsize=64)
def _parse_headers(tables: bytes | None, data: bytes) -> JpegScan | None:
    mincode = np.zeros((8, 17), np.int32)
    maxcode = np.full((8, 17), -1, np.int32)
    valptr = np.zeros((8, 17), np.int32)
    huffval = np.zeros((8, 256), np.int32)
    have = np.zeros(8, bool)
    quant: dict[int, int] = {}
    frame: dict[int, tuple[int, int, int]] = {}  # component id -> (h, v, quant table)
    size = (0, 0)
    restart = 0
    for stream in ([tables] if tables else []) + [data]:
        for m, a, b in jpeg_segments(stream):
            seg = stream[a:b]
            if m == 0xDB:
                j = 0
                while j < len(seg):
                    pq, tq = seg[j] >> 4, seg[j] & 15
                    if tq > 3 or pq > 1 or j + 1 + 64 * (pq + 1) > len(seg):
                        raise ValueError("broken quantisation table")
                    quant[tq] = int.from_bytes(seg[j + 1:j + 1 + (pq + 1)], "big")  # DC step
                    j += 1 + 64 * (pq + 1)
            elif m == 0xC4:
                j = 0
                while j < len(seg):
                    tc, th = seg[j] >> 4, seg[j] & 15
                    if tc > 1 or th > 3 or j + 17 > len(seg):
                        raise ValueError("broken Huffman table")
                    bits = np.frombuffer(seg[j + 1:j + 17], np.uint8)
                    total = int(bits.sum())
                    if total > 256 or j + 17 + total > len(seg):
                        raise ValueError("broken Huffman table")
                    slot = tc * 4 + th
                    mincode[slot], maxcode[slot], valptr[slot] = _huffman(bits)
                    huffval[slot, :total] = np.frombuffer(seg[j + 17:j + 17 + total], np.uint8)
                    have[slot] = True
                    j += 17 + total
            elif m == 0xDD:
                restart = int.from_bytes(seg[:2], "big")
            elif m in (0xC0, 0xC1):
                if seg[0] != 8:
                    return None
                size = (int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"))
                for c in range(seg[5]):
                    cid, hv, tq = seg[6 + 3 * c], seg[7 + 3 * c], seg[8 + 3 * c]
                    frame[cid] = (hv >> 4, hv & 15, tq)
            elif 0xC2 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
                return None  # progressive, lossless or arithmetic coding
            elif m == 0xDA:
                if not frame:
                    raise ValueError("scan before frame header")
                ns = seg[0]
                comps = [(seg[1 + 2 * c], seg[2 + 2 * c] >> 4, seg[2 + 2 * c] & 15) for c in range(ns)]
                if ns != len(frame):
                    return None  # several scans: not covered
                hmax = max(h for h, _, _ in frame.values())
                vmax = max(v for _, v, _ in frame.values())
                width, height = size
                if width == 0 or height == 0:
                    return None  # height given by a DNL marker: not covered
                mcus_x, mcus_y = -(-width // (8 * hmax)), -(-height // (8 * vmax))
                if ns == 1:  # a non-interleaved scan: one block per MCU over the component's own size
                    fh, fv, _ = frame[comps[0][0]]
                    cw, ch = -(-width * fh // hmax), -(-height * fv // vmax)  # the component's size
                    mcus_x, mcus_y = -(-cw // 8), -(-ch // 8)
                    frame = {comps[0][0]: (1, 1, frame[comps[0][0]][2])}
                h, v, dc, ac, q0 = [], [], [], [], []
                for cid, td, ta in comps:
                    if cid not in frame:
                        raise ValueError(f"scan names component {cid} that the frame has not")
                    fh, fv, tq = frame[cid]
                    if not have[td] or not have[4 + ta] or tq not in quant:
                        raise ValueError("scan uses a table that is not defined")
                    h.append(fh), v.append(fv), dc.append(td), ac.append(4 + ta), q0.append(quant[tq])
                lut_len, lut_sym = _lookahead(mincode, maxcode, valptr, huffval)
                for arr in (mincode, maxcode, valptr, huffval, lut_len, lut_sym):
                    arr.flags.writeable = False  # shared through the cache
                return JpegScan(width, height, mcus_x, mcus_y, restart,
                                np.array(h, np.int32), np.array(v, np.int32), np.array(dc, np.int32),
                                np.array(ac, np.int32), np.array(q0, np.int32),
                                mincode, maxcode, valptr, huffval, lut_len, lut_sym, b)
    raise ValueError("no scan")


#: bits of the lookahead table: codes up to this long decode with one lookup
LOOKAHEAD = 9


def _lookahead(mincode: np.ndarray, maxcode: np.ndarray, valptr: np.ndarray, huffval: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(length, symbol) for every LOOKAHEAD-bit prefix that starts with a code of at most that length
    (length 0: longer code or none), per table slot"""
    size = 1 << LOOKAHEAD
    lut_len = np.zeros((8, size), np.int32)
    lut_sym = np.zeros((8, size), np.int32)
    for slot in range(8):
        for length in range(1, LOOKAHEAD + 1):
            for code in range(int(mincode[slot, length]), int(maxcode[slot, length]) + 1):
                lo = code << (LOOKAHEAD - length)
                hi = (code + 1) << (LOOKAHEAD - length)
                lut_len[slot, lo:hi] = length
                lut_sym[slot, lo:hi] = huffval[slot, valptr[slot, length] + code - mincode[slot, length]]
    return lut_len, lut_sym


@njit(cache=True, nogil=True)
def _fill(data, pos, acc, nbits, marker):  # pragma: no cover - compiled
    """top up the bit accumulator to more than 48 bits, unstuffing 0xFF00; stops at a marker or the end"""
    n = data.shape[0]
    while nbits <= 48 and not marker:
        if pos >= n:
            marker = True
            break
        byte = data[pos]
        if byte == 0xFF:
            if pos + 1 < n and data[pos + 1] == 0x00:
                pos += 2
            else:
                marker = True
                break
        else:
            pos += 1
        acc = (acc << 8) | np.int64(byte)
        nbits += 8
    return pos, acc, nbits, marker


@njit(cache=True, nogil=True)
def _interval_end(data, pos, acc, nbits, marker):  # pragma: no cover - compiled
    """an interval (restart interval or the scan) ends inside its last byte, padded with ones, and
    ``marker`` follows after any fill bytes: 0, 7 (padding), 8 (whole bytes left) or 9 (another marker
    or none), with the marker's offset"""
    n = data.shape[0]
    if nbits >= 8:
        return 8, pos
    if acc & ((1 << nbits) - 1) != (1 << nbits) - 1:
        return 7, pos
    while pos + 1 < n and data[pos] == 0xFF and data[pos + 1] == 0xFF:
        pos += 1
    if pos + 1 >= n or data[pos] != 0xFF or data[pos + 1] != marker:
        return 9, pos
    return 0, pos


@njit(cache=True, nogil=True)
def _walk(data, pos, mcus, restart, comp_h, comp_v, comp_dc, comp_ac, comp_q0,
          mincode, maxcode, valptr, huffval, lut_len, lut_sym):  # pragma: no cover - compiled
    """0 or a problem code (JPEG_PROBLEMS) and the byte offset where it was found"""
    ncomp = comp_h.shape[0]
    pred = np.zeros(ncomp, np.int64)
    acc = np.int64(0)  # unread bits, the next one highest; nbits of them
    nbits = 0
    marker = False     # the accumulator reached a marker (or the end): no more data in this interval
    rst = 0
    for mcu in range(mcus):
        if restart > 0 and mcu > 0 and mcu % restart == 0:
            status, pos = _interval_end(data, pos, acc, nbits, 0xD0 + rst)
            if status:
                return (6 if status == 9 else status), pos
            pos += 2
            rst = (rst + 1) & 7
            acc = np.int64(0)
            nbits = 0
            marker = False
            for c in range(ncomp):
                pred[c] = 0
        for c in range(ncomp):
            for _b in range(comp_h[c] * comp_v[c]):
                k = 0  # 0: the DC code; then the AC position
                while True:
                    slot = comp_dc[c] if k == 0 else comp_ac[c]
                    if nbits < 16:
                        pos, acc, nbits, marker = _fill(data, pos, acc, nbits, marker)
                    if nbits >= LOOKAHEAD:
                        peek = (acc >> (nbits - LOOKAHEAD)) & ((1 << LOOKAHEAD) - 1)
                    else:
                        peek = (acc << (LOOKAHEAD - nbits)) & ((1 << LOOKAHEAD) - 1)
                    length = lut_len[slot, peek]
                    if length > 0:
                        sym = lut_sym[slot, peek]
                    else:
                        sym = -1
                        for ln in range(LOOKAHEAD + 1, 17):
                            if ln > nbits:
                                return 5, pos
                            code = (acc >> (nbits - ln)) & ((1 << ln) - 1)
                            if code <= maxcode[slot, ln]:
                                sym = huffval[slot, valptr[slot, ln] + code - mincode[slot, ln]]
                                length = ln
                                break
                        if sym < 0:
                            return 1, pos
                    if length > nbits:
                        return 5, pos
                    nbits -= length
                    size = sym & 15
                    if k == 0:
                        if sym > 11:
                            return 3, pos
                        size = sym
                    elif size > 10:
                        return 3, pos
                    if size > nbits:
                        pos, acc, nbits, marker = _fill(data, pos, acc, nbits, marker)
                        if size > nbits:
                            return 5, pos
                    nbits -= size
                    value = (acc >> nbits) & ((1 << size) - 1)
                    acc &= (np.int64(1) << nbits) - 1
                    if k == 0:
                        if size > 0 and value < (1 << (size - 1)):
                            value -= (1 << size) - 1
                        pred[c] += value
                        dc = pred[c] * comp_q0[c]
                        if dc < -1024 - comp_q0[c] or dc > 1016 + comp_q0[c]:
                            return 4, pos
                        k = 1
                        continue
                    run = sym >> 4
                    if size == 0:
                        if run != 15:
                            break  # end of block
                        k += 16  # sixteen zeros
                        if k > 63:
                            return 2, pos
                        continue
                    k += run
                    if k > 63:
                        return 2, pos
                    k += 1
                    if k > 63:
                        break
    status, pos = _interval_end(data, pos, acc, nbits, 0xD9)  # then only fill bytes and EOI
    return (8 if status == 9 else status), pos


def jpeg_scan_check(data: bytes, tables: bytes | None = None) -> tuple[int, str] | None:
    """walk one JPEG stream's entropy-coded data; None when it is a kind the walk does not cover

    Returns ``(0, "")`` for a stream whose syntax holds from the first code to EOI, else ``(offset,
    what)``: the byte offset in ``data`` near which the problem was found and :data:`JPEG_PROBLEMS`'s
    text. Raises ``ValueError`` for broken headers.
    """
    scan = parse_jpeg(data, tables)
    if scan is None:
        return None
    buf = np.frombuffer(data, np.uint8)
    status, pos = _walk(buf, scan.start, scan.mcus_x * scan.mcus_y, scan.restart_interval, scan.comp_h,
                        scan.comp_v, scan.comp_dc, scan.comp_ac, scan.comp_q0, scan.mincode, scan.maxcode,
                        scan.valptr, scan.huffval, scan.lut_len, scan.lut_sym)
    return (0, "") if status == 0 else (int(pos), JPEG_PROBLEMS[int(status)])
