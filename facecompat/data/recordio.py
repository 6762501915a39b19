"""MXNet RecordIO, read and written bit-compatibly without mxnet.

On disk a ``.rec`` is a stream of 4-byte-aligned chunks::

    uint32 LE magic 0xCED7230A | uint32 LE (length | cflag << 29) | payload | zero pad to 4

cflag 0 is a whole record. The writer splits a record wherever the magic appears at a
4-aligned offset of its payload: parts carry cflag 1 (first), 2 (middle), 3 (last), the
magic itself is dropped and the reader puts it back between the parts.

A record's payload starts with the image-record header ``<IfQQ`` (flag, label, id, id2).
When ``flag > 0``, ``flag`` float32 labels follow and the scalar label is 0. The rest is
the encoded image (or any bytes).

The ``.idx`` is text, one ``key\\toffset\\n`` per record, in the order written.

Every malformed input raises :class:`RecordIOError`, which names the file, the key (when
known) and the byte offset.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecompat.errors import UserError
from facecompat.fileio import atomic_write

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER = struct.Struct("<IfQQ")
_CHUNK = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1
_ONE_READ_MAX = 1 << 20  # records up to 1 MiB are read with a single pread
MAX_RECORD_BYTES = 1 << 29  # dmlc's limit: the length field has 29 bits


class RecordIOError(UserError, ValueError):
    """A .rec/.idx that does not hold what it should. Message: ``file: key K, offset O: why``."""

    def __init__(self, path: str | os.PathLike, reason: str, key: int | None = None,
                 offset: int | None = None):
        self.path, self.reason, self.key, self.offset = str(path), reason, key, offset
        where = [f"key {key}"] if key is not None else []
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{path}: {', '.join(where) + ': ' if where else ''}{reason}")


@dataclass(frozen=True)
class Record:
    """One unpacked record: the ``<IfQQ`` header fields and what follows header and labels.

    ``label`` is a float when ``flag == 0`` and a float32 array of length ``flag`` otherwise.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int
    payload: bytes

    @property
    def labels(self) -> np.ndarray:
        """The label(s) as a float32 array (length 1 for a scalar label)."""
        if self.flag == 0:
            return np.array([self.label], dtype=np.float32)
        return np.asarray(self.label, dtype=np.float32)


