"""The memory plan: each placement's estimate against the peaks measured on an H200 (benchmarks/h200/memory), the
placement chosen for a card or a `--memory-limit`, the refusal when none fits (before any weights load), and the
plan carried through tune's search space, the pool and generate."""

import dataclasses
import json
from pathlib import Path

import pytest

from probes import memory_plan
from probes.context import ProbeContext
from probes.workload import Workload
from qwendoctor import levers, lockfile, models, pool, space, tune
from qwendoctor.levers import memory
from qwendoctor.errors import UsageError
from qwendoctor.profile import Capabilities, Profile
from tests.fakes import FakeNvml

REPO = Path(__file__).resolve().parents[1]
ALL = {p.name: p for p in memory_plan.PLACEMENTS + memory_plan.BY_HAND}
MIB = 2**20


def _benchmark_peak(file: str, row: str, size: str) -> float:
    report = json.loads((REPO / file).read_text())
    (entry,) = [r for r in report["rows"] if r["name"] == row]
    return entry["sizes"][size.split("x")[0]]["peak_allocated_gib"]


def test_the_measured_peaks_are_the_benchmark_files_own():
    recorded = memory_plan.measured_peaks()
    assert recorded["card"] == "NVIDIA H200"
    for name, sizes in recorded["peaks"].items():
        source = recorded["rows"][name]
        for size, peak in sizes.items():
            assert peak == _benchmark_peak(source["file"], source["row"], size), (name, size)


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_placement_is_estimated_within_ten_percent_of_its_measured_peaks(name):
    measured = memory_plan.measured_peaks()["peaks"][name]
    # Every placement the plan can choose was measured at both sizes the issue names.
    if name in {p.name for p in memory_plan.PLACEMENTS}:
        assert set(measured) == {"1024x1024", "1328x1328"}
    for size, peak in measured.items():
        width, height = map(int, size.split("x"))
        estimate = memory_plan.estimate_gib(ALL[name], width, height)
        assert abs(estimate - peak) <= 0.10 * peak, (name, size, estimate, peak)


def test_runs_not_used_for_the_fit_are_within_ten_percent_too():
    """The rows with compile, CFG batching and real RoPE on top of a placement were not among the fitted peaks."""
    for placement, row in (("resident", "80 GiB: resident + lossless speed"),
                           ("fp8_storage", "32 GiB: fp8-storage te=cpu vae=tiled + lossless speed")):
        for side in (1024, 1328):
            peak = _benchmark_peak("benchmarks/h200/memory/limits-2.json", row, f"{side}x{side}")
            assert abs(memory_plan.estimate_gib(ALL[placement], side, side) - peak) <= 0.10 * peak


@pytest.mark.parametrize("limit,side,expected", [
    (None, 1328, "resident"), (80, 1328, "resident"), (80, 1024, "resident"),
    (48, 1024, "text_encoder_cpu"), (48, 1328, "text_encoder_cpu_tiled"),
    (32, 1328, "fp8_storage"), (24, 1024, "fp8_storage"), (24, 1328, "fp8_storage"),
    (12, 1328, "group_offload"), (3, 1024, "group_offload"),
])
def test_the_fastest_placement_that_fits_is_chosen(limit, side, expected):
    workload = Workload(model="synthetic", width=side, height=side)
    assert memory_plan.choose(workload, limit if limit is not None else 139.8).name == expected


def test_no_placement_fitting_is_one_line_naming_the_smallest_and_what_it_needs():
    workload = Workload(model="synthetic", width=1328, height=1328, memory_limit_gib=2.0)
    with pytest.raises(UsageError) as refused:
        memory.placement_for(workload, "cuda")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--memory-limit 2: no memory placement of synthetic fits at 1328x1328")
    assert "the smallest, transformer blocks streamed from host memory" in message and "needs about 2.3 GiB" in message


def test_placement_for_leaves_the_cpu_and_tiny_alone_and_places_a_limited_card():
    assert memory.placement_for(Workload(model="synthetic", memory_limit_gib=24.0), "cpu") == {}
    assert memory.placement_for(Workload(model="tiny", width=128, height=128, memory_limit_gib=0.01), "cuda") == {}
    assert memory.placement_for(Workload(model="synthetic"), "cuda", total_gib=139.8) == {}
    assert memory.placement_for(Workload(model="synthetic", memory_limit_gib=24.0), "cuda") == {
        "weight_storage": "fp8_storage", "text_encoder": "cpu", "vae_decode": "tiled"}
    # A 24 GB card without a limit gets the same plan.
    assert memory.placement_for(Workload(model="Qwen/Qwen-Image"), "cuda", total_gib=23.6)["weight_storage"] == (
        "fp8_storage")


