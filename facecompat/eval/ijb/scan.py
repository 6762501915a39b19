"""Vectorised scanner of the numbers in IJB meta files: ~1 MB chunks of bytes read by numpy, no
per-value Python (:func:`_parse_uint_fast` for integers, :func:`_parse_decimal_fast` for plain
decimals); None for anything it does not expect, and the caller's general path decides.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

_CHUNK_BYTES = 1 << 20  # small enough that a chunk's byte-sized temporaries stay in cache
_PAD = 8  # separator bytes before each chunk: every 8-byte window ending at a digit is in bounds
# _DIGIT_MASKS[n]: the low nibbles of the top n bytes of a little-endian 64-bit word
_DIGIT_MASKS = np.array([0] + [(0x0F0F0F0F0F0F0F0F << (8 * (8 - n))) & (2**64 - 1) for n in range(1, 9)],
                        np.uint64)


def _run_values(buf: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64 values of digit runs of at most 8 digits ending (exclusive) at ``ends`` in ``buf``.

    The little-endian 8-byte word ending at a run holds it in its top bytes: keep the low nibble of
    each of the run's bytes (the bytes before it are masked off), and three multiply-shift steps
    combine neighbouring digits pairwise (1+1 -> 2 -> 4 -> 8 digits); one gather per run and no
    loop over digits. ``buf`` needs ``_PAD`` bytes before the first run.
    """
    import torch  # loaded for score_pairs anyway; its 8-byte row gather beats numpy's unaligned one 3x

    windows = torch.as_strided(torch.from_numpy(buf), (buf.size - 7, 8), (1, 1))
    words = windows.index_select(0, torch.from_numpy(ends - 8)).view(torch.int64).numpy().view(np.uint64)
    words = words.ravel()
    words &= _DIGIT_MASKS[lengths]
    words *= np.uint64(10 * 2**8 + 1)  # byte k: 10 * digit k + digit k+1 (after >> 8)
    words >>= np.uint64(8)
    words &= np.uint64(0x00FF00FF00FF00FF)
    words *= np.uint64(100 * 2**16 + 1)
    words >>= np.uint64(16)
    words &= np.uint64(0x0000FFFF0000FFFF)
    words *= np.uint64(10000 * 2**32 + 1)
    words >>= np.uint64(32)
    return words.view(np.int64)


def _lines_ok(starts: np.ndarray, ends: np.ndarray, lf: np.ndarray, num_cols: int) -> bool:
    """Whether every line (ended by the LFs ``lf``) holds 0 or ``num_cols`` of the tokens."""
    if starts.size == lf.size * num_cols:  # no blank lines: line k holds tokens k*num_cols ...
        return bool((starts[num_cols::num_cols] > lf[:-1]).all()
                    and (ends[num_cols - 1::num_cols] <= lf).all())
    per_line = np.diff(np.searchsorted(starts, lf), prepend=0)
    return bool(((per_line == 0) | (per_line == num_cols)).all())


def _chunk_bytes_ok(buf: np.ndarray, digit: np.ndarray, extra: int = 0) -> bool:
    """Only digits, ``extra`` other accepted bytes, space, tab, LF, and CR before LF."""
    num_cr = np.count_nonzero(buf == 13)
    if np.count_nonzero(digit) + extra + np.count_nonzero(buf == 32) + np.count_nonzero(buf == 10) + \
            num_cr + np.count_nonzero(buf == 9) != buf.size:
        return False
    return not (num_cr and (buf[np.flatnonzero(buf == 13) + 1] != 10).any())  # the last byte is LF


def _uint_chunk(buf: np.ndarray, num_cols: int) -> np.ndarray | None:
    """Values of one chunk of whole lines (``buf``: ``_PAD`` spaces, then lines ending in LF), or None.

    Tokens are runs of digits, found where the digit mask changes (starts and ends alternate), and
    converted by :func:`_run_values`. Every line must hold 0 or ``num_cols`` tokens. None (the
    caller falls back to the general parsers) for a byte other than digit, space, tab, LF or
    CR-before-LF, a token over 8 digits, or another column count.
    """
    if sys.byteorder != "little":
        return None
    digit = (buf - np.uint8(48)) < 10
    if not _chunk_bytes_ok(buf, digit):
        return None
    edges = np.flatnonzero(digit[1:] != digit[:-1]) + 1  # buf starts and ends with a separator
    starts, ends = edges[0::2], edges[1::2]  # ends exclusive
    lengths = ends - starts
    if lengths.size and lengths.max() > 8:
        return None
    if not _lines_ok(starts, ends, np.flatnonzero(buf == 10), num_cols):
        return None
    return _run_values(buf, ends, lengths)


_POW10 = 10.0 ** np.arange(9)  # exact in float64
_POW10_INT = 10 ** np.arange(9, dtype=np.int64)


