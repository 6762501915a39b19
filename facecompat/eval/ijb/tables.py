"""The IJB meta file formats: named tables (``name v1 v2 ..``), integer tables and the 1:N CSVs.

Each reader takes the fast path (:mod:`.scan`, :func:`_split_names`, :func:`_subject_csv_fast`)
when the file has the common shape, else a general one (``np.fromstring``, the csv module), and a
bad line goes to a line-by-line pass whose :class:`IJBMetaError` names file and line.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np

from facecompat.eval.ijb.records import IJBMetaError, Subjects
from facecompat.eval.ijb.scan import _lines_ok, _parse_decimal_fast, _parse_uint_fast

_FIRST_FIELD = re.compile(r"^[ \t]*(\S+)", re.MULTILINE)


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