def pack(label: float | np.ndarray | list | tuple, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Pack a record as ``mx.recordio.pack`` does: a scalar label gives flag 0, an array
    gives flag = its length, scalar 0 and the float32 labels in front of the payload."""
    if np.ndim(label) == 0:
        return HEADER.pack(0, float(label), id, id2) + bytes(payload)
    labels = np.asarray(label, dtype="<f4").ravel()
    return HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(payload)


def unpack(buf: bytes, path: str | os.PathLike = "<bytes>", key: int | None = None,
           offset: int | None = None) -> Record:
    """Split a record's bytes into header fields, labels and payload."""
    if len(buf) < HEADER.size:
        raise RecordIOError(path, f"record of {len(buf)} bytes is shorter than the "
                            f"{HEADER.size}-byte header", key, offset)
    flag, label, rid, rid2 = HEADER.unpack_from(buf)
    if flag == 0:
        return Record(0, float(label), rid, rid2, bytes(buf[HEADER.size:]))
    end = HEADER.size + 4 * flag
    if end > len(buf):
        raise RecordIOError(path, f"flag {flag} announces {flag} float32 labels but the record "
                            f"holds only {len(buf) - HEADER.size} bytes after the header", key, offset)
    if label != 0.0:
        raise RecordIOError(path, f"flag {flag} (label array) with non-zero scalar label {label}",
                            key, offset)
    labels = np.frombuffer(buf, dtype="<f4", count=flag, offset=HEADER.size).astype(np.float32)
    return Record(flag, labels, rid, rid2, bytes(buf[end:]))


def encode_chunks(record: bytes) -> bytes:
    """The on-disk bytes of one record, split at aligned magics exactly as dmlc-core does."""
    n = len(record)
    if n >= MAX_RECORD_BYTES:
        raise ValueError(f"record of {n} bytes exceeds RecordIO's 2^29-byte limit")
    out = bytearray()
    view = memoryview(record)
    start = 0
    # Only 4-aligned positions of whole words count, as in dmlc-core's writer.
    pos = record.find(MAGIC_BYTES)
    while 0 <= pos <= n - 4:
        if pos % 4 == 0:
            out += _CHUNK.pack(MAGIC, (pos - start) | ((1 if start == 0 else 2) << 29))
            out += view[start:pos]
            start = pos + 4
        pos = record.find(MAGIC_BYTES, pos + 1)
    out += _CHUNK.pack(MAGIC, (n - start) | ((3 if out else 0) << 29))
    out += view[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    buf = os.pread(fd, size, offset)
    while len(buf) < size:  # pread may return short on some file systems
        more = os.pread(fd, size - len(buf), offset + len(buf))
        if not more:
            break
        buf += more
    return buf


def read_record_at(fd: int, offset: int, path: str | os.PathLike, key: int | None = None,
                   file_size: int | None = None) -> tuple[bytes, int]:
    """Read the record starting at ``offset``; returns (record bytes, offset after it)."""
    if file_size is None:
        file_size = os.fstat(fd).st_size
    parts: list[bytes] = []
    pos, first = offset, True
    while True:
        head = _read_exact(fd, 8, pos)
        if len(head) < 8:
            what = "end of file" if not head else f"truncated chunk header ({len(head)} of 8 bytes)"
            raise RecordIOError(path, f"{what} where a record{' part' if not first else ''} was "
                                f"expected (file size {file_size})", key, pos)
        magic, word = _CHUNK.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(path, f"bad magic 0x{magic:08X} (expected 0x{MAGIC:08X}); "
                                "the offset does not point at a record", key, pos)
        cflag, length = word >> 29, word & _LEN_MASK
        if first and cflag not in (0, 1):
            raise RecordIOError(path, f"chunk has continuation flag {cflag}: the offset points "
                                "inside a split record, not at its start", key, pos)
        if not first and cflag not in (2, 3):
            raise RecordIOError(path, f"split record continues with flag {cflag} (expected 2 or 3)",
                                key, pos)
        if cflag > 3:
            raise RecordIOError(path, f"invalid continuation flag {cflag}", key, pos)
        padded = (length + 3) & ~3
        if pos + 8 + padded > file_size:
            raise RecordIOError(path, f"truncated: chunk of {length} bytes at {pos} runs past the "
                                f"end of the file (size {file_size})", key, pos)
        parts.append(_read_exact(fd, length, pos + 8))
        pos += 8 + padded
        if cflag in (0, 3):
            break
        first = False
    return MAGIC_BYTES.join(parts), pos


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` (``key\toffset`` per line) into (keys, offsets), int64, in file order."""
    try:
        data = Path(idx_path).read_bytes()
    except OSError as e:
        raise RecordIOError(idx_path, f"cannot read index: {e.strerror}") from None
    # Fast path: 5M lines of MS1Mv3 parse in well under a second; any irregularity (or a
    # parse that does not give exactly two numbers per line) takes the line-by-line path,
    # which names the offending line.
    lines = data.count(b"\n") + (not data.endswith(b"\n") and len(data) > 0)
    values = None
    if data.isascii() and b"." not in data and b"-" not in data:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (not raises) on text it cannot parse
            try:
                values = np.fromstring(data, dtype=np.int64, sep=" ")  # any whitespace separates
            except (ValueError, DeprecationWarning):
                values = None
    raw = np.frombuffer(data, dtype=np.uint8)
    separators = raw[(raw == 9) | (raw == 10)]  # must alternate: tab, newline, tab, newline, ...
    one_tab_per_line = (b" " not in data and separators.size in (2 * lines, 2 * lines - 1)
                        and (separators[0::2] == 9).all() and (separators[1::2] == 10).all())
    if values is not None and one_tab_per_line and values.size == 2 * lines or not data.strip():
        pairs = values.reshape(-1, 2) if values is not None else np.zeros((0, 2), np.int64)
        keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
        if (offsets >= 0).all() and _no_duplicates(keys):
            return keys, offsets
    return _read_index_slow(idx_path, data)


def _no_duplicates(keys: np.ndarray) -> bool:
    if keys.size < 2 or (keys[1:] > keys[:-1]).all():  # the usual case: ascending keys
        return True
    ordered = np.sort(keys)
    return bool((ordered[1:] != ordered[:-1]).all())


def _read_index_slow(idx_path: str | os.PathLike, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise RecordIOError(idx_path, f"not a text index ({e.reason} at byte {e.start})") from None
    index: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(idx_path, f"line {lineno}: expected 'key<TAB>offset', got {line!r}") from None
        if offset < 0:
            raise RecordIOError(idx_path, f"line {lineno}: negative offset", key, offset)
        if key in index:
            raise RecordIOError(idx_path, f"line {lineno}: duplicate key", key, offset)
        index[key] = offset
    return np.fromiter(index.keys(), np.int64, len(index)), np.fromiter(index.values(), np.int64, len(index))


class RecordReader:
    """Random access to a ``.rec`` by key (through its ``.idx``), or sequential scanning.

    The file is opened lazily and re-opened after a fork, so one reader can be handed to
    DataLoader workers: each process gets its own descriptor and reads with ``pread``.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its index; default ``<rec without .rec>.idx`` when that exists. Without an
            index, ``keys`` come from a sequential scan (key = position in the file).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.path = Path(rec_path)
        if not self.path.is_file():
            raise RecordIOError(self.path, "no such file")
        if idx_path is None:
            guess = self.path.with_suffix(".idx")
            idx_path = guess if guess.is_file() else None
        self.idx_path = Path(idx_path) if idx_path is not None else None
        if self.idx_path is not None:
            keys, offsets = read_index(self.idx_path)
        else:
            offsets = np.fromiter((off for off, _ in self._scan()), np.int64)
            keys = np.arange(offsets.size, dtype=np.int64)
        # The index lives in numpy arrays, not a dict: ~16 bytes a record instead of ~100,
        # and DataLoader workers share its pages after fork (no per-object refcounts).
        self._keys, self._offsets = keys, offsets
        contiguous = keys.size > 0 and keys[-1] - keys[0] == keys.size - 1 and (np.diff(keys) == 1).all()
        self._base = int(keys[0]) if contiguous else None  # keys k0..k0+n-1 in order: direct lookup
        if not contiguous:
            self._sorted = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorted]
        self._ends: np.ndarray | None = None  # where each record's bytes end (next offset)
        self._fd: int | None = None
        self._pid: int | None = None
        self._size: int | None = None

    @functools.cached_property
    def keys(self) -> list[int]:
        """Keys in index order (built on first use: insightface readers never need it)."""
        return self._keys.tolist()

    def _position(self, key: int) -> int:
        if self._base is not None:
            pos = key - self._base
            if 0 <= pos < self._keys.size:
                return pos
        elif self._keys.size:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < self._sorted_keys.size and self._sorted_keys[i] == key:
                return int(self._sorted[i])
        raise RecordIOError(self.idx_path or self.path, "key not in the index", key)

    # -- file handle, per process ------------------------------------------------------
    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)  # a forked child must not share offsets/fd state
            self._pid = os.getpid()
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._keys.size)

    def __contains__(self, key: int) -> bool:
        try:
            self._position(int(key))
        except RecordIOError:
            return False
        return True

    # -- reading -----------------------------------------------------------------------
    def offset(self, key: int) -> int:
        return int(self._offsets[self._position(key)])

    def _end(self, pos: int) -> int:
        """Offset of the next record in the file after record ``pos`` (or the file size)."""
        if self._ends is None:
            order = np.argsort(self._offsets, kind="stable")
            sorted_offsets = self._offsets[order]
            # the next *different* offset, so that duplicate offsets do not give empty reads
            nxt = np.append(sorted_offsets, np.int64(self._size))
            uniq_next = np.searchsorted(sorted_offsets, sorted_offsets, side="right")
            ends = np.empty_like(self._offsets)
            ends[order] = nxt[uniq_next]
            self._ends = ends
        return int(self._ends[pos])

    def read_raw(self, key: int) -> bytes:
        """The record's bytes (header + labels + payload), parts rejoined."""
        pos = self._position(key)
        offset = int(self._offsets[pos])
        fd = self._handle()
        return self._read_span(fd, key, offset, self._end(pos))

    def _read_span(self, fd: int, key: int, offset: int, end: int) -> bytes:
        # One pread of everything up to the next record; a whole (unsplit) record that fits
        # is returned from it directly, anything else takes the general, checking path.
        if 8 <= end - offset <= _ONE_READ_MAX:
            buf = os.pread(fd, end - offset, offset)
            if len(buf) >= 8:
                magic, word = _CHUNK.unpack_from(buf)
                length = word & _LEN_MASK
                if magic == MAGIC and word >> 29 == 0 and 8 + length <= len(buf):
                    return buf[8:8 + length]
        return read_record_at(fd, offset, self.path, key, self._size)[0]

    def read_raw_many(self, keys: np.ndarray | list[int]) -> list[bytes]:
        """Record bytes of many keys (as :meth:`read_raw` each, with the index look-ups done
        once for all): the loaders' per-batch read."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._base is not None and keys.size and keys.min() >= self._base \
                and keys.max() - self._base < self._keys.size:
            positions = keys - self._base
        else:
            positions = np.fromiter((self._position(int(k)) for k in keys), np.int64, keys.size)
        if not keys.size:
            return []
        fd = self._handle()
        self._end(0)  # builds the table of record ends on first use
        return [self._read_span(fd, key, offset, end) for key, offset, end in
                zip(keys.tolist(), self._offsets[positions].tolist(), self._ends[positions].tolist())]

    def read(self, key: int) -> Record:
        """The unpacked record stored under ``key``."""
        return unpack(self.read_raw(key), self.path, key, self.offset(key))

    def read_header(self, key: int) -> Record:
        """Header and labels only (payload left empty): one small read, no image bytes."""
        offset = self.offset(key)
        fd = self._handle()
        if offset + 8 > self._size:
            return self.read(key)  # raises with the reason
        head = _read_exact(fd, 8 + HEADER.size, offset)
        if len(head) == 8 + HEADER.size:
            magic, word = _CHUNK.unpack_from(head)
            length = word & _LEN_MASK
            flag = HEADER.unpack_from(head, 8)[0]
            if magic == MAGIC and word >> 29 == 0 and length >= HEADER.size + 4 * flag <= 4096:
                body = _read_exact(fd, HEADER.size + 4 * flag, offset + 8)
                rec = unpack(body, self.path, key, offset)
                return Record(rec.flag, rec.label, rec.id, rec.id2, b"")
        rec = self.read(key)  # split record or unusual sizes: the general path checks everything
        return Record(rec.flag, rec.label, rec.id, rec.id2, b"")

    def _scan(self) -> Iterator[tuple[int, bytes]]:
        yield from scan_records(self.path)

    def __iter__(self) -> Iterator[tuple[int, Record]]:
        """(key, record) in index order."""
        for key in self.keys:
            yield key, self.read(key)

    def validate(self) -> None:
        """Read every indexed record once; raises RecordIOError at the first bad one."""
        for key in self.keys:
            self.read(key)


def scan_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Sequentially yield (offset, record bytes) of a ``.rec`` with no index needed."""
    path = Path(rec_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            raw, nxt = read_record_at(fd, pos, path, None, size)
            yield pos, raw
            pos = nxt
    finally:
        os.close(fd)


def build_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike, key: str = "position") -> int:
    """Rebuild a ``.idx`` by scanning the ``.rec``; key = record position (insightface and
    im2rec files number records 0, 1, 2, ... in file order) or the header ``id`` field.
    Written atomically. Returns the number of records."""
    if key not in ("position", "id"):
        raise ValueError(f"key must be 'position' or 'id', got {key!r}")
    lines, seen = [], set()
    for i, (offset, raw) in enumerate(scan_records(rec_path)):
        k = i if key == "position" else unpack(raw, rec_path, None, offset).id
        if k in seen:
            raise RecordIOError(rec_path, "duplicate header id; rebuild with key='position'", k, offset)
        seen.add(k)
        lines.append(f"{k}\t{offset}\n")
    with atomic_write(idx_path, "w") as f:
        f.writelines(lines)
    return len(lines)


class RecordWriter:
    """Write a ``.rec`` (and optionally its ``.idx``) byte-identical to mxnet's
    ``MXIndexedRecordIO``/``MXRecordIO``. Files appear under their names only on a clean
    ``close()`` (temp file + rename); an exception inside ``with`` leaves nothing behind.

    ``write(key, record)`` takes a :class:`Record` or already packed bytes.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec_cm = atomic_write(self.path, "wb")
        self._rec = self._rec_cm.__enter__()
        self._idx_lines: list[str] = []
        self._keys: set[int] = set()
        self._closed = False

    def tell(self) -> int:
        return self._rec.tell()

    def write(self, key: int, record: Record | bytes) -> int:
        """Append one record; returns its offset."""
        if isinstance(record, Record):
            label = record.label if record.flag == 0 else np.asarray(record.label, dtype=np.float32)
            if record.flag and np.size(label) != record.flag:
                raise ValueError(f"key {key}: flag {record.flag} but {np.size(label)} labels")
            record = pack(label, record.payload, record.id, record.id2)
        if key in self._keys:
            raise ValueError(f"{self.path}: key {key} written twice")
        self._keys.add(key)
        offset = self._rec.tell()
        self._rec.write(encode_chunks(record))
        self._idx_lines.append(f"{key}\t{offset}\n")
        return offset

    def overwrite(self, offset: int, record: bytes) -> None:
        """Rewrite the record written at ``offset`` with one of the same encoded size (a
        header whose values are known only at the end)."""
        data = encode_chunks(record)
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(end)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rec_cm.__exit__(None, None, None)
        if self.idx_path is not None:
            with atomic_write(self.idx_path, "w") as f:
                f.writelines(self._idx_lines)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._rec_cm.__exit__(RuntimeError, None, None)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def dump_records(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> Iterator[dict]:
    """One dict per record in index order: key, flag, label (float, or list when flag > 0),
    id, id2, payload_len, payload_sha1 (payload = what follows header and labels)."""
    reader = RecordReader(rec_path, idx_path)
    for key, rec in reader:
        label = float(rec.label) if rec.flag == 0 else [float(v) for v in rec.label]
        yield {"key": key, "flag": rec.flag, "label": label, "id": rec.id, "id2": rec.id2,
               "payload_len": len(rec.payload), "payload_sha1": hashlib.sha1(rec.payload).hexdigest()}
