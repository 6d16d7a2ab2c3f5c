"""`--memory-limit`: the workload field, torch's per-process cap, memory_plan sized for it, and a trial that runs out
of memory recorded infeasible while the study goes on."""

import types

import pytest
import torch

from probes import memory_plan
from probes.workload import Workload, WorkloadError
from qwendoctor import lockfile, runner, study, tune
from qwendoctor.levers import memory
from qwendoctor.errors import UsageError
from qwendoctor.profile import Capabilities, Profile

GIB = 2**30


def test_the_limit_is_part_of_the_workload_and_left_out_of_it_when_unset():
    limited = Workload(model="tiny", width=128, height=128, memory_limit_gib=24.0).validate()
    assert limited.to_dict()["memory_limit_gib"] == 24.0
    assert Workload.from_dict(limited.to_dict()) == limited
    assert "memory_limit_gib" not in Workload(model="tiny").to_dict()  # older locks and study names unchanged
    for bad in (0, -1.0, float("nan"), float("inf"), "24", True):
        with pytest.raises(WorkloadError, match="workload.memory_limit_gib: must be a positive number of GiB"):
            Workload(model="tiny", memory_limit_gib=bad).validate()


def test_a_lock_records_the_limit_it_was_tuned_under(tmp_path):
    from qwendoctor import fingerprint, models

    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32",
                                           memory_limit_gib=32.0),
                         profile=Profile(), measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    assert "memory_limit_gib = 32.0" in (tmp_path / "q.lock").read_text()
    assert lockfile.read_lock(tmp_path / "q.lock").workload.memory_limit_gib == 32.0


@pytest.fixture
def fake_card(monkeypatch):
    """torch.cuda as an 80 GiB card whose per-process cap is recorded."""
    fractions = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: fractions.append((fraction, device)))
    return fractions


def test_apply_caps_the_process_at_its_share_of_the_card(fake_card):
    assert memory.apply(None) is None and fake_card == []
    assert memory.apply(24.0) == pytest.approx(0.3)
    assert fake_card == [(pytest.approx(0.3), 0)]
    with pytest.raises(UsageError, match=r"^--memory-limit 96: more than this GPU's 80.0 GiB$"):
        memory.apply(96.0)


def test_a_limit_without_a_gpu_or_out_of_range_is_one_line():
    with pytest.raises(UsageError, match="^--memory-limit 24: caps GPU memory, and there is no NVIDIA GPU here$"):
        memory.check_against_card(24.0, None)
    with pytest.raises(UsageError, match="^--memory-limit must be a positive number of GiB, got 0$"):
        memory.check_against_card(0, 80.0)
    memory.check_against_card(80.0, 80.0)  # the whole card is a limit too
    memory.check_against_card(None, None)


def test_memory_plan_sizes_its_plans_for_the_limit():
    """At 1328x1328 everything resident fits an 80 GiB card by this estimate; under a 48 GiB limit it cannot."""
    whole = memory_plan.summarize("NVIDIA H100 80GB HBM3", 79.6, None, Workload(model="Qwen/Qwen-Image"))
    capped = memory_plan.summarize("NVIDIA H100 80GB HBM3", 79.6, None,
                                   Workload(model="Qwen/Qwen-Image", memory_limit_gib=48.0))
    assert whole.measured["chosen"] != capped.measured["chosen"]
    assert capped.measured["memory_limit_gib"] == 48.0 and capped.measured["gpu_memory_gib"] == 79.6
    assert "48.0 GiB of the card's 79.6 (--memory-limit)" in capped.details[0]
    need = {row["name"]: row["need_gib"] for row in capped.measured["plans"]}
    assert need[capped.measured["chosen"]] <= 48.0 * (1 - memory_plan.HEADROOM) if capped.measured["chosen"] else True


def test_a_trial_out_of_memory_is_infeasible_and_the_study_goes_on(tmp_path, monkeypatch):
    real_time_steps = runner.time_steps
    ran_out = []

    def out_of_memory_once(model, workload, profile, *args, **kwargs):
        if not ran_out:
            ran_out.append(profile)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_time_steps(model, workload, profile, *args, **kwargs)

    monkeypatch.setattr(runner, "time_steps", out_of_memory_once)
    options = tune.TuneOptions(
        workload=Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32").validate(),
        prompts=["a small red circle at the top left on a blue background"], seeds=[0],
        floor=tune.quality.parse_floor("balanced"), lock_path=str(tmp_path / "q.lock"),
        storage=f"sqlite:///{tmp_path}/study.db", trials=3, timed_steps=2)
    result = tune.run_tune(options, capabilities=Capabilities(device="cpu",
                                                              working_attention_backends=("native", "_native_math")))
    rows = {row["number"]: row for row in result.trials}
    (oom,) = [row for row in rows.values() if row.get("failure")]
    assert oom["state"] == "infeasible" and oom["failure"].startswith(f"{study.OUT_OF_MEMORY}: CUDA out of memory")
    assert result.counts["out_of_memory"] == 1 and result.counts["trials"] == 3
    # The study went on: a trial after it was measured, on a pipeline loaded afresh.
    assert any(number > oom["number"] and not row.get("failure") for number, row in rows.items()), rows
    from qwendoctor import report

    assert report._trial_line(oom).endswith("infeasible, out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")


def test_load_pipeline_applies_the_locks_limit(tmp_path, monkeypatch):
    from qwendoctor import fingerprint, generate, models

    applied = []
    monkeypatch.setattr(memory, "apply", applied.append)
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32",
                                           memory_limit_gib=20.0),
                         profile=Profile(steps=2), measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    generate.load_tuned(str(tmp_path / "q.lock"))
    generate.build_tuned(lock, str(tmp_path / "q.lock"), memory_limit_gib=12.0)  # generate --memory-limit 12
    assert applied == [20.0, 12.0]