def _probe(total_gib: float, side: int = 1328, limit: float | None = None):
    workload = Workload(model="synthetic", width=side, height=side, memory_limit_gib=limit)
    return memory_plan.probe(ProbeContext(nvml=FakeNvml(total=int(total_gib * 1024) * MIB), workload=workload,
                                          env={}))


def test_an_80_gb_card_runs_1328_resident_and_the_finding_shows_estimate_and_measurement():
    finding = _probe(79.6)
    assert finding.status == "ok" and finding.measured["chosen"] == "resident"
    resident = finding.measured["plans"][0]
    assert resident["need_gib"] == pytest.approx(60.7, abs=0.1) and resident["measured_gib"] == 60.78
    assert any("about 60.7 GiB (measured 60.8 GiB on NVIDIA H200, benchmarks/h200/memory)" in line
               for line in finding.details)


def test_a_24_gb_card_is_told_the_placement_and_the_command():
    finding = _probe(23.6)
    assert finding.status == "warn" and finding.measured["chosen"] == "fp8_storage"
    assert "FP8 transformer weights" in finding.summary
    assert finding.fix.startswith("qwendoctor tune (on this GPU) places it so (profile: weight_storage=fp8_storage")
    finding = _probe(79.6, limit=32)
    assert finding.measured["chosen"] == "fp8_storage" and finding.fix.startswith("qwendoctor tune --memory-limit 32 ")
    finding = _probe(79.6, limit=1.0)
    assert finding.status == "fail" and "the smallest placement" in finding.summary and "2.3 GiB" in finding.summary


def _space(placement):
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True,
                                working_attention_backends=("native",), compile_works=True, gpu_name="NVIDIA H200")
    return space.build_search_space(capabilities, Workload(model="synthetic", width=1024, height=1024),
                                    evidence=lambda rule: None, placement=placement)


def test_the_search_space_keeps_the_placement_and_offers_only_what_runs_with_it():
    import optuna

    plain = _space({})
    fp8 = _space({"weight_storage": "fp8_storage", "text_encoder": "cpu", "vae_decode": "tiled"})
    assert "fp8_rowwise" in plain.values("quantization") and fp8.values("quantization") == ("none",)
    assert any("torchao FP8 quantization" in reason for reason in fp8.left_out)
    assert "weight_storage: fp8_storage (memory plan)" in fp8.describe()
    assert tune.space_signature(plain) != tune.space_signature(fp8)
    study = optuna.create_study()
    for _ in range(5):
        profile = space.sample_profile(study.ask(), fp8)
        assert (profile.weight_storage, profile.text_encoder, profile.vae_decode) == ("fp8_storage", "cpu", "tiled")
        assert profile.quantization == "none"
    sequential = _space({"offload": "sequential"})
    assert sequential.values("compile") == ("none",)


def test_tune_refuses_a_limit_no_placement_fits_before_anything_loads(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the plan was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    monkeypatch.setattr(memory, "apply", lambda limit: None)  # no GPU here to cap
    options = tune.TuneOptions(
        workload=Workload(model="synthetic", width=1024, height=1024, memory_limit_gib=1.5).validate(),
        prompts=["a fox"], seeds=[0], floor=tune.quality.parse_floor("balanced"),
        lock_path=str(tmp_path / "q.lock"), storage=f"sqlite:///{tmp_path}/study.db", trials=2)
    with pytest.raises(UsageError, match="^--memory-limit 1.5: no memory placement of synthetic fits"):
        tune.run_tune(options, capabilities=Capabilities(device="cuda"))
    assert not (tmp_path / "study.db").exists()


def test_the_study_runs_every_trial_and_its_reference_in_the_placement(tmp_path):
    options = tune.TuneOptions(
        workload=Workload(model="tiny", width=128, height=128), prompts=["a fox"], seeds=[0],
        floor=tune.quality.parse_floor("balanced"), lock_path="q.lock", storage="sqlite:///x.db",
        placement={"vae_decode": "tiled"})
    assert options.baseline == Profile(vae_decode="tiled")
    placed = tune.study_name(options, {})
    assert placed != tune.study_name(dataclasses.replace(options, placement={}), {})


def test_a_lock_records_its_placement_and_generate_refuses_a_limit_it_cannot_keep(tmp_path):
    from qwendoctor import fingerprint

    profile = Profile(weight_storage="fp8_storage", text_encoder="cpu", vae_decode="tiled")
    workload = Workload(model="synthetic", width=1328, height=1328, reference_steps=50, dtype="bfloat16",
                        memory_limit_gib=24.0)
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("synthetic", None), workload=workload,
                         profile=profile, measured={"latency_median_s": 39.7, "step_ms": 753.5,
                                                    "peak_memory_gib": 19.94})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    back = lockfile.read_lock(str(tmp_path / "q.lock"))
    assert back.profile == profile and back.measured["peak_memory_gib"] == 19.94
    assert back.workload.memory_limit_gib == 24.0
    memory.check_placement(back.profile, back.workload)  # it fits the limit it was tuned under
    with pytest.raises(UsageError, match=r"^--memory-limit 12: the lock's placement \(.*\) needs about 19.9 GiB at "
                                         r"1328x1328; tune again with --memory-limit 12$"):
        memory.check_placement(back.profile, dataclasses.replace(back.workload, memory_limit_gib=12.0))
    with pytest.raises(UsageError, match="needs about 60.7 GiB"):
        memory.check_placement(Profile(), back.workload)


