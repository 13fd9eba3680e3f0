"""What a model on disk is (commands/fingerprint.py): cheap on big files, yet two checkpoints of one
architecture (same sizes, same safetensors header) are told apart, and a copy is not."""
import json
import os
import shutil
import struct

import pytest

from wanda_pl.assets import fingerprint
from wanda_pl.assets.fingerprint import changed_files, file_record, model_files


def fake_safetensors(path, fill: bytes, size: int):
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write((fill * (size // len(fill) + 1))[:size])


def test_big_files_are_sampled_and_told_apart(tmp_path, monkeypatch):
    size = 40 << 20  # above WHOLE: header and sampled ranges only
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    a.parent.mkdir(), b.parent.mkdir()
    fake_safetensors(a, b"\x01\x02\x03\x04", size)
    fake_safetensors(b, b"\x01\x02\x03\x05", size)
    assert a.stat().st_size == b.stat().st_size
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(fingerprint, "open", lambda p, mode: Counting(real_open(p, mode)), raising=False)
    ra, rb = file_record(a), file_record(b)
    assert ra["size"] == rb["size"] and ra["digest"] != rb["digest"]
    assert sum(read) / 2 < fingerprint.SAMPLES * fingerprint.SAMPLE_BYTES + 4096  # about 1 MB of 40 MB a file
    assert changed_files({"model.safetensors": ra}, {"model.safetensors": rb}) == [
        "'model.safetensors' (its content differs)"]


def test_a_change_in_a_small_file_anywhere_is_seen(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "tokenizer.json").write_text("x" * 100_000)
    before = model_files(str(folder))
    assert set(before) == {"config.json", "tokenizer.json"}
    (folder / "tokenizer.json").write_text("x" * 50_000 + "y" + "x" * 49_999)  # same size, one byte
    assert changed_files(before, model_files(str(folder))) == ["'tokenizer.json' (its content differs)"]


def test_copies_agree_and_rewrites_new_and_gone_files_are_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(os.urandom(1000))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("not the model")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # copy2 keeps modification times
    assert model_files(str(folder)) == model_files(str(copy))
    before = model_files(str(folder))
    data = (folder / "weights.bin").read_bytes()
    st = (folder / "weights.bin").stat()
    (folder / "weights.bin").write_bytes(data)
    os.utime(folder / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (folder / "config.json").unlink()
    (folder / "extra.json").write_text("{}")
    assert changed_files(before, model_files(str(folder))) == [
        "'config.json' (gone since)", "'extra.json' (new since)",
        "'weights.bin' (modified since: same size and sampled bytes, but rewritten)"]


@pytest.mark.parametrize("path", [None, "", "/no/such/folder"])
def test_no_files_no_records(path):
    assert model_files(path) == {}


def test_a_single_checkpoint_file(tmp_path):
    f = tmp_path / "model.pth"
    f.write_bytes(b"abc")
    assert list(model_files(str(f))) == ["model.pth"]
