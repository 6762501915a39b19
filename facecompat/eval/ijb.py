"""IJB-C / IJB-B protocols: meta files, template pooling, 1:1 pair scores and 1:N search.

The folder layout is DESIGN §4 (``<target folder>/meta/<prefix>_*``, prefix ``ijbc``/``ijbb``;
:func:`find_target_dir` finds that folder).
The face order of every feature array is the line order of ``meta/<prefix>_name_5pts_score.txt``
(DESIGN §8); templates and media join it by image name, never by line number. Numbers follow
insightface's ``eval_ijbc.py`` (DESIGN §5): face feature (flip-fused, unnormalised) x detector
score, media = mean of its faces, template = sum of its media, L2-normalised, score = cosine.

Large files have vectorised fast paths that read the bytes with numpy in ~1 MB chunks, with no
per-value Python: the names column is cut off by :func:`_split_names`; integers (pair and
template/media files) are read 8 digits per gather (:func:`_uint_chunk`); plain decimals (the
5-point file) as two such digit runs around the dot, giving exactly ``float(token)``
(:func:`_decimal_chunk`); the 1:N CSVs by cutting fields at commas (:func:`_subject_csv_fast`).
Anything a fast path does not expect (signs, exponents, quotes, non-ASCII names, wrong column
counts) goes to a general path (``np.fromstring`` once line widths are checked, or the csv
module), and a bad line to a line-by-line pass whose :class:`IJBMetaError` names file and line.

1:N computes each gallery's full probe x gallery similarity matrix (faiss on a GPU, else one BLAS
product) and reads CMC and TPIR@FPIR from one blocked pass over it (:func:`metrics.identification`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facecompat.errors import UserError
from facecompat.eval import metrics

GALLERY_NAMES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
_FIRST_FIELD = re.compile(r"^[ \t]*(\S+)", re.MULTILINE)


class IJBMetaError(UserError, ValueError):
    """A missing or malformed IJB meta file; the message names the file and the line or value."""


@dataclass
class Subjects:
    """1:N templates of a gallery or of the probe set: ``template_ids`` [T] sorted, ``subject_ids`` [T]."""

    template_ids: np.ndarray
    subject_ids: np.ndarray


@dataclass
class IJBMeta:
    """Everything the IJB protocols need, in the face order of the feature files.

    Attributes:
        image_names: [N] image names, line order of ``*_name_5pts_score.txt`` (= feature rows).
        landmarks: [N, 5, 2] float32 (x, y) per face.
        det_scores: [N] float32 detector scores.
        template_ids, media_ids: [N] int64, joined from ``*_face_tid_mid.txt`` by image name;
            -1 for faces absent from it (only with ``allow_missing``; pooling skips them).
        pair_t1, pair_t2: [M] int64 template ids; pair_labels: [M] int8 (1 = genuine).
        galleries: gallery name (G1/G2 or S1/S2) -> :class:`Subjects`; empty without 1:N files.
        probes: :class:`Subjects` of the probe templates, or None without 1:N files.
        num_missing_faces: faces dropped from either face file (``allow_missing``).
        num_missing_pairs: pairs dropped for naming templates with no face (``allow_missing``).
    """

    target: str
    image_names: np.ndarray
    landmarks: np.ndarray
    det_scores: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray
    galleries: dict[str, Subjects] = field(default_factory=dict)
    probes: Subjects | None = None
    num_missing_faces: int = 0
    num_missing_pairs: int = 0
    # pair template rows per template list (every model of one meta pools to the same list)
    _pair_rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def clear_cache(self) -> None:
        """Forget the cached pair rows (a benchmark that times the lookup again)."""
        self._pair_rows = {}

    def pair_rows(self, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the pairs' first and second templates in ``templates`` (sorted ids), cached."""
        key = hashlib.sha1(np.ascontiguousarray(templates, np.int64).tobytes()).hexdigest()
        if key not in self._pair_rows:
            self._pair_rows = {key: (_template_rows(templates, self.pair_t1, "pair file"),
                                     _template_rows(templates, self.pair_t2, "pair file"))}
        return self._pair_rows[key]

    @property
    def num_faces(self) -> int:
        return len(self.image_names)

    @property
    def has_1n(self) -> bool:
        return self.probes is not None and bool(self.galleries)


