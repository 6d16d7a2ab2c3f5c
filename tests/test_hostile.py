"""The guards of issue 31 one by one, in-process and in milliseconds: what may be replaced, what may be read, the
one table of ranges, who counts as a rank. tests/test_faults.py drives the same guards through the CLI."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from probes import limits
from qwendoctor import files, parallel
from qwendoctor.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


# ---- writes replace only regular files ---------------------------------------------------------------------------

def test_an_atomic_write_refuses_a_fifo_and_a_symlink_and_leaves_both_as_they_were(tmp_path):
    fifo, target, link = tmp_path / "fifo", tmp_path / "target.lock", tmp_path / "link.lock"
    os.mkfifo(fifo)
    target.write_text("old")
    link.symlink_to(target)
    for path, kind in ((fifo, "a FIFO"), (link, "a symbolic link")):
        with pytest.raises(UsageError, match=f"is {kind}; qwendoctor only replaces regular files"):
            files.write_text_atomic(path, "new")
    assert fifo.is_fifo() and link.is_symlink() and target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.lock", "target.lock"]  # no temporary
    files.write_text_atomic(target, "new")  # a regular file is still replaced
    assert target.read_text() == "new"


# ---- reads are bounded -------------------------------------------------------------------------------------------

def test_a_bounded_read_refuses_a_fifo_at_once_and_a_file_over_the_limit(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open would wait forever
    with pytest.raises(UsageError, match="--prompts .*fifo: is a FIFO, not a regular file"):
        files.read_bounded(tmp_path / "fifo", "--prompts")
    (tmp_path / "big").write_bytes(b"x" * 11)
    with pytest.raises(UsageError, match="larger than"):
        files.read_bounded(tmp_path / "big", "--lock", limit=10)
    (tmp_path / "ok").write_text("a fox\n")
    assert files.read_bounded(tmp_path / "ok", "--prompts") == "a fox\n"
    assert files.MAX_READ_BYTES == 1 << 20  # the README's "1 MiB"


# ---- one table of ranges -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, good, bad", [
    ("width", [16, 1328, 4096], [0, 1000, 4112, 16384, 128.0, True, "128"]),
    ("steps", [2, 50, 1000], [1, 1001, 10**9]),
    ("true_cfg_scale", [1, 4.0, 100], [0.5, math.inf, math.nan, 101]),
    ("timeout", [0.001, 3600], [0, -1, math.nan, math.inf]),
    ("heartbeat", [1, 86400], [0, 9 * 10**9]),
    ("num_images", [1, 10000], [0, 10**20]),
    ("memory_limit", [0.5, 80], [0, math.nan, math.inf]),
])
def test_each_range_takes_its_bounds_and_refuses_past_them_naming_the_field(field, good, bad):
    for value in good:
        assert limits.check(field, value) == value
    for value in bad:
        with pytest.raises(limits.RangeError, match=f"^--x must be .*got {re.escape(repr(value))}"):
            limits.check(field, value, label="--x")


def test_the_readme_states_the_ranges():
    readme = (ROOT / "README.md").read_text()
    for field, rule in limits.table():
        assert f"| {field} | {rule} |" in readme, (field, rule)


# ---- ranks -------------------------------------------------------------------------------------------------------

def test_only_a_rank_our_launcher_started_is_a_rank(monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(parallel.ERROR_DIR_ENV, raising=False)
    assert not parallel.in_rank() and parallel.rank() == 0 and parallel.is_main()
    monkeypatch.setenv(parallel.ERROR_DIR_ENV, "/nonexistent")
    assert parallel.in_rank() and parallel.rank() == 1 and not parallel.is_main()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UsageError, match="RANK='one': not a rank number"):
        parallel.rank()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "soon", "1e12"])
def test_a_bad_distributed_timeout_is_named_as_the_variable(monkeypatch, value):
    monkeypatch.setenv(parallel.TIMEOUT_ENV, value)
    with pytest.raises(UsageError, match=f"^QWENDOCTOR_DIST_TIMEOUT_S='{re.escape(value)}': must be"):
        parallel.dist_timeout_s()


def test_cpu_ranks_are_capped_and_gpus_by_the_visible_count():
    parallel.check_gpu_count(limits.MAX_CPU_RANKS, "cpu", 0)
    with pytest.raises(UsageError, match="--gpus 9: no GPU here; at most 8 CPU ranks"):
        parallel.check_gpu_count(9, "cpu", 0)
    with pytest.raises(UsageError, match="lock: profile.gpus 3: only 2 GPUs visible"):
        parallel.check_gpu_count(3, "cuda", 2, "lock: profile.gpus")


# ---- the bench's earlier document, the imports probe, a bare `qwendoctor` --------------------------------------

@pytest.mark.parametrize("document", [
    [], {"rows": "x"}, {"rows": [1]}, {"rows": [{"id": 3, "profile": {}}]},
    {"rows": [{"id": "default", "profile": {"compile": "turbo"}}]},
    {"rows": [{"id": "default", "profile": {}, "step_ms": "fast"}]},
    {"rows": [{"id": "default", "profile": {}, "step_ms": 1.0}]},  # timed, no PSNR: not a row bench writes
    {"rows": [], "fingerprint": "cpu"},
])
def test_bench_resume_does_not_trust_a_document_of_another_shape(document):
    from qwendoctor import bench

    assert not bench._well_formed(document)


def test_the_imports_probe_names_a_refused_attention_variable(monkeypatch):
    from probes import imports

    monkeypatch.setenv("DIFFUSERS_ATTN_BACKEND", "bogus")
    result = {"error": "RuntimeError: Failed to import diffusers.models (look up to see its traceback)",
              "chain": ["ValueError: 'bogus' is not a valid AttentionBackendName"]}
    assert imports._refused_env(result) == "DIFFUSERS_ATTN_BACKEND='bogus'"
    monkeypatch.delenv("DIFFUSERS_ATTN_BACKEND")
    assert imports._refused_env(result) is None


def test_qwendoctor_alone_prints_its_help_and_exits_0(capsys):
    from qwendoctor import cli

    with pytest.raises(SystemExit) as done:
        cli.main([])
    captured = capsys.readouterr()
    assert done.value.code == 0 and captured.err == ""
    assert captured.out.startswith("Usage: qwendoctor") and "generate" in captured.out
