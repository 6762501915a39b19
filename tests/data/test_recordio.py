"""RecordIO against files written by mxnet 1.9.1, byte-exact writing, bad input and fuzzing."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facecompat.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    Record,
    RecordIOError,
    RecordReader,
    RecordWriter,
    build_index,
    encode_chunks,
    pack,
    read_index,
    scan_records,
    unpack,
)
from tests.helpers import SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "recordio"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _label_matches(rec: Record, expected) -> bool:
    if isinstance(expected, list):
        return rec.flag == len(expected) and np.allclose(rec.label, expected)
    return rec.flag == 0 and rec.label == expected


@pytest.mark.parametrize("name", ["train", "misc"])
def test_fixture_headers_and_labels(name):
    reader = RecordReader(FIXTURES / f"{name}.rec")
    entries = MANIFEST[name]["records"]
    assert reader.keys == [e["key"] for e in entries]
    for e in entries:
        rec = reader.read(e["key"])
        assert (rec.flag, rec.id, rec.id2) == (e["flag"], e["id"], e["id2"]), e["key"]
        assert _label_matches(rec, e["label"]), (e["key"], rec.label, e["label"])
        if "payload_hex" in e:
            assert rec.payload == bytes.fromhex(e["payload_hex"]), e["key"]
        if e.get("kind") in ("header", "identity"):
            assert rec.payload == b""


def test_fixture_jpeg_pixels():
    reader = RecordReader(FIXTURES / "train.rec")
    for e in MANIFEST["train"]["records"]:
        if e["kind"] != "image":
            continue
        img = cv2.imdecode(np.frombuffer(reader.read(e["key"]).payload, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == tuple(e["shape"])
        # measured away from the seam at column 56, as the manifest says
        left = img[:, 4:50].reshape(-1, 3).mean(0)
        right = img[:, 62:108].reshape(-1, 3).mean(0)
        assert np.abs(left - e["bgr_mean_left_half"]).max() <= 2, e["key"]
        assert np.abs(right - e["bgr_mean_right_half"]).max() <= 2, e["key"]


def test_fixture_png_pixels_exact():
    reader = RecordReader(FIXTURES / "misc.rec")
    entry = next(e for e in MANIFEST["misc"]["records"] if e.get("format") == "png")
    img = cv2.imdecode(np.frombuffer(reader.read(entry["key"]).payload, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(img, np.array(entry["bgr_pixels"], dtype=np.uint8))


def test_fixture_split_record_is_stored_in_parts():
    """Key 205's payload holds the magic at aligned offsets: on disk it must be several chunks."""
    reader = RecordReader(FIXTURES / "misc.rec")
    raw = (FIXTURES / "misc.rec").read_bytes()
    offset = reader.offset(205)
    flags = []
    pos = offset
    while True:
        magic, word = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flags.append(word >> 29)
        pos += 8 + (((word & ((1 << 29) - 1)) + 3) & ~3)
        if flags[-1] in (0, 3):
            break
    assert flags[0] == 1 and flags[-1] == 3 and set(flags[1:-1]) <= {2}
    assert len(flags) >= 3
    assert reader.read(205).payload.count(MAGIC_BYTES) == 4


def test_fixture_sequential_without_index():
    reader = RecordReader(FIXTURES / "sequential.rec")
    assert reader.idx_path is None
    expected = MANIFEST["sequential"]["records"]
    assert reader.keys == [e["position"] for e in expected]
    for e in expected:
        rec = reader.read(e["position"])
        assert (rec.label, rec.id, rec.payload) == (e["label"], e["id"], bytes.fromhex(e["payload_hex"]))


@pytest.mark.parametrize("name", ["train", "misc", "sequential"])
def test_writer_is_byte_identical(tmp_path, name):
    src = RecordReader(FIXTURES / f"{name}.rec")
    has_idx = (FIXTURES / f"{name}.idx").is_file()
    out_idx = tmp_path / f"{name}.idx" if has_idx else None
    with RecordWriter(tmp_path / f"{name}.rec", out_idx) as w:
        for key in src.keys:
            w.write(key, src.read(key))
    assert (tmp_path / f"{name}.rec").read_bytes() == (FIXTURES / f"{name}.rec").read_bytes()
    if has_idx:
        assert out_idx.read_text() == (FIXTURES / f"{name}.idx").read_text()


