"""The distilled-adapter lever (issue 27, item 2): `--distilled PATH[:SCALE]` is read from the file and its
declaration before torch loads a model, the workload and lock record its step counts and scheduler overrides, a
trial with it runs at a declared step count with CFG off and the adapter's scheduler, the pool takes it back off,
and tune on tiny weighs it against the base model's reference and says what its headline is against."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest

from probes.workload import Distilled, WorkloadError
from qwendoctor import fingerprint, levers, lockfile, models, report, runner, space
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.errors import UsageError
from qwendoctor.levers import distilled as distilled_lever
from qwendoctor.levers import lora
from qwendoctor.pool import ModelPool
from qwendoctor.profile import Profile, Workload, check_runnable
from qwendoctor.tiny import adapters

PROMPT = "a small red circle at the top left on a blue background"


def tiny_workload(**changes) -> Workload:
    fields = dict(model="tiny", width=128, height=128, reference_steps=6, dtype="float32",
                  distilled=lora.parse_distilled("tiny:distilled", "tiny"))
    return Workload(**{**fields, **changes}).validate()


def run_cli(*argv: str) -> int:
    from qwendoctor.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


@pytest.fixture
def undeclared(tmp_path) -> Path:
    """The tiny distilled adapter's weights alone, as a Qwen-Image-Lightning file comes: no adapter.json."""
    file = tmp_path / "lightning-like.safetensors"
    shutil.copyfile(adapters.path("distilled"), file)
    return file


# ---- the file and its declaration ---------------------------------------------------------------------------------

def test_the_shipped_adapter_brings_its_step_counts_and_scheduler():
    entry = lora.parse_distilled("tiny:distilled", "tiny")
    declared = adapters.metadata("distilled")
    assert entry.steps == tuple(declared["steps"]) and entry.rank == declared["rank"]
    assert entry.scheduler_overrides == declared["scheduler"]
    assert entry.sha256 == adapters.sha256("distilled")


def test_an_undeclared_file_needs_its_step_counts_and_gets_lightnings_scheduler(undeclared):
    with pytest.raises(UsageError, match="nothing declares the step counts it was distilled for; pass "
                                         "--distilled-steps N"):
        lora.parse_distilled(str(undeclared), "tiny")
    entry = lora.parse_distilled(f"{undeclared}:0.9", "tiny", "8,4,8")
    assert entry.steps == (8, 4) and entry.scale == 0.9
    assert entry.scheduler_overrides["base_shift"] == pytest.approx(math.log(3))
    assert entry.scheduler_overrides["shift_terminal"] is None


@pytest.mark.parametrize("steps, message", [("four", "use step counts separated by commas"),
                                            ("1", "--distilled-steps"), ("4,,8", "use step counts")])
def test_bad_distilled_steps_are_one_line(undeclared, steps, message):
    with pytest.raises(UsageError, match=message) as raised:
        lora.parse_distilled(str(undeclared), "tiny", steps)
    assert "\n" not in str(raised.value)


def test_a_style_adapter_is_not_taken_as_distilled_nor_a_distilled_one_as_a_lora():
    with pytest.raises(UsageError, match="declares kind 'style', not a distilled adapter; pass it with --lora"):
        lora.parse_distilled("tiny:frame", "tiny")
    with pytest.raises(UsageError, match="pass it with --distilled"):
        lora.parse_spec("tiny:distilled", "tiny")