def test_placements_load_what_they_offload_in_host_memory():
    assert levers.load_on_cpu(Profile()) == frozenset()
    assert levers.load_on_cpu(Profile(text_encoder="cpu", vae_decode="tiled")) == {"text_encoder"}
    assert levers.load_on_cpu(Profile(weight_storage="fp8_storage", text_encoder="cpu")) == {"transformer",
                                                                                             "text_encoder"}
    assert levers.load_on_cpu(Profile(offload="group")) == {"transformer"}
    assert levers.load_on_cpu(Profile(offload="model")) == {"transformer", "text_encoder", "vae"}


def test_the_pool_reloads_on_a_gpu_when_the_placement_changes(tiny_workload):
    loads = []

    def load(model, device, dtype, on_cpu=frozenset(), task="generate"):
        loads.append(on_cpu)
        # Built on the CPU, labelled as a GPU pipeline: the pool decides by the loaded model's device.
        return dataclasses.replace(models.load_model(model, "cpu", dtype), device="cuda")

    the_pool = pool.ModelPool(tiny_workload, Capabilities(device="cuda"), load=load)
    assert the_pool.prepare(Profile(text_encoder="cpu")).how == "loaded"
    assert the_pool.prepare(Profile(text_encoder="cpu", steps=3)).how == "reused"
    assert the_pool.prepare(Profile()).how == "reloaded"
    assert loads == [{"text_encoder"}, frozenset()]


def test_the_synthetic_text_encoder_is_qwen2_5_vl_7b_seeded_and_wherever_it_is_stored_the_same():
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = models._package_json("qwendoctor", "synthetic.json")["text_encoder"]
    with torch.device("meta"):
        full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(8.29e9, rel=0.001)
    # The same architecture at toy size, built twice: identical seeded weights, and rotary tables that a model
    # built the ordinary way has too (they are computed in __init__, not loaded).
    small = json.loads(json.dumps(config))
    small["text_config"].update(num_hidden_layers=1, hidden_size=512, intermediate_size=256,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    small["vision_config"].update(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=512)
    small.update(hidden_size=512, vocab_size=512)
    a = models.build_synthetic_text_encoder(small, "cpu", torch.bfloat16, seed=2)
    b = models.build_synthetic_text_encoder(small, "cpu", torch.bfloat16, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    ordinary = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**small))
    assert torch.equal(a.model.language_model.rotary_emb.inv_freq, ordinary.model.language_model.rotary_emb.inv_freq)
    tokens = models.synthetic_tokenizer()(["a red fox"], return_tensors="pt")
    with torch.no_grad():
        hidden = a(**tokens, output_hidden_states=True).hidden_states[-1]
    assert torch.isfinite(hidden.float()).all()


