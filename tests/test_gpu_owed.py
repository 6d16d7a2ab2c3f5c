"""The GPU runner for owed work (benchmarks/tools/gpu_owed.py): order, ledger, budgets, timeouts, on the CPU."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("gpu_owed", Path(__file__).parents[1] / "benchmarks/tools/gpu_owed.py")
gpu_owed = importlib.util.module_from_spec(SPEC)
sys.modules["gpu_owed"] = gpu_owed  # dataclasses look their module up there
SPEC.loader.exec_module(gpu_owed)


def _task(task_id, code, budget_s=30):
    return gpu_owed.Task(task_id, "a test", (sys.executable, "-c", code), budget_s)


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    monkeypatch.setattr(gpu_owed, "LEDGER", path)
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_done_tasks_are_skipped_per_card_kind_and_failures_stay_owed(tmp_path, ledger):
    ledger.write_text(json.dumps({"id": "a", "card_kind": "H100", "rc": 0}) + "\n"
                      + json.dumps({"id": "b", "card_kind": "H100", "rc": 1}) + "\n")
    tasks = (_task("a", "print('a')"), _task("b", "print('b')"), _task("c", "import sys; sys.exit(3)"))
    out = tmp_path / "out"
    assert gpu_owed.main(["--out", str(out), "--card", "NVIDIA H100 80GB HBM3", "--seconds", "100"], tasks=tasks,
                         work=tmp_path / "work") == 0
    rows = _rows(out / "ledger.jsonl")
    assert [(row["id"], row["rc"], row["card_kind"]) for row in rows] == [("b", 0, "H100"), ("c", 3, "H100")]
    assert rows[1]["reason"] == "exit status"
    with tarfile.open(out / "results.tgz") as archive:  # the logs come back in one file
        assert "gpu-owed/logs/b.log" in archive.getnames()
    # On an H200 nothing counts as done yet.
    assert [t.id for t in gpu_owed.owed(tasks, gpu_owed.read_ledger(), "H200")] == ["a", "b", "c"]


def test_a_task_that_does_not_fit_the_time_left_is_passed_over_for_cheaper_ones(tmp_path, ledger):
    tasks = (_task("big", "print(1)", budget_s=500), _task("small", "print(2)", budget_s=20))
    out = tmp_path / "out"
    gpu_owed.main(["--out", str(out), "--card", "H200", "--seconds", "60"], tasks=tasks, work=tmp_path / "work")
    assert [row["id"] for row in _rows(out / "ledger.jsonl")] == ["small"]


def test_a_task_past_its_budget_is_killed_and_recorded(tmp_path, ledger):
    tasks = (_task("hang", "import time; time.sleep(60)", budget_s=1),)
    out = tmp_path / "out"
    gpu_owed.main(["--out", str(out), "--card", "H100", "--seconds", "30"], tasks=tasks, work=tmp_path / "work")
    [row] = _rows(out / "ledger.jsonl")
    assert row["rc"] == 124 and "budget" in row["reason"] and row["seconds"] < 30


def test_returned_rows_merge_into_the_ledger_and_list_reads_them(tmp_path, ledger, capsys):
    returned = tmp_path / "returned.jsonl"
    returned.write_text(json.dumps({"id": gpu_owed.TASKS[0].id, "card_kind": "H100", "rc": 0}) + "\n")
    gpu_owed.main(["--merge", str(returned)])
    assert _rows(ledger)[0]["id"] == gpu_owed.TASKS[0].id
    gpu_owed.main(["--list"])
    listing = capsys.readouterr().out
    assert f"H100: 1 of {len(gpu_owed.TASKS)} done" in listing and f"H200: 0 of {len(gpu_owed.TASKS)} done" in listing


def test_every_owed_gpu_test_file_exists_and_every_gpu_test_file_is_owed():
    root = Path(__file__).parents[1]
    named = {task.argv[-1] for task in gpu_owed.TASKS if task.id.startswith("test:")}
    on_disk = {str(path.relative_to(root)) for path in (root / "tests/gpu").glob("test_*.py")
               if path.stem not in gpu_owed.NOT_OWED_HERE}
    assert named == on_disk
