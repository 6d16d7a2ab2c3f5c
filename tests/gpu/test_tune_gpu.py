"""The tuner's model pool on a GPU with the full-size synthetic transformer: FP8 and compile are baked in, and a
later bf16 eager trial must get the original weights back without a second copy left on the card."""

import dataclasses

import numpy as np
import pytest
import torch

from qwendoctor import quality, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.pool import ModelPool
from qwendoctor.profile import Profile, Workload


def _gib() -> float:
    return torch.cuda.memory_allocated() / 2**30


def test_pool_restores_synthetic_after_fp8_and_compile():
    workload = Workload(model="synthetic", width=512, height=512, reference_steps=4, dtype="bfloat16").validate()
    pool = ModelPool(workload, detect_capabilities(("native", "_native_cudnn")))
    prompt = "a red fox in the snow"

    model = pool.prepare(Profile()).model
    before = runner.render(model, workload, Profile(), prompt, 0)
    loaded_gib = _gib()

    fp8 = Profile(quantization="fp8_rowwise", cfg_batching=True)
    prepared = pool.prepare(fp8)
    assert prepared.how == "re-applied"
    quantized_gib = _gib()
    fp8_image = runner.render(prepared.model, workload, fp8, prompt, 0)

    compiled = Profile(compile="regional", cfg_batching=True)
    prepared = pool.prepare(compiled)
    assert prepared.how == "replaced"  # FP8 weights cannot become bf16 again: a new transformer
    compiled_image = runner.render(prepared.model, workload, compiled, prompt, 0)
    assert pool.prepare(dataclasses.replace(compiled, steps=3)).how == "reused"  # same graph, other steps

    prepared = pool.prepare(Profile())
    assert prepared.how == "replaced" and pool.replaced == 2
    after = runner.render(prepared.model, workload, Profile(), prompt, 0)
    restored_gib = _gib()

    print(f"\nallocated: loaded {loaded_gib:.2f} GiB, FP8 {quantized_gib:.2f} GiB, restored {restored_gib:.2f} GiB")
    # The regenerated weights are the original ones: the same image, bit for bit.
    np.testing.assert_array_equal(before, after)
    # Nothing of the old transformers stays allocated (a leak would hold 20-41 GB).
    assert abs(restored_gib - loaded_gib) < 1.0 and quantized_gib < 0.75 * loaded_gib
    fidelity = quality.compare([fp8_image, compiled_image], [before, before])
    print(f"FP8 vs bf16 {fidelity['psnr_db_min']:.1f} dB (worst of FP8, compile)")
    assert fidelity["psnr_db_min"] > 25



def test_tune_on_synthetic_confirms_its_speedup_and_times_caches_without_searching_them(tmp_path):
    """The rule for random weights on the GPU, end to end: steps held, no cache searched or locked; the chosen
    profile confirmed against the default side by side; caches timed on fixed schedules."""
    pytest.importorskip("cache_dit")
    from qwendoctor import quality, tune
    from qwendoctor.profile import Profile

    options = tune.TuneOptions(
        workload=Workload(model="synthetic", width=512, height=512, reference_steps=8, dtype="bfloat16").validate(),
        prompts=["a red fox in the snow"], seeds=[0], floor=quality.parse_floor("balanced"),
        lock_path=str(tmp_path / "qwendoctor.lock"), storage=f"sqlite:///{tmp_path / 'study.db'}", trials=3,
        cache_dir=str(tmp_path / "cache"))
    lines = []
    result = tune.run_tune(options, log=lines.append)
    lock = result.lock
    print("\n".join(line for line in lines if "confirmed" in line or "fixed-schedule" in line))
    print(lock.profile.describe(), lock.measured, lock.study)
    assert lock.profile.steps is None and lock.profile.cache == "none"
    assert lock.study["fixed_cache_50_speedup"] > 1 and lock.study["fixed_cache_70_speedup"] > 1
    if lock.profile != Profile():
        assert lock.measured["confirmed_speedup"] > 0 and lock.study["confirm_rounds"] >= tune.CONFIRM_ROUNDS
        assert any(line.startswith("speed-up confirmed") or line.startswith("speed-up not confirmed")
                   for line in lines)
