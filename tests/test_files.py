"""qwendoctor.files: atomic writes leave the old file or the new one, and nothing else."""

import os

import pytest

from qwendoctor import files


def test_atomic_write_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as handle:
            handle.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    files.write_text_atomic(path, "new", durable=True)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_binary_writes_create_the_directory(tmp_path):
    path = tmp_path / "cache" / "reference.npz"
    with files.atomic_write(path, "wb") as handle:
        handle.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_the_cache_directory_follows_the_override_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "env"))
    assert files.cache_dir(str(tmp_path / "given")) == str(tmp_path / "given")
    assert files.cache_dir() == str(tmp_path / "env")
    monkeypatch.delenv(files.CACHE_ENV)
    assert files.cache_dir().endswith(os.path.join(".cache", "qwendoctor"))


def test_an_output_directory_is_checked_without_being_created(tmp_path):
    from qwendoctor.errors import UsageError

    files.writable_directory(str(tmp_path / "new" / "out"), "--out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="--out .*afile: is a file, not a directory"):
        files.writable_directory(str(tmp_path / "afile"), "--out")
    with pytest.raises(UsageError, match="afile is a file, not a directory"):
        files.writable_directory(str(tmp_path / "afile" / "out"), "--out")