@pytest.mark.parametrize("argv, message", [
    (("--distilled-steps", "4"), "--distilled-steps: names the step counts of a --distilled adapter, and none is given"),
    (("--distilled", "tiny:nosuch"), "no such tiny adapter"),
    (("--distilled", "tiny:frame"), "not a distilled adapter"),
    (("--lora", "tiny:distilled"), "pass it with --distilled"),
])
def test_the_cli_refuses_bad_distilled_input_in_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    lock = tmp_path / "q.lock"
    assert run_cli("tune", "--model", "tiny", "--trials", "1", "--lock", str(lock), *argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ---- the workload and the lock ------------------------------------------------------------------------------------

def test_the_lock_records_the_adapter_with_its_declaration_and_reads_it_back(tmp_path):
    workload = tiny_workload()
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=workload, profile=Profile(distilled=True, steps=4),
                         measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    text = (tmp_path / "q.lock").read_text()
    assert "[workload.distilled]" in text and "shift_terminal" in text  # the None override, listed apart
    read = lockfile.read_lock(tmp_path / "q.lock")
    assert read.workload == workload and read.profile.distilled and read.profile.steps == 4
    assert read.workload.distilled.scheduler_overrides["shift_terminal"] is None
    assert Workload.from_dict(Workload(model="tiny").to_dict()).distilled is None  # older locks: unchanged
    assert "distilled" not in Workload(model="tiny").to_dict()


@pytest.mark.parametrize("change, message", [
    ({"steps": []}, "workload.distilled.steps: must be a non-empty list"),
    ({"steps": [1]}, "workload.distilled.steps"),
    ({"scheduler": [1, 2]}, "workload.distilled.scheduler: must be a table"),
    ({"colour": "red"}, "workload.distilled.colour: unknown field"),
    ({"sha256": "nope"}, "workload.distilled.sha256"),
])
def test_a_bad_distilled_entry_in_a_lock_is_named(change, message):
    data = tiny_workload().to_dict()
    data["distilled"] = {**data["distilled"], **change}
    with pytest.raises(WorkloadError, match=message):
        Workload.from_dict(data)


def test_a_changed_adapter_file_makes_the_lock_stale(tmp_path, undeclared):
    workload = tiny_workload(distilled=lora.parse_distilled(str(undeclared), "tiny", "4"))
    lora.check_files(workload, "q.lock")
    data = bytearray(undeclared.read_bytes())
    data[-1] ^= 1
    undeclared.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="the file changed since the lock was tuned"):
        lora.check_files(workload, "q.lock")


# ---- the lever ----------------------------------------------------------------------------------------------------

def test_a_distilled_profile_runs_at_a_declared_step_count_with_cfg_off():
    workload = tiny_workload()
    arguments = runner.call_arguments(workload, Profile(distilled=True, steps=4))
    assert arguments["num_inference_steps"] == 4 and arguments["true_cfg_scale"] == 1.0
    assert runner.call_arguments(workload, Profile())["true_cfg_scale"] == 4.0
    capabilities = detect_capabilities()
    with pytest.raises(UsageError, match=r"at the step counts it was distilled for \(4, 8\); got steps = 6"):
        check_runnable(Profile(distilled=True, steps=6), workload, capabilities)
    with pytest.raises(UsageError, match="the workload has no distilled adapter"):
        check_runnable(Profile(distilled=True, steps=4), tiny_workload(distilled=None), capabilities)
    with pytest.raises(UsageError, match="the distilled adapter runs with CFG off"):
        check_runnable(Profile(distilled=True, steps=4, cfg_batching=True), workload, capabilities)
    assert not levers.cache.separate_cfg_passes(_with_workload(workload), Profile(distilled=True, steps=4))


def _with_workload(workload):
    class Pipe:
        pass

    pipe = Pipe()
    pipe._qwendoctor_workload = workload
    return pipe


def test_the_pool_puts_the_adapter_on_and_takes_it_off_again():
    """A trial with the adapter, then one without it on the same pool: the second draws what a fresh base
    pipeline draws (its weights and scheduler back), and the first what the adapter draws run by hand."""
    workload = tiny_workload()
    pool = ModelPool(workload, detect_capabilities())
    with_adapter = Profile(distilled=True, steps=4)
    model = pool.prepare(with_adapter).model
    assert model.pipe.scheduler.config["base_shift"] == pytest.approx(math.log(3))
    distilled_image = runner.render(model, workload, with_adapter, PROMPT, 0)
    base = Profile(steps=4)
    model = pool.prepare(base).model
    assert model.pipe.scheduler.config["base_shift"] != pytest.approx(math.log(3))
    base_image = runner.render(model, workload, base, PROMPT, 0)

    fresh = models.load_model("tiny", "cpu", "float32")
    expected_base = runner.render(fresh, workload, base, PROMPT, 0)
    assert np.abs(base_image - expected_base).max() < 1e-5
    kwargs = adapters.load(fresh.pipe, "distilled")
    import torch

    by_hand = fresh.pipe(prompt=PROMPT, width=128, height=128, num_inference_steps=4,
                         true_cfg_scale=kwargs["true_cfg_scale"], generator=torch.Generator().manual_seed(0),
                         output_type="np").images[0]
    assert np.abs(distilled_image - by_hand).max() < 1e-4
    assert np.abs(distilled_image - base_image).max() > 0.05  # the adapter did change the drawing