def test_rebuild_index_matches_mxnet(tmp_path):
    n = build_index(FIXTURES / "train.rec", tmp_path / "train.idx")
    assert n == 13
    assert (tmp_path / "train.idx").read_text() == (FIXTURES / "train.idx").read_text()
    build_index(FIXTURES / "misc.rec", tmp_path / "misc.idx", key="id")
    ids = [int(line.split("\t")[0]) for line in (tmp_path / "misc.idx").read_text().splitlines()]
    assert ids == [11, 1000, 1001, 1002, 1003, 1004, 2000]


def test_pack_unpack_roundtrip_and_label_array():
    raw = pack([1.5, -2.0], b"xyz", id=7, id2=9)
    rec = unpack(raw)
    assert rec.flag == 2 and rec.id == 7 and rec.id2 == 9 and rec.payload == b"xyz"
    np.testing.assert_array_equal(rec.label, np.float32([1.5, -2.0]))
    assert unpack(pack(3.0, b"")).label == 3.0


@given(st.binary(max_size=64), st.integers(0, 3))
@settings(max_examples=200, deadline=None)
def test_chunking_roundtrip_with_magic_everywhere(body, magics):
    """Payloads full of magics at every alignment survive write → read unchanged."""
    payload = bytes(body) + MAGIC_BYTES * magics + bytes(body[:3]) + MAGIC_BYTES
    record = pack(0.0, payload)
    encoded = encode_chunks(record)
    assert len(encoded) % 4 == 0
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fc_chunk_{os.getpid()}.rec"
    path.write_bytes(encoded)
    try:
        assert [raw for _, raw in scan_records(path)] == [record]
    finally:
        path.unlink()


def test_reader_opens_lazily_and_reopens_after_fork(tmp_path):
    import multiprocessing as mp
    reader = RecordReader(FIXTURES / "train.rec")
    assert reader._fd is None  # nothing opened until the first read
    reader.read(1)
    parent_fd = reader._fd
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(reader, q))
    p.start()
    p.join(30)
    pid, payload_len, child_fd_reused = q.get(timeout=5)
    assert pid != os.getpid() and payload_len == len(reader.read(5).payload) and not child_fd_reused
    assert reader._fd == parent_fd


def _child_read(reader, q):
    before = reader._fd
    rec = reader.read(5)
    q.put((os.getpid(), len(rec.payload), reader._fd == before and reader._pid != os.getpid()))


# -- bad input: one error type naming file, key and offset ----------------------------------

def _copy(tmp_path, name="train"):
    for ext in (".rec", ".idx"):
        (tmp_path / f"{name}{ext}").write_bytes((FIXTURES / f"{name}{ext}").read_bytes())
    return tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"


def test_bad_magic_names_file_key_offset(tmp_path):
    rec, idx = _copy(tmp_path)
    data = bytearray(rec.read_bytes())
    off = RecordReader(rec).offset(3)
    data[off] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError) as err:
        RecordReader(rec).read(3)
    msg = str(err.value)
    assert str(rec) in msg and "key 3" in msg and f"offset {off}" in msg and "magic" in msg


def test_truncated_file(tmp_path):
    rec, idx = _copy(tmp_path)
    reader = RecordReader(rec)
    off = reader.offset(9)
    rec.write_bytes(rec.read_bytes()[: off + 100])
    with pytest.raises(RecordIOError, match=r"key 9, offset \d+: truncated"):
        RecordReader(rec, idx).read(9)
    with pytest.raises(RecordIOError, match="truncated"):
        list(scan_records(rec))


def test_index_offset_not_at_record(tmp_path):
    rec, idx = _copy(tmp_path)
    idx.write_text(idx.read_text().replace("2\t928", "2\t932"))
    with pytest.raises(RecordIOError, match=r"key 2, offset 932: bad magic"):
        RecordReader(rec, idx).read(2)
    idx.write_text(idx.read_text().replace("2\t932", "2\t99999"))
    with pytest.raises(RecordIOError, match=r"key 2, offset 99999: end of file"):
        RecordReader(rec, idx).read(2)


def test_index_offset_inside_split_record(tmp_path):
    rec, idx = _copy(tmp_path, "misc")
    reader = RecordReader(rec, idx)
    raw = rec.read_bytes()
    start = reader.offset(205)
    length = struct.unpack_from("<I", raw, start + 4)[0] & ((1 << 29) - 1)
    second = start + 8 + ((length + 3) & ~3)
    idx.write_text(idx.read_text().replace(f"205\t{start}", f"205\t{second}"))
    with pytest.raises(RecordIOError, match="inside a split record"):
        RecordReader(rec, idx).read(205)