# ----------------------------------------------------------------------------------------- parsing
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise IJBMetaError(f"{path}: missing meta file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise IJBMetaError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _fromstring(text: str | bytes, dtype: type) -> np.ndarray | None:
    """All whitespace-separated numbers of ``text``, or None if any token is not one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=" ")
        except (ValueError, DeprecationWarning):
            return None


def _slow_rows(path: Path, text: str, num_cols: int, first_is_name: bool,
               dtype: type) -> tuple[list[str], np.ndarray]:
    """Line-by-line parse (diagnosis path): raises on the first bad line."""
    names, rows = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != num_cols:
            raise IJBMetaError(f"{path}:{lineno}: expected {num_cols} columns, got {len(parts)}: {line!r}")
        if first_is_name:
            names.append(parts[0])
            parts = parts[1:]
        try:
            rows.append([dtype(p) for p in parts])
        except ValueError:
            raise IJBMetaError(f"{path}:{lineno}: not a number in {line!r}") from None
    width = num_cols - int(first_is_name)
    return names, np.array(rows, dtype=np.float64 if dtype is float else np.int64).reshape(-1, width)


def _split_names(text: str) -> tuple[list[str], bytes] | None:
    """First field of every line, and the text with those fields blanked to spaces; or None.

    Vectorised over bytes. Usually every line starts with its name: a name then runs from a line
    start to the next whitespace byte (one ``searchsorted`` per line, among the whitespace
    positions). Otherwise (blank lines, leading whitespace) tokens are runs of non-whitespace and a
    token is its line's first when no LF lies between it and the previous token (``searchsorted``
    of all token starts among the LFs). The name bytes are blanked through a cumulative sum of
    +1/-1 marks. Only for plain ASCII text (bytes 32..126 plus tab, CR, LF), where bytes and
    characters agree and no other whitespace exists; None otherwise (the regex path handles the rest).
    """
    data = text.encode("ascii")  # the caller checked isascii(): byte offsets are character offsets
    raw = np.frombuffer(data, np.uint8)
    space, tab, cr, lf = raw == 32, raw == 9, raw == 13, raw == 10
    num_ws = [np.count_nonzero(x) for x in (space, tab, cr, lf)]
    if np.count_nonzero((raw >= 32) & (raw < 127)) + sum(num_ws[1:]) != raw.size:
        return None
    ws = space
    for x in (tab, cr, lf):
        ws |= x
    del tab, cr
    lf_pos = np.flatnonzero(lf)
    line_starts = np.r_[0, lf_pos + 1]
    if line_starts[-1] == raw.size:  # the text ends with LF
        line_starts = line_starts[:-1]
    every_line_named = bool(line_starts.size) and not ws[line_starts].any()
    if every_line_named:  # every line starts with its name
        ws_pos = np.r_[np.flatnonzero(ws), raw.size]
        name_starts, name_ends = line_starts, ws_pos[np.searchsorted(ws_pos, line_starts)]
    else:
        token = np.r_[False, ~ws, False]
        edges = np.flatnonzero(token[1:] != token[:-1])
        starts, ends = edges[0::2], edges[1::2]
        line = np.searchsorted(lf_pos, starts)
        first = np.r_[True, line[1:] != line[:-1]] if line.size else np.zeros(0, bool)
        name_starts, name_ends = starts[first], ends[first]
    marks = np.zeros(raw.size + 1, np.int8)
    marks[name_starts] = 1
    marks[name_ends] = -1
    is_name = np.cumsum(marks[:-1], dtype=np.int8).view(bool)
    if every_line_named:  # the names with their LFs, split by str.split in C (slicing costs ~1 us each)
        names = raw[is_name | lf].tobytes().decode("ascii").split("\n")
        if len(names) > name_starts.size:  # the text ends with LF
            names.pop()
    else:
        names = list(map(text.__getitem__, map(slice, name_starts.tolist(), name_ends.tolist())))
    rest = raw.copy()
    rest[is_name] = 32
    return names, rest.tobytes()


def _widths_ok(data: bytes, width: int) -> bool:
    """Whether every line of ``data`` holds 0 or ``width`` whitespace-separated tokens.

    ``np.fromstring`` sees one stream of numbers, so a short line followed by a long one would
    pass its count check; this vectorised check keeps such files for the line-by-line diagnosis.
    """
    raw = np.frombuffer(data + b"\n", np.uint8)
    token = np.r_[False, (raw != 32) & (raw != 9) & (raw != 10) & (raw != 13) & (raw != 11) & (raw != 12),
                  False]
    edges = np.flatnonzero(token[1:] != token[:-1])
    return _lines_ok(edges[0::2], edges[1::2], np.flatnonzero((raw == 10) | (raw == 13)), width)


def _parse_named_table(path: Path, num_cols: int, dtype: type) -> tuple[list[str], np.ndarray]:
    """Rows ``name v1 .. v{num_cols-1}``: names and values [R, num_cols - 1].

    Fast path: :func:`_split_names` (vectorised) takes the names off, then the numbers are parsed
    by :func:`_parse_uint_fast` (integers) or :func:`_parse_decimal_fast` (plain decimals, else
    ``np.fromstring``); a regex split is the fallback for non-ASCII text, and any mismatch goes to
    the line-by-line diagnosis.
    """
    text = _read_text(path)
    width = num_cols - 1
    split = _split_names(text) if text.isascii() else None
    if split is not None:
        names, rest = split
        if dtype is int and width:  # the fast path checks every line; what it declines is diagnosed
            values = _parse_uint_fast(io.BytesIO(rest), width)
            if values is None or values.shape[0] != len(names):
                return _slow_rows(path, text, num_cols, True, dtype)
        else:  # plain decimals (the 5-point file); signs, exponents, inf/nan go to np.fromstring
            values = _parse_decimal_fast(io.BytesIO(rest), width) if width else None
            if values is None or values.shape[0] != len(names):
                values = _fromstring(rest, dtype) if _widths_ok(rest, width) else None
    else:
        # C-speed passes over the whole text: the first field of every line, then the numbers after it
        names = _FIRST_FIELD.findall(text)
        rest = _FIRST_FIELD.sub("", text).encode("utf-8")
        values = _fromstring(rest, dtype) if _widths_ok(rest, width) else None
    if values is None or values.size != len(names) * width:
        return _slow_rows(path, text, num_cols, True, dtype)
    return names, values.reshape(-1, width)


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


def _parse_int_table(path: Path, num_cols: int) -> np.ndarray:
    """A purely numeric file of ``num_cols`` integer columns -> [R, num_cols] int64.

    Non-negative integers of up to 8 digits take :func:`_parse_uint_fast`; anything it declines
    (negative or longer numbers, other whitespace, a malformed line) the line-by-line parse, which
    checks every line's column count and names the first bad line.
    """
    if not path.is_file():
        raise IJBMetaError(f"{path}: missing meta file")
    values = _parse_uint_fast(path, num_cols)
    if values is not None:
        return values
    return _slow_rows(path, _read_text(path), num_cols, False, int)[1]


def _subject_csv_fast(text: str) -> Subjects | None:
    """The common 1:N CSV (no quotes, integer TEMPLATE_ID/SUBJECT_ID of <= 8 digits) vectorised, or None.

    Fields are cut at the commas (every line must have as many as the header; blank lines are
    declined), the two id fields are kept and every other byte blanked to a space, and
    :func:`_parse_uint_fast` reads the ids two per line. A template's rows must agree on the
    subject. None for anything else, and :func:`_subject_csv_rows` (the csv module) reads or
    diagnoses the file.
    """
    if '"' in text or not text.isascii():
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            return None
    first_lf = text.find("\n")
    if first_lf < 0:
        return None
    header = [h.strip().upper() for h in text[:first_lf].split(",")]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        return None
    it, isub = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    raw = np.frombuffer(text.encode("ascii"), np.uint8)[first_lf + 1:]
    if raw.size and raw[-1] != 10:
        raw = np.r_[raw, np.uint8(10)]
    lf = np.flatnonzero(raw == 10)
    commas = np.flatnonzero(raw == 44)
    ncomma = len(header) - 1
    if commas.size != lf.size * ncomma:
        return None
    cuts = np.concatenate([np.r_[-1, lf[:-1]][:, None], commas.reshape(-1, ncomma), lf[:, None]], axis=1) \
        if lf.size else np.zeros((0, ncomma + 2), np.int64)
    if (np.diff(cuts, axis=1) <= 0).any():  # a comma outside its line
        return None
    if (cuts[:, [it + 1, isub + 1]] - cuts[:, [it, isub]] < 2).any():  # an empty id field
        return None
    keep = np.zeros(raw.size + 1, np.int8)  # +1 where an id field starts, -1 after it: all distinct
    for col in (it, isub):
        keep[cuts[:, col] + 1] = 1
        keep[cuts[:, col + 1]] = -1
    ids = np.where(np.cumsum(keep[:-1], dtype=np.int8).view(bool), raw, np.uint8(32))
    ids[lf] = 10
    values = _parse_uint_fast(io.BytesIO(ids.tobytes()), 2)
    if values is None or values.shape[0] != lf.size:
        return None
    tids, sids = (values[:, 0], values[:, 1]) if it < isub else (values[:, 1], values[:, 0])
    order = np.argsort(tids, kind="stable")
    tids, sids = tids[order], sids[order]
    first = np.r_[True, tids[1:] != tids[:-1]] if tids.size else np.zeros(0, bool)
    if (sids != sids[np.maximum.accumulate(np.where(first, np.arange(tids.size), 0))]).any():
        return None  # a template with two subjects: the csv path names the line
    return Subjects(tids[first], sids[first])


def _subject_csv_rows(path: Path, text: str) -> dict[int, int]:
    """TEMPLATE_ID -> SUBJECT_ID through the csv module (general path; names the first bad line)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise IJBMetaError(f"{path}: empty file (expected a header with TEMPLATE_ID,SUBJECT_ID)")
    header = [h.strip().upper() for h in header]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise IJBMetaError(f"{path}:1: header lacks TEMPLATE_ID and SUBJECT_ID: {','.join(header)}")
    it, isub = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    subject_of: dict[int, int] = {}
    for lineno, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) != len(header):
            raise IJBMetaError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
        try:
            tid, sid = int(row[it]), int(row[isub])
        except ValueError:
            raise IJBMetaError(f"{path}:{lineno}: TEMPLATE_ID/SUBJECT_ID not integers: "
                               f"{row[it]!r}, {row[isub]!r}") from None
        if subject_of.setdefault(tid, sid) != sid:
            raise IJBMetaError(f"{path}:{lineno}: template {tid} has two subjects "
                               f"({subject_of[tid]} and {sid})")
    return subject_of