def test_a_style_lora_hotswap_keeps_the_distilled_adapter_active(tmp_path):
    from test_lora import make_lora

    first = lora.parse_spec(str(make_lora(tmp_path / "a", rank=4, seed=0)), "tiny")
    second = lora.parse_spec(str(make_lora(tmp_path / "b", rank=4, seed=1)), "tiny")
    profile = Profile(distilled=True, steps=4)
    model = runner.build(tiny_workload(loras=(first,)), profile, detect_capabilities())
    lora.hotswap(model.pipe, (second,), "tiny")
    swapped = runner.render(model, tiny_workload(loras=(second,)), profile, PROMPT, 0)
    expected_model = runner.build(tiny_workload(loras=(second,)), profile, detect_capabilities())
    expected = runner.render(expected_model, tiny_workload(loras=(second,)), profile, PROMPT, 0)
    assert np.abs(swapped - expected).max() < 1e-4
    assert sorted(model.pipe.get_active_adapters()) == ["lora0", "lora1"]


# ---- the search ---------------------------------------------------------------------------------------------------

def test_the_search_offers_it_on_a_model_that_draws_and_queues_it_as_declared():
    capabilities = detect_capabilities()
    search = space.build_search_space(capabilities, tiny_workload())
    assert search.values("distilled") == (False, True)
    queued = space.distilled_params(search)
    assert [params["distilled_steps"] for params in queued] == [4, 8]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(queued[0])
    profile = space.sample_profile(study.ask(), search)
    assert profile.distilled and profile.steps == 4 and not profile.cfg_batching
    synthetic = dataclasses.replace(tiny_workload(), model="synthetic", distilled=Distilled(
        path="/x.safetensors", sha256="0" * 64, steps=(8,)))
    offered = space.build_search_space(capabilities, synthetic)
    assert offered.values("distilled") == (False,) and space.distilled_params(offered) == []
    assert any("has random weights" in reason for reason in offered.left_out)
    plain = space.build_search_space(capabilities, tiny_workload(distilled=None))
    assert plain.values("distilled") == (False,) and plain.values("lora_mode") == ("unfused",)


def test_drawn_profiles_with_the_adapter_always_run_at_its_step_counts():
    search = space.build_search_space(detect_capabilities(), tiny_workload())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    drawn = [space.sample_profile(study.ask(), search) for _ in range(40)]
    with_adapter = [profile for profile in drawn if profile.distilled]
    assert with_adapter and len(with_adapter) < len(drawn)
    assert all(profile.steps in (4, 8) and not profile.cfg_batching for profile in with_adapter)


def test_a_tune_on_tiny_locks_the_adapter_and_says_its_headline_is_against_the_base(tmp_path):
    from qwendoctor import quality
    from qwendoctor.tune import TuneOptions, run_tune

    workload = tiny_workload(reference_steps=20)
    options = TuneOptions(workload=workload, prompts=[PROMPT], seeds=[0], floor=quality.parse_floor("fast"),
                          lock_path=str(tmp_path / "q.lock"), storage=f"sqlite:///{tmp_path / 'study.db'}",
                          trials=3, timed_steps=2)
    result = run_tune(options)
    tried = [row["profile"] for row in result.trials]
    assert any("distilled" in text for text in tried), tried
    locked = lockfile.read_lock(tmp_path / "q.lock")
    assert locked.workload.distilled == workload.distilled
    if locked.profile.distilled:
        assert locked.profile.steps in (4, 8)
        line = report.speedup_line(locked)
        assert "over the base model's default (20 steps, true CFG 4, without the distilled adapter" in line
        assert json.loads(report.tune_json(result))["speedup_against"].startswith("base model's default")
    else:
        pytest.fail(f"the adapter lost on tiny to {locked.profile.describe()}: {result.trials}")