def _decimal_chunk(buf: np.ndarray, num_cols: int) -> np.ndarray | None:
    """float64 values of one chunk of plain decimals (``123``, ``84.213``, ``0.99998``), or None.

    The dot is a separator between two digit runs: a run after a dot is a fraction. With ``M`` the
    integer of all the number's digits and ``k`` its fraction digits, the value is ``M / 10**k``:
    for ``M <= 2**53`` both operands are exact doubles and IEEE division rounds correctly, so the
    result is exactly ``float(token)`` (the classic exact fast path of decimal conversion). None --
    and the caller's general parser -- for anything else: a sign, an exponent, inf/nan, a dot
    without digits on both sides, two dots, a run over 8 digits, ``M > 2**53``, another column count.
    """
    if sys.byteorder != "little":
        return None
    digit = (buf - np.uint8(48)) < 10
    dots = np.flatnonzero(buf == 46)
    if not _chunk_bytes_ok(buf, digit, dots.size):
        return None
    if dots.size and not (digit[dots - 1].all() and digit[dots + 1].all()):  # _PAD before, LF last
        return None
    edges = np.flatnonzero(digit[1:] != digit[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    if lengths.size and lengths.max() > 8:
        return None
    after_dot, before_dot = buf[starts - 1] == 46, buf[ends] == 46
    if (after_dot & before_dot).any():  # 1.2.3
        return None
    whole = np.flatnonzero(~after_dot)  # the integer part of every number
    has_frac = before_dot[whole]
    if not _lines_ok(starts[whole], ends[whole + has_frac], np.flatnonzero(buf == 10), num_cols):
        return None
    runs = _run_values(buf, ends, lengths)
    frac = whole + has_frac  # the fraction run, or the integer run itself (then weighted by 0)
    digits = lengths[frac] * has_frac
    mantissa = runs[whole] * _POW10_INT[digits] + runs[frac] * has_frac
    if mantissa.size and mantissa.max() > 2**53:
        return None
    values = mantissa.astype(np.float64)
    values /= _POW10[digits]
    return values


def _parse_fast(source: Path | io.BufferedIOBase, num_cols: int, chunk_parser) -> np.ndarray | None:
    """Vectorised parse of a numeric file, ``num_cols`` per line -> [R, num_cols], or None.

    Reads ~1 MB chunks into one reused buffer, each cut after its last LF (the rest is carried
    into the next chunk), and converts each with ``chunk_parser`` (:func:`_uint_chunk`,
    :func:`_decimal_chunk`) -- numpy passes over bytes and tokens, no per-number work in Python.
    CRLF, tabs, repeated spaces, blank lines and a missing final LF are accepted; anything else
    returns None and the caller's general path decides.
    """
    parts = []
    buf = np.empty(_PAD + 2 * _CHUNK_BYTES + 1, np.uint8)
    buf[:_PAD] = ord(" ")
    carry = b""
    with open(source, "rb") if isinstance(source, Path) else source as f:
        while True:
            data = carry + f.read(_CHUNK_BYTES)
            at_end = len(data) == len(carry)  # nothing more to read
            cut = len(data) if at_end else data.rfind(b"\n") + 1
            if not data:
                break
            if cut == 0:
                if len(data) > 64 * _CHUNK_BYTES:  # a 64 MB line: not an IJB file
                    return None
                carry = data
                continue
            carry = data[cut:]
            if buf.size < _PAD + cut + 1:
                buf = np.empty(_PAD + cut + 1, np.uint8)
                buf[:_PAD] = ord(" ")
            buf[_PAD:_PAD + cut] = np.frombuffer(data, np.uint8, cut)
            size = _PAD + cut
            if data[cut - 1] != ord("\n"):  # the last line lacks its LF
                buf[size] = ord("\n")
                size += 1
            values = chunk_parser(buf[:size], num_cols)
            if values is None:
                return None
            parts.append(values)
            if at_end:
                break
    if not parts:
        return np.zeros((0, num_cols), np.float64 if chunk_parser is _decimal_chunk else np.int64)
    return np.concatenate(parts).reshape(-1, num_cols)


def _parse_uint_fast(source: Path | io.BufferedIOBase, num_cols: int) -> np.ndarray | None:
    """Non-negative integers of up to 8 digits, ``num_cols`` per line -> [R, num_cols] int64, or None."""
    return _parse_fast(source, num_cols, _uint_chunk)


def _parse_decimal_fast(source: Path | io.BufferedIOBase, num_cols: int) -> np.ndarray | None:
    """Plain decimals, ``num_cols`` per line -> [R, num_cols] float64 equal to ``float(token)``, or None."""
    return _parse_fast(source, num_cols, _decimal_chunk)