def _parse_subject_csv(path: Path) -> Subjects:
    """The templates of a 1:N CSV (one row per face; a template has one subject), sorted by id.

    IJB-C's probe CSV has ~400k rows, which the csv module and a dict take ~2 s over; the common
    shape takes :func:`_subject_csv_fast`, anything else (quotes, odd rows, errors) the csv module.
    """
    text = _read_text(path)
    fast = _subject_csv_fast(text)
    return fast if fast is not None else _subjects(_subject_csv_rows(path, text))


def _subjects(subject_of: dict[int, int]) -> Subjects:
    tids = np.array(sorted(subject_of), dtype=np.int64)
    return Subjects(tids, np.array([subject_of[t] for t in tids.tolist()], dtype=np.int64))


def _preview(values: Sequence[object], n: int = 5) -> str:
    shown = ", ".join(str(v) for v in list(values)[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


META_CACHE_VERSION = 1


def find_target_dir(root: str | Path, target: str = "IJBC") -> Path:
    """The IJB-C / IJB-B folder (``meta/``, ``loose_crop/``) of ``root``: the one rule every tool uses.

    The folder is known by its content, not its name: ``root`` itself when its ``meta/`` holds
    ``<ijbc|ijbb>_*`` files (insightface's ``IJB_release/IJBC``, or a folder named anything),
    else ``root/<target>`` when that one's ``meta/`` does. Calling it again on its answer gives
    the same folder.

    Raises:
        IJBMetaError: an unknown target, or neither folder holds the target's meta files; the
            message names the meta folder looked at (``root/<target>/meta`` when that folder
            exists, else ``root/meta``).
    """
    if target not in GALLERY_NAMES:
        raise IJBMetaError(f"target {target!r}: expected one of {sorted(GALLERY_NAMES)}")
    root, prefix = Path(root), target.lower()
    for folder in (root, root / target):
        if (folder / "meta").is_dir() and any((folder / "meta").glob(f"{prefix}_*")):
            return folder
    if not root.is_dir():
        raise IJBMetaError(f"{root}: no such folder (the {target} folder, or a folder holding it)")
    # name what was looked at, the folder that exists first; never a doubled <target>/<target>
    looked_at = [root / "meta"] if root.name.upper() == target else [root / target / "meta", root / "meta"]
    looked_at.sort(key=lambda p: not p.parent.is_dir())
    also = f", nor in {looked_at[1]}" if len(looked_at) > 1 else ""
    raise IJBMetaError(f"{looked_at[0]}: no {target} meta files ({prefix}_face_tid_mid.txt etc.){also}; "
                       f"give the {target} folder (holding meta/) or a folder holding {target}/meta/")


def load_ijb_meta(root: str | Path, target: str = "IJBC", allow_missing: bool = False,
                  cache_dir: str | Path | None = None) -> IJBMeta:
    """Read an IJB-C / IJB-B meta folder.

    Args:
        root: the ``<target>`` folder (any name) or a folder holding it; see :func:`find_target_dir`.
        target: "IJBC" or "IJBB".
        allow_missing: skip (and count) faces present in only one face file and pairs naming a
            template without faces, instead of raising.
        cache_dir: keep the parsed meta as ``<cache_dir>/meta/<target>-<key>.npz`` and read it
            from there while every meta file keeps its path, size and modification time (the
            key); parsing IJB-C's 235 MB of text takes seconds, loading the arrays a fraction.

    Returns:
        :class:`IJBMeta`. 1:N fields are filled when all three 1:N CSVs exist; with none, 1:1 only.

    Raises:
        IJBMetaError: no meta folder, a missing 1:1 file, one or two of the three 1:N CSVs missing,
            or a malformed line; naming the file and line or value.
    """
    meta_dir = find_target_dir(root, target) / "meta"
    prefix = target.lower()
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    for path in (pts_path, tid_path, pair_path):
        if not path.is_file():
            raise IJBMetaError(f"{path}: missing meta file")
    if cache_dir is None:
        return _parse_meta(meta_dir, target, allow_missing)
    cache = _meta_cache_path(Path(cache_dir), meta_dir, target, allow_missing)
    if cache.is_file():
        try:
            return _read_meta_cache(cache, target)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: parse again and rewrite it
    meta = _parse_meta(meta_dir, target, allow_missing)
    _write_meta_cache(cache, meta)
    return meta


def _member(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``np.isin(values, members)``; a lookup table when the ids are small non-negative integers."""
    if members.size and values.size and members.min() >= 0 and values.min() >= 0 and \
            max(int(values.max()), int(members.max())) < (1 << 26):
        table = np.zeros(max(int(values.max()), int(members.max())) + 1, bool)
        table[members] = True
        return table[values]
    return np.isin(values, members)


def _meta_cache_path(cache_dir: Path, meta_dir: Path, target: str, allow_missing: bool) -> Path:
    """``<cache_dir>/meta/<target>-<key>.npz``; the key covers every meta file's path, size, mtime."""
    digest = hashlib.sha1(f"v{META_CACHE_VERSION} {target} {allow_missing}".encode())
    for path in sorted(meta_dir.glob(f"{target.lower()}_*")):
        st = path.stat()
        digest.update(f"\n{path.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return cache_dir / "meta" / f"{target}-{digest.hexdigest()[:20]}.npz"


def _write_meta_cache(path: Path, meta: IJBMeta) -> None:
    from facecompat.fileio import atomic_write

    arrays = {"image_names": meta.image_names, "landmarks": meta.landmarks, "det_scores": meta.det_scores,
              "template_ids": meta.template_ids, "media_ids": meta.media_ids,
              "pair_t1": _narrow(meta.pair_t1), "pair_t2": _narrow(meta.pair_t2),
              "pair_labels": meta.pair_labels,
              "counts": np.array([meta.num_missing_faces, meta.num_missing_pairs], np.int64)}
    groups = dict(meta.galleries)
    if meta.probes is not None:
        groups["probes"] = meta.probes
    arrays["groups"] = np.array(list(groups))
    for name, group in groups.items():
        arrays[f"group_{name}_templates"] = group.template_ids
        arrays[f"group_{name}_subjects"] = group.subject_ids
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    for old in path.parent.glob(f"{meta.target}-*.npz"):  # earlier versions of these files
        if old != path:
            old.unlink(missing_ok=True)


def _narrow(ids: np.ndarray) -> np.ndarray:
    """int32 when every id fits (halves the 15.6M-pair arrays on disk), else unchanged."""
    if ids.size and ids.min() >= -(1 << 31) and ids.max() < (1 << 31):
        return ids.astype(np.int32)
    return ids


def _read_meta_cache(path: Path, target: str) -> IJBMeta:
    with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
        meta = IJBMeta(target, z["image_names"], z["landmarks"], z["det_scores"], z["template_ids"],
                       z["media_ids"], z["pair_t1"].astype(np.int64), z["pair_t2"].astype(np.int64),
                       z["pair_labels"],
                       num_missing_faces=int(counts[0]), num_missing_pairs=int(counts[1]))
        for name in z["groups"].tolist():
            group = Subjects(z[f"group_{name}_templates"], z[f"group_{name}_subjects"])
            if name == "probes":
                meta.probes = group
            else:
                meta.galleries[name] = group
    return meta


def _parse_meta(meta_dir: Path, target: str, allow_missing: bool) -> IJBMeta:
    """The meta files of ``meta_dir`` parsed (see :func:`load_ijb_meta`)."""
    prefix = target.lower()
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    names, pts = _parse_named_table(pts_path, 12, float)
    image_names = np.array(names)
    row_of = {name: i for i, name in enumerate(names)}
    if len(row_of) != len(names):
        raise IJBMetaError(f"{pts_path}: duplicate image names")
    tid_names, tid_mid = _parse_named_table(tid_path, 3, int)
    template_ids = np.full(len(names), -1, np.int64)
    media_ids = np.full(len(names), -1, np.int64)
    rows = np.fromiter((row_of.get(n, -1) for n in tid_names), np.int64, len(tid_names))
    num_missing = 0
    unknown = [tid_names[i] for i in np.flatnonzero(rows < 0)]
    if unknown:
        if not allow_missing:
            raise IJBMetaError(f"{tid_path}: images without a line in {pts_path.name}: {_preview(unknown)}")
        num_missing += len(unknown)
    known = rows >= 0
    if np.bincount(rows[known], minlength=1).max(initial=0) > 1:
        raise IJBMetaError(f"{tid_path}: duplicate image names")
    template_ids[rows[known]] = tid_mid[known, 0]
    media_ids[rows[known]] = tid_mid[known, 1]
    no_template = np.flatnonzero(template_ids < 0)
    if no_template.size:
        if not allow_missing:
            raise IJBMetaError(f"{pts_path}: images without a line in {tid_path.name}: "
                               f"{_preview(image_names[no_template].tolist())}")
        num_missing += no_template.size

    pairs = _parse_int_table(pair_path, 3)
    face_templates = np.unique(template_ids[template_ids >= 0])
    has_faces = _member(pairs[:, 0], face_templates) & _member(pairs[:, 1], face_templates)
    num_missing_pairs = int((~has_faces).sum())
    if num_missing_pairs:
        absent = np.setdiff1d(pairs[~has_faces, :2], face_templates)
        if not allow_missing:
            raise IJBMetaError(f"{pair_path}: templates without faces in {tid_path.name}: "
                               f"{_preview(absent.tolist())}")
        pairs = pairs[has_faces]
    bad_label = ~np.isin(pairs[:, 2], (0, 1))
    if bad_label.any():
        raise IJBMetaError(f"{pair_path}: label {pairs[bad_label, 2][0]} is not 0 or 1")

    meta = IJBMeta(target, image_names, pts[:, :10].reshape(-1, 5, 2).astype(np.float32),
                   pts[:, 10].astype(np.float32), template_ids, media_ids,
                   pairs[:, 0].copy(), pairs[:, 1].copy(), pairs[:, 2].astype(np.int8),
                   num_missing_faces=num_missing, num_missing_pairs=num_missing_pairs)
    csvs = {g: meta_dir / f"{prefix}_1N_gallery_{g}.csv" for g in GALLERY_NAMES[target]}
    probe_csv = meta_dir / f"{prefix}_1N_probe_mixed.csv"
    missing = [p for p in (*csvs.values(), probe_csv) if not p.is_file()]
    if missing and len(missing) < len(csvs) + 1:  # a half-copied 1:N set: not a silent "1:1 only"
        present = sorted({*csvs.values(), probe_csv} - set(missing))
        raise IJBMetaError(f"{meta_dir}: missing 1:N file {' and '.join(p.name for p in missing)} "
                           f"({', '.join(p.name for p in present)} present; 1:N needs all "
                           f"{len(csvs) + 1}, or none for 1:1 only)")
    if not missing:
        meta.galleries = {g: _parse_subject_csv(p) for g, p in csvs.items()}
        meta.probes = _parse_subject_csv(probe_csv)
    return meta


# ----------------------------------------------------------------------------------------- pooling
def _segment_sum(rows_of: np.ndarray, starts: np.ndarray, sizes: np.ndarray, values: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sums of groups of rows: ``sum_k w * values[rows_of[starts[g] + k]]`` over k < sizes[g].

    Groups are processed largest first, so step k (the k-th member of every group that has one)
    touches a prefix of the output: one gather into a reused buffer and one in-place add per step,
    as many steps as the largest group. No sorted copy of ``values`` and no per-step allocation
    (fresh pages are what make large temporaries slow). float32 sums run in member order, like
    insightface's ``np.mean``/``np.sum`` over small groups.

    Returns:
        sums [G, D] float32 in largest-first order, and ``perm`` [G]: ``sums[i]`` is group
        ``perm[i]``.
    """
    import torch

    perm = np.argsort(-sizes, kind="stable")
    starts, sizes = starts[perm], sizes[perm]
    out = np.empty((starts.size, values.shape[1]), np.float32)
    buf = np.empty((int(np.count_nonzero(sizes > 1)), values.shape[1]), np.float32)
    # torch's row gather runs on every core (numpy's np.take on one); the adds are elementwise, so
    # the sums are the same float32 numbers in the same order either way
    with warnings.catch_warnings():  # a read-only memory-mapped cache file: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        values_t = torch.from_numpy(values)
    out_t, buf_t = torch.from_numpy(out), torch.from_numpy(buf)
    weights_t = torch.from_numpy(weights) if weights is not None else None
    rows = torch.from_numpy(rows_of[starts])
    torch.index_select(values_t, 0, rows, out=out_t)
    if weights_t is not None:
        out_t.mul_(weights_t[rows, None])
    for k in range(1, int(sizes.max(initial=1))):
        n = int(np.count_nonzero(sizes > k))  # sizes descend: groups with a k-th member are a prefix
        rows = torch.from_numpy(rows_of[starts[:n] + k])
        torch.index_select(values_t, 0, rows, out=buf_t[:n])
        if weights_t is not None:
            buf_t[:n].mul_(weights_t[rows, None])
        out_t[:n].add_(buf_t[:n])
    return out, perm


def pool_templates(features: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray,
                   weights: np.ndarray | None = None,
                   dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Template features, insightface style: weighted faces -> media mean -> template sum -> L2.

    Vectorised: faces are ordered by (template, media) once; media sums and template sums are
    segment sums over that order (:func:`_segment_sum`), with no Python loop over templates and
    no sorted copy of the features.

    Args:
        features: [N, D] face features (flip-fused, not normalised).
        template_ids, media_ids: [N] ints; faces with a negative template id are skipped.
        weights: [N] per-face weights (detector scores) or None.
        dtype: of the normalised templates. Weighting, media means and template sums are float32
            either way (as insightface computes them); float64 normalises as insightface does
            (its template array is float64), float32 saves memory.

    Returns:
        templates [T] sorted unique template ids (int64), feats [T, D] ``dtype``, L2-normalised
        (a zero template stays zero).
    """
    features = np.asarray(features)
    template_ids, media_ids = np.asarray(template_ids), np.asarray(media_ids)
    if features.ndim != 2 or features.shape[0] != template_ids.size or media_ids.size != template_ids.size:
        raise ValueError(f"features {features.shape}, template_ids {template_ids.shape} and media_ids "
                         f"{media_ids.shape} must describe the same faces")
    if weights is not None:
        if np.shape(weights) != template_ids.shape:
            raise ValueError(f"weights {np.shape(weights)} must be one per face ({template_ids.size})")
        weights = np.asarray(weights, np.float32)
    valid = np.flatnonzero(template_ids >= 0)
    order = valid[np.lexsort((media_ids[valid], template_ids[valid]))]
    tid_sorted, mid_sorted = template_ids[order], media_ids[order]
    new_template = np.r_[True, tid_sorted[1:] != tid_sorted[:-1]]
    new_media = new_template | np.r_[True, mid_sorted[1:] != mid_sorted[:-1]]
    media_start = np.flatnonzero(new_media)  # position in `order` where each media starts
    media_size = np.diff(np.r_[media_start, order.size])
    if features.dtype != np.float32:
        features = features.astype(np.float32)
    media_sum, media_perm = _segment_sum(order, media_start, media_size, features, weights)
    media_sum /= media_size[media_perm, None].astype(np.float32)  # media means
    media_row = np.empty_like(media_perm)
    media_row[media_perm] = np.arange(media_perm.size)  # media m (template order) is media_sum[media_row[m]]
    first_media = np.flatnonzero(new_template[media_start])  # media index where each template starts
    num_media = np.diff(np.r_[first_media, media_start.size])
    template_sum, template_perm = _segment_sum(media_row, first_media, num_media, media_sum)
    pooled = np.empty_like(template_sum)
    pooled[template_perm] = template_sum
    templates = tid_sorted[media_start[first_media]].astype(np.int64)
    pooled = pooled.astype(dtype, copy=False)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    np.divide(pooled, norms, out=pooled, where=norms > 0)
    return templates, pooled


# ------------------------------------------------------------------------------------------ scores
def score_pairs(feats1: np.ndarray, feats2: np.ndarray, index1: np.ndarray,
                index2: np.ndarray, block: int = 2048, min_density: float = 1 / 64) -> np.ndarray:
    """Scores ``feats1[index1[k]] . feats2[index2[k]]`` of many template pairs.

    IJB-C's pairs cover ~3% of the template x template matrix, so dense block products waste ~30x
    the work; instead every pair is one sampled dot product (``torch.sparse.sampled_addmm``: a CSR
    pattern of the pairs times ``query @ gallery_band.T``, computed only at the pattern). Pairs are
    split into column bands of ``block`` gallery templates so the band (4 MB at 512-d) stays in
    cache while all query rows stream past it once.

    The CSR order (band, row) comes from one ``np.sort`` of an int64 key ``(band * T + row) << 32
    | pair`` -- numpy's vectorised (AVX-512) sort is several times faster than any argsort, and the
    row, band and pair index all come back from the sorted key by shifts and masks; only the column
    needs a gather, and the values one scatter back to pair order (torch's ``index_copy_``, ~1.5x
    numpy's). A band denser than itself (repeated pairs) is one GEMM. Inputs with fewer than
    ``min_density * block**2`` pairs (or more pairs than the key can hold) use row gathers.
    Pass the same array twice for a self test (no copy is made).

    Args:
        feats1: [T, D] templates of each pair's first member (L2-normalised -> cosine).
        feats2: [T, D] templates of each pair's second member, same template order.
        index1, index2: [M] template row indices.
        block: gallery templates per column band.
        min_density: below ``min_density * block**2`` pairs, score by row gathers.

    Returns:
        [M] scores in pair order: float64 when either input is float64, float32 otherwise.
    """
    self_test = feats1 is feats2
    dtype = np.float64 if np.float64 in (np.asarray(feats1).dtype, np.asarray(feats2).dtype) \
        else np.float32
    feats1 = np.ascontiguousarray(feats1, dtype)
    feats2 = feats1 if self_test else np.ascontiguousarray(feats2, dtype)
    if feats1.shape != feats2.shape:
        raise ValueError(f"first {feats1.shape} and second {feats2.shape} feats differ")
    # int32 indices: at IJB-C size every [M] int64 temporary is 125 MB
    index1, index2 = np.asarray(index1, np.int32).ravel(), np.asarray(index2, np.int32).ravel()
    if index1.shape != index2.shape:
        raise ValueError(f"index1 {index1.shape} and index2 {index2.shape} differ")
    num_pairs, num_templates = index1.size, feats1.shape[0]
    block = max(1, min(int(block), num_templates))
    num_bands = -(-num_templates // block)
    if num_pairs < max(min_density * block * block, 1) or num_pairs >= 2**32 or \
            num_bands * num_templates >= 2**31:
        scores = np.empty(num_pairs, dtype)
        for s in range(0, num_pairs, 65_536):
            e = min(s + 65_536, num_pairs)
            np.einsum("ij,ij->i", feats1[index1[s:e]], feats2[index2[s:e]], out=scores[s:e])
        return scores
    import torch

    # key = (band * T + row) << 32 | pair, built in place (one int64 array, no int64 temporaries)
    key = np.empty(num_pairs, np.int64)
    band_row = index2 // np.int32(block)
    band_row *= np.int32(num_templates)
    band_row += index1
    key[:] = band_row
    del band_row
    key <<= 32
    key |= np.arange(num_pairs, dtype=np.int64)
    key.sort()
    bounds = np.searchsorted(key, (np.arange(num_bands + 1, dtype=np.int64) * num_templates) << 32).tolist()
    feats1_t, feats2_t = torch.from_numpy(feats1), torch.from_numpy(feats2)
    scores = np.empty(num_pairs, dtype)
    scores_t = torch.from_numpy(scores)
    with warnings.catch_warnings():  # torch's note that beta=0 still multiplies (hence zero values)
        warnings.simplefilter("ignore", UserWarning)
        for band in range(num_bands):
            s, e = bounds[band], bounds[band + 1]
            if s == e:
                continue
            c0 = band * block
            width = min(block, num_templates - c0)
            part = key[s:e]
            rows = (part >> 32) - band * num_templates
            pair = part & 0xFFFFFFFF
            cols = index2[pair] - np.int32(c0)
            if e - s >= num_templates * width:  # denser than the band itself (repeats): one GEMM
                scores[pair] = (feats1 @ feats2[c0:c0 + width].T)[rows, cols]
                continue
            crow = torch.zeros(num_templates + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(torch.from_numpy(rows), minlength=num_templates), 0, out=crow[1:])
            pattern = torch.sparse_csr_tensor(crow, torch.from_numpy(cols.astype(np.int64)),
                                              torch.zeros(e - s, dtype=feats1_t.dtype),  # 0 * NaN is NaN
                                              size=(num_templates, width))
            values = torch.sparse.sampled_addmm(pattern, feats1_t, feats2_t[c0:c0 + width].T, beta=0.0)
            scores_t.index_copy_(0, torch.from_numpy(pair), values.values())  # faster than numpy's
    return scores


def _template_rows(templates: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """int32 row of every id of ``ids`` in the sorted ``templates``; IJBMetaError naming ``what`` if absent.

    Template ids are small non-negative integers (IJB-C's go to ~190k), so a lookup table is one
    gather per id; a searchsorted of IJB-C's 15.6M unsorted pair ids costs ~2 s per column.
    """
    ids = np.asarray(ids)
    if templates.size == 0:
        if ids.size:
            raise IJBMetaError(f"{what}: templates without faces: {_preview(np.unique(ids).tolist())}")
        return np.zeros(0, np.int32)
    low, high = int(templates[0]), int(templates[-1])
    if low >= 0 and high < max(1 << 24, 4 * ids.size) and (ids.size == 0 or ids.min() >= 0):
        table = np.full(high + 2, -1, np.int32)  # the last slot answers every id above the range
        table[templates] = np.arange(templates.size, dtype=np.int32)
        rows = np.take(table, ids, mode="clip")
        bad = rows < 0
    else:  # ids too spread for a table
        rows = np.minimum(np.searchsorted(templates, ids), templates.size - 1).astype(np.int32)
        bad = templates[rows] != ids
    if bad.any():
        raise IJBMetaError(f"{what}: templates without faces: {_preview(np.unique(ids[bad]).tolist())}")
    return rows


@dataclass
class Pooled:
    """Template features of one model: ``templates`` [T] sorted ids, ``feats`` [T, D] float32
    L2-normalised (fast scoring, 1:N), ``exact`` the same in float64 as insightface holds them
    (pairs near each target FAR are re-scored from it, so TAR@FAR equals insightface's).

    Pool each model once (:func:`pool`) and score any query/gallery combination from the results.
    """

    templates: np.ndarray
    feats: np.ndarray
    exact: np.ndarray | None = None

    def rows(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Row of every template id in ``ids``; :class:`IJBMetaError` naming ``what`` if one is absent."""
        return _template_rows(self.templates, ids, what)

    @functools.cached_property
    def max_norm(self) -> float:
        """Largest template norm (1.0 for pooled templates; computed once, used by every cell)."""
        feats = self.exact if self.exact is not None else self.feats
        return float(np.sqrt(np.einsum("ij,ij->i", feats, feats).max(initial=0.0)))


def pool(meta: IJBMeta, features: np.ndarray, score_weighting: bool = True) -> Pooled:
    """Pool one model's [N, D] face features (face order of ``meta``) into templates."""
    if features.ndim != 2 or features.shape[0] != meta.num_faces:
        raise ValueError(f"features have {features.shape[0]} rows (shape {features.shape}), the meta lists "
                         f"{meta.num_faces} faces")
    weights = meta.det_scores if score_weighting else None
    templates, exact = pool_templates(features, meta.template_ids, meta.media_ids, weights, np.float64)
    return Pooled(templates, exact.astype(np.float32), exact)


def _check_pair(query: Pooled, gallery: Pooled) -> None:
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise ValueError(f"query features are {query.feats.shape[1]}-d, gallery features "
                         f"{gallery.feats.shape[1]}-d: they cannot be compared")
    if not np.array_equal(query.templates, gallery.templates):
        raise ValueError("query and gallery were pooled from different face lists")


def _float32_score_error(query: Pooled, gallery: Pooled) -> float:
    """Bound on |float32 score - float64 score|: rounding both templates to float32 (2u) plus a
    D-term float32 dot product in any order (gamma_D), relative to |q| |g| (u = 2**-24)."""
    unit = 2.0 ** -24
    dim = query.feats.shape[1]
    return 1.01 * ((dim + 3) * unit) * max(query.max_norm * gallery.max_norm, 1.0)


def tar_from_scores(meta: IJBMeta, first: Pooled, second: Pooled, scores: np.ndarray, rows1: np.ndarray,
                    rows2: np.ndarray, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                    fars: Sequence[float] = metrics.DEFAULT_FARS) -> tuple[dict, dict]:
    """TAR@FAR (nearest point, strict) of float32 pair ``scores`` and their ROC, as insightface's
    float64 arithmetic gives them: pairs near each target FAR are re-scored from the float64
    templates of ``first`` (rows ``rows1``, the pairs' first column) and ``second`` (``rows2``)
    (:func:`~facecompat.eval.metrics.refine_tar_at_far`). Without float64 templates the float32
    ROC is read directly."""
    if first.exact is None or second.exact is None:
        return metrics.tar_at_far(fpr, tpr, fars), metrics.tar_at_far_strict(fpr, tpr, fars)
    f64, s64 = first.exact, second.exact

    def exact_scores(idx: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", f64[rows1[idx]], s64[rows2[idx]])

    return metrics.refine_tar_at_far(scores, meta.pair_labels, fpr, thresholds, exact_scores,
                                     _float32_score_error(first, second), fars)


def verify_1to1(meta: IJBMeta, query: Pooled, gallery: Pooled | None = None,
                fars: Sequence[float] = metrics.DEFAULT_FARS,
                return_curves: bool = False) -> dict | tuple[dict, dict]:
    """1:1 over the meta's pairs from pooled templates (DESIGN §5): each pair's first template
    (IJB-C's enrolled side, the G1 ∪ G2 gallery templates) from ``gallery``, its second template
    (the probe) from ``query``; ``gallery`` None or ``query`` itself = self test. See
    :func:`evaluate_1to1`."""
    gallery = query if gallery is None else gallery
    _check_pair(query, gallery)
    i1, i2 = meta.pair_rows(query.templates)
    probe_feats = gallery.feats if gallery is query else query.feats  # the same array: a self test
    scores = score_pairs(gallery.feats, probe_feats, i1, i2)
    fpr, tpr, thresholds = metrics.roc_curve(scores, meta.pair_labels)
    tar, strict = tar_from_scores(meta, gallery, query, scores, i1, i2, fpr, tpr, thresholds, fars)
    result = {"tar_at_far": tar, "tar_at_far_strict": strict,
              "auc": metrics.auc(fpr, tpr), "num_pairs": int(scores.size),
              "num_genuine": int(meta.pair_labels.sum())}
    if return_curves:
        return result, {"scores": scores, "labels": meta.pair_labels, "fpr": fpr, "tpr": tpr}
    return result


def evaluate_1to1(meta: IJBMeta, query_features: np.ndarray, gallery_features: np.ndarray | None = None,
                  fars: Sequence[float] = metrics.DEFAULT_FARS, score_weighting: bool = True,
                  return_curves: bool = False) -> dict | tuple[dict, dict]:
    """IJB 1:1 verification over the meta's template pairs.

    Args:
        meta: from :func:`load_ijb_meta`.
        query_features: [N, D] face features of the query model, which embeds each pair's second
            template (the probe side).
        gallery_features: [N, D] of the gallery model, which embeds each pair's first template
            (IJB-C's enrolled side); None = self test.
        fars: target FARs.
        score_weighting: weight faces by detector score before pooling (insightface default).
        return_curves: also return ``{"scores" [M] float32, "labels" [M] int8, "fpr", "tpr"}``.

    Returns:
        ``{"tar_at_far": {far_key: tar}, "tar_at_far_strict": {...}, "auc", "num_pairs",
        "num_genuine"}`` (and the curves dict with ``return_curves``).
    """
    query = pool(meta, query_features, score_weighting)
    gallery = None if gallery_features is None else pool(meta, gallery_features, score_weighting)
    return verify_1to1(meta, query, gallery, fars, return_curves)


def _similarity(probe_feats: np.ndarray, gallery_feats: np.ndarray, use_faiss: bool) -> np.ndarray:
    """[P, G] float32 inner products: faiss's all-pairs product (on a GPU when faiss has one) or numpy.

    1:N needs every probe x gallery score (ranks count all templates above the true one), so the
    tool is one matrix product, not a k-nearest search: a flat-index search with k = the whole
    gallery spends ~10x the product's time selecting and sorting k results that are then scattered
    back. With faiss and a GPU, faiss's ``pairwise_distance_gpu`` computes the matrix there; on the
    CPU the BLAS product is what faiss's own ``pairwise_distances`` runs for inner products (plus a
    copy), so numpy runs it directly and both settings agree bit for bit.
    """
    probe_feats = np.ascontiguousarray(probe_feats, np.float32)
    gallery_feats = np.ascontiguousarray(gallery_feats, np.float32)
    faiss = None
    if use_faiss:
        try:
            import faiss
        except ImportError:
            faiss = None
    if faiss is not None and hasattr(faiss, "pairwise_distance_gpu") and faiss.get_num_gpus() > 0:
        return faiss.pairwise_distance_gpu(faiss.StandardGpuResources(), probe_feats, gallery_feats,
                                           metric=faiss.METRIC_INNER_PRODUCT)
    return probe_feats @ gallery_feats.T


def identify_1toN(meta: IJBMeta, query: Pooled, gallery: Pooled | None = None,
                  ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                  fpirs: Sequence[float] = metrics.DEFAULT_FPIRS, use_faiss: bool = True) -> dict:
    """1:N from pooled templates: probes from ``query``, galleries from ``gallery`` (None = same).
    See :func:`evaluate_1toN`. Per gallery: one similarity matrix, then CMC and TPIR from one
    blocked pass over it (:func:`metrics.identification`)."""
    if not meta.has_1n:
        raise IJBMetaError(f"{meta.target}: no 1:N meta files (gallery and probe CSVs)")
    gallery = query if gallery is None else gallery
    _check_pair(query, gallery)
    probes = meta.probes
    probe_feats = query.feats[query.rows(probes.template_ids, "1:N probe CSV")]
    out = {}
    for name, subjects in meta.galleries.items():
        gallery_feats = gallery.feats[gallery.rows(subjects.template_ids, f"1:N gallery {name} CSV")]
        sim = _similarity(probe_feats, gallery_feats, use_faiss)
        mated = np.isin(probes.subject_ids, subjects.subject_ids)
        out[name] = {**metrics.identification(sim, probes.subject_ids, subjects.subject_ids, ranks, fpirs),
                     "num_probes": int(probes.template_ids.size), "num_mated": int(mated.sum()),
                     "num_gallery": int(subjects.template_ids.size)}
        del sim
    return out


def evaluate_1toN(meta: IJBMeta, query_features: np.ndarray, gallery_features: np.ndarray | None = None,
                  ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                  fpirs: Sequence[float] = metrics.DEFAULT_FPIRS, use_faiss: bool = True,
                  score_weighting: bool = True) -> dict:
    """IJB 1:N open-set identification per gallery (DESIGN §5).

    Probe templates are pooled from ``query_features``, gallery templates from
    ``gallery_features`` (None = the same model). Mated probes of a gallery are those whose subject
    has a template in it.

    Returns:
        ``{gallery: {"cmc": {"1": r1, ...}, "tpir_at_fpir": {"0.01": x, ...}, "num_probes",
        "num_mated", "num_gallery"}}``.
    """
    query = pool(meta, query_features, score_weighting)
    gallery = None if gallery_features is None else pool(meta, gallery_features, score_weighting)
    return identify_1toN(meta, query, gallery, ranks, fpirs, use_faiss)
