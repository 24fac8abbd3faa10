"""Reading text (strict UTF-8, CRLF, NFC), the train/validation split and the truncated-BPTT batches."""

import numpy as np
import pytest

from lstmkit.data import BatchStream, DataError, read_text, stream_chunks, split_train_val


def write(tmp_path, data: bytes, name="t.txt"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_crlf_and_nfc(tmp_path):
    decomposed = "\u1100\u1161"                         # conjoining jamo of 가
    p = write(tmp_path, f"a\r\nb\rc{decomposed}\n".encode())
    assert read_text(p) == "a\nb\nc가\n"


def test_undecodable_byte_names_its_offset(tmp_path):
    p = write(tmp_path, "가나".encode() + b"\xff" + b"abc")
    with pytest.raises(DataError, match=r"byte 0xff at offset 6"):
        read_text(p)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is empty"):
        read_text(write(tmp_path, b""))
    with pytest.raises(DataError, match="directory"):
        read_text(str(tmp_path))


def test_builtin_corpora():
    mujeong = read_text("mujeong")
    assert mujeong.startswith("무정(無情)") and "\r" not in mujeong and 300_000 < len(mujeong) < 340_000
    assert 1600 < len(set(mujeong)) < 1700
    assert read_text("shakespeare").startswith("First Citizen:")


def test_split_holds_out_the_tail():
    ids = np.arange(100)
    tr, va = split_train_val(ids, 0.05)
    assert list(va) == [95, 96, 97, 98, 99] and len(tr) == 95
    tr, va = split_train_val(ids, 0.0)
    assert len(tr) == 100 and len(va) == 0


def test_batches_are_contiguous_streams_carried_across_chunks():
    ids = np.arange(1000)
    s = BatchStream(ids, batch_size=4, seq_len=10)
    x1, y1, start1 = s.next()
    x2, y2, start2 = s.next()
    assert x1.shape == (10, 4) and start1 and not start2
    np.testing.assert_array_equal(y1, x1 + 1)                   # targets one step ahead
    np.testing.assert_array_equal(x2[0], x1[-1] + 1)            # chunk 2 continues chunk 1, per stream
    np.testing.assert_array_equal(x1[0], [0, 250, 500, 750])    # stream b starts at b * S
    assert s.chunks_per_epoch == (250 - 1) // 10
    for _ in range(s.chunks_per_epoch - 2):
        s.next()
    x, _, start = s.next()
    assert start and s.epoch == 1 and np.array_equal(x, x1)      # a new epoch starts over


def test_position_state_round_trip():
    ids = np.arange(500)
    a = BatchStream(ids, 2, 5)
    for _ in range(7):
        a.next()
    b = BatchStream(ids, 2, 5)
    b.load_state(a.state())
    np.testing.assert_array_equal(a.next()[0], b.next()[0])


def test_text_shorter_than_one_batch():
    with pytest.raises(DataError, match=r"fewer than one batch.*--batch-size 4 x \(--seq-len 10 \+ 1\) = 44"):
        BatchStream(np.arange(43), batch_size=4, seq_len=10)
    BatchStream(np.arange(44), batch_size=4, seq_len=10)


def test_stream_chunks_predict_every_id_but_the_first_once_in_order():
    ids = np.arange(103)
    chunks = list(stream_chunks(ids, 7))
    assert all(x.shape == y.shape and x.shape[1] == 1 and x.shape[0] <= 7 for x, y in chunks)
    np.testing.assert_array_equal(np.concatenate([y[:, 0] for _, y in chunks]), ids[1:])
    np.testing.assert_array_equal(np.concatenate([x[:, 0] for x, _ in chunks]), ids[:-1])


def test_devices_and_fifos_are_refused_before_they_are_read(tmp_path):
    import os
    with pytest.raises(DataError, match="not a regular file"):
        read_text("/dev/zero")                    # reading it would never end
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        read_text(str(fifo))                      # opening it would wait for a writer
    from lstmkit.labelled import read_labelled
    with pytest.raises(DataError, match="not a regular file"):
        read_labelled(str(fifo))