def test_tune_runs_its_reference_and_every_trial_in_the_plans_placement(tmp_path, monkeypatch):
    # tiny has no plan of its own (its figures are not Qwen-Image's): one is given, as a 24 GB card would get one.
    monkeypatch.setattr(memory, "placement_for", lambda workload, device, total_gib=None: {"vae_decode": "sliced"})
    logged = []
    options = tune.TuneOptions(
        workload=Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32").validate(),
        prompts=["a small red circle at the top left on a blue background"], seeds=[0],
        floor=tune.quality.parse_floor("balanced"), lock_path=str(tmp_path / "q.lock"),
        storage=f"sqlite:///{tmp_path}/study.db", trials=2, timed_steps=2)
    result = tune.run_tune(options, capabilities=Capabilities(
        device="cpu", working_attention_backends=("native", "_native_math")), log=logged.append)
    assert any(line.startswith("memory plan: vae_decode=sliced, for this GPU") for line in logged)
    assert all("vae=sliced" in row["profile"] for row in result.trials), result.trials
    assert lockfile.read_lock(options.lock_path).profile.vae_decode == "sliced"
    assert "the default here is diffusers' default in the memory plan's placement (attn=native vae=sliced)" in (
        result.notes[-1])


def test_bench_runs_every_row_in_the_placement_and_skips_what_cannot_run_in_it(tmp_path, tiny_workload,
                                                                                 monkeypatch):
    from qwendoctor import bench

    monkeypatch.setattr(memory, "placement_for", lambda workload, device, total_gib=None: {"vae_decode": "sliced"})
    options = bench.BenchOptions(workload=tiny_workload, timed_steps=3, ladder=False, breakdown=False,
                                 given=(("3 steps", Profile(steps=3)),), out_dir=str(tmp_path))
    document = bench.run_bench(options, Capabilities(device="cpu")).document
    assert document["placement"] == {"vae_decode": "sliced"}
    assert [(row["profile"]["vae_decode"], row["profile"].get("steps")) for row in document["rows"]] == [
        ("sliced", None), ("sliced", 3)]
    monkeypatch.setattr(memory, "placement_for",
                        lambda workload, device, total_gib=None: {"weight_storage": "fp8_storage"})
    options = dataclasses.replace(options, given=(("fp8", Profile(quantization="fp8_weight_only")),),
                                  out_dir=str(tmp_path / "fp8"))
    rows = bench.run_bench(options, Capabilities(device="cpu")).document["rows"]
    assert rows[1]["skipped"].startswith("not with the memory plan's placement: profile.weight_storage")


def test_in_a_placement_the_pool_replaces_the_transformer_not_the_pipeline(tiny_workload):
    """A study's trials share the plan's placement: a trial that changes what the transformer carries gets a new
    transformer, and the text encoder stays where it was placed instead of loading again."""
    loads = []

    def load(model, device, dtype, on_cpu=frozenset(), task="generate"):
        loads.append(on_cpu)
        return models.load_model(model, "cpu", dtype)

    the_pool = pool.ModelPool(tiny_workload, Capabilities(device="cuda"), load=load)
    placed = the_pool.prepare(Profile(text_encoder="cpu"))
    encoder = placed.model.pipe.text_encoder
    stored = the_pool.prepare(Profile(text_encoder="cpu", weight_storage="fp8_storage"))
    assert stored.how == "replaced" and len(loads) == 1 and stored.model.pipe.text_encoder is encoder
    assert hasattr(encoder, "_hf_hook")  # still placed on the CPU, once
    assert the_pool.prepare(Profile(text_encoder="cpu")).how == "replaced"
    # Model offload chains the transformer to the other components: a new pipeline.
    assert the_pool.prepare(Profile(offload="model")).how == "reloaded"
    assert the_pool.prepare(Profile(offload="model", weight_storage="fp8_storage")).how == "reloaded"
    assert len(loads) == 3


def test_an_edits_inputs_add_their_tokens_activations_and_no_text_to_image_peak_is_shown_for_it():
    generate = Workload(model="synthetic", width=1024, height=1024)
    edit = dataclasses.replace(generate, task="edit", input_sizes=((1024, 1024),))
    resident = memory_plan.PLACEMENTS[0]
    added = memory_plan.phases(resident, 1024, 1024, edit.input_image_tokens)["denoise"] - memory_plan.phases(
        resident, 1024, 1024)["denoise"]
    assert edit.input_image_tokens == 4096
    assert added == pytest.approx(memory_plan.ACTIVATION_GIB_PER_TOKEN * 4096)
    assert memory_plan.need_gib(resident, edit) >= memory_plan.need_gib(resident, generate)
    by_name = {row["name"]: row for row in memory_plan.rows(edit, None)}
    assert "measured_gib" not in by_name["resident"]
    assert "measured_gib" in {row["name"]: row for row in memory_plan.rows(generate, None)}["resident"]