def test_missing_key_and_bad_index_lines(tmp_path):
    rec, idx = _copy(tmp_path)
    with pytest.raises(RecordIOError, match=r"key 77: key not in the index"):
        RecordReader(rec, idx).read(77)
    idx.write_text("0\t0\nnot-a-line\n")
    with pytest.raises(RecordIOError, match=r"train.idx: line 2"):
        RecordReader(rec, idx)
    idx.write_text("0\t0\n0\t40\n")
    with pytest.raises(RecordIOError, match="duplicate key"):
        RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match="no such file"):
        RecordReader(tmp_path / "absent.rec")


def test_flag_label_inconsistency(tmp_path):
    path = tmp_path / "bad.rec"
    # flag 5 announces five float labels, the record holds two
    bad_count = struct.pack("<IfQQ", 5, 0.0, 1, 0) + np.float32([1, 2]).tobytes()
    # flag 2 with a non-zero scalar label: mxnet's pack never writes this
    bad_scalar = struct.pack("<IfQQ", 2, 3.0, 2, 0) + np.float32([1, 2]).tobytes()
    with RecordWriter(path, tmp_path / "bad.idx") as w:
        w.write(0, bad_count)
        w.write(1, bad_scalar)
        w.write(2, b"short")
    reader = RecordReader(path)
    with pytest.raises(RecordIOError, match=r"key 0, offset 0: flag 5 announces"):
        reader.read(0)
    with pytest.raises(RecordIOError, match=r"key 1, offset \d+: flag 2 .* non-zero scalar label"):
        reader.read(1)
    with pytest.raises(RecordIOError, match=r"key 2.*shorter than the 24-byte header"):
        reader.read(2)
    with pytest.raises(ValueError, match="flag 3 but 2 labels"):
        RecordWriter(tmp_path / "x.rec").write(0, Record(3, np.float32([1, 2]), 0, 0, b""))


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, pack(1.0, b"abc"))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# -- fuzzing: any bytes give records or RecordIOError, never a hang or another exception ----

@given(st.binary(max_size=512))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.rec"
    path.write_bytes(data)
    try:
        for offset, raw in scan_records(path):
            unpack(raw, path, None, offset)
    except RecordIOError:
        pass


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_mutated_fixture(tmp_path, data):
    """Flip, cut and overwrite bytes of a real file; read it sequentially and by index."""
    raw = bytearray((FIXTURES / "misc.rec").read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "misc.rec"
    path.write_bytes(bytes(raw))
    (tmp_path / "misc.idx").write_bytes((FIXTURES / "misc.idx").read_bytes())
    try:
        for offset, rec in scan_records(path):
            unpack(rec, path, None, offset)
    except RecordIOError:
        pass
    reader = RecordReader(path)
    for key in reader.keys:
        try:
            reader.read(key)
        except RecordIOError as e:
            assert e.key == key and str(path) in str(e)


def test_index_parsing_fast_and_slow_paths_agree(tmp_path):
    idx = tmp_path / "a.idx"
    idx.write_text("".join(f"{k}\t{k * 40}\n" for k in [5, 3, 9]))
    keys, offsets = read_index(idx)
    assert keys.tolist() == [5, 3, 9] and offsets.tolist() == [200, 120, 360]
    idx.write_text("1\t2\t3\n4\n")  # right token count, wrong shape: must not parse as (1,2),(3,4)
    with pytest.raises(RecordIOError, match="line 1"):
        read_index(idx)
    idx.write_text("0\t-8\n")
    with pytest.raises(RecordIOError, match="negative offset"):
        read_index(idx)


def test_non_contiguous_keys_and_membership():
    reader = RecordReader(FIXTURES / "misc.rec")
    assert 205 in reader and 206 not in reader and 99 not in reader
    assert reader.offset(203) == 328 and reader.read(204).payload == bytes.fromhex("ced7230a") * 4
    with pytest.raises(RecordIOError, match="key 206: key not in the index"):
        reader.read(206)


def test_read_raw_many_equals_single_reads(tmp_path):
    for name, keys in (("misc", [205, 100, 203, 205]), ("train", [12, 1, 0, 5])):
        reader = RecordReader(FIXTURES / f"{name}.rec")
        assert reader.read_raw_many(keys) == [reader.read_raw(k) for k in keys]
        with pytest.raises(RecordIOError, match="key 7777: key not in the index"):
            reader.read_raw_many([keys[0], 7777])
    assert RecordReader(FIXTURES / "train.rec").read_raw_many([]) == []
