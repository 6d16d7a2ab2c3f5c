"""GPU tests: run on the device machine (an H100); collected only where CUDA is available.

Sizes are small (512x512, a few steps) so the file runs in a few minutes: speed at the real workload is the
benchmarks' job, not the tests'.
"""

import gc

import numpy as np
import pytest
import torch

from qwendoctor import models, quality, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile, Workload

SMALL = Workload(model="synthetic", width=512, height=512, reference_steps=3, dtype="bfloat16")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def capabilities():
    return detect_capabilities(("native", "_native_cudnn", "_native_flash", "_native_efficient"))


def test_check_probes_see_the_gpu():
    from qwendoctor.doctor import run_probes

    findings = {f.id: f for f in run_probes()}
    assert findings["gpu"].status in ("ok", "warn"), findings["gpu"]
    assert findings["gpu"].measured["gpus"][0]["cc"]
    assert findings["torch_build"].status == "ok", findings["torch_build"]
    working = findings["attention_backends"].measured["working"]
    assert "native" in working and "_native_cudnn" in working, findings["attention_backends"]


def test_synthetic_builds_in_bf16_on_the_gpu_without_a_full_precision_copy():
    _free()
    torch.cuda.reset_peak_memory_stats()
    model = models.load_model("synthetic", "cuda", "bfloat16")
    transformer = model.pipe.transformer
    parameters = sum(p.numel() for p in transformer.parameters())
    dtypes = {p.dtype for p in transformer.parameters()}
    devices = {p.device.type for p in transformer.parameters()}
    # Everything the pipeline holds on the card (the 20B transformer, the 7B text encoder, the VAE), at its dtype's
    # size: ~58 GiB in bf16. An fp32 copy of the transformer on the way would have peaked ~38 GiB above it.
    held_gib = sum(p.numel() * p.element_size() for component in (transformer, model.pipe.text_encoder, model.pipe.vae)
                   for p in component.parameters()) / 2**30
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    image = runner.render(model, SMALL, Profile(), "a red fox", 0)
    # Freed before asserting: a failed assertion keeps the frame (and 58 GiB) alive into the next tests.
    del model, transformer
    _free()
    assert 20.0e9 < parameters < 20.9e9
    assert dtypes == {torch.bfloat16} and devices == {"cuda"}
    assert peak_gib < held_gib + 4, (peak_gib, held_gib)
    assert image.shape == (512, 512, 3) and np.isfinite(image).all()


def _render_pair(profile, capabilities):
    """The default render and `profile`'s render of the same prompt and seed, each on a fresh synthetic model."""
    baseline_model = runner.build(SMALL, Profile(), capabilities)
    reference = runner.render(baseline_model, SMALL, Profile(), "a red fox", 0)
    del baseline_model
    _free()
    model = runner.build(SMALL, profile, capabilities)
    runner.render(model, SMALL, profile, "a red fox", 0)  # warm-up (compile)
    image = runner.render(model, SMALL, profile, "a red fox", 0)
    return model, reference, image


def test_regional_compile_on_synthetic_matches_eager(capabilities):
    torch._dynamo.reset()
    profile = Profile(attention_backend="_native_cudnn", compile="regional")
    model, reference, image = _render_pair(profile, capabilities)
    blocks = model.pipe.transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    fidelity = quality.compare([image], [reference])
    print(f"regional compile vs eager: {fidelity}")
    assert fidelity["psnr_db"] > 35
    del model
    _free()


def test_fp8_rowwise_on_synthetic_quantizes_blocks_and_stays_close(capabilities):
    profile = Profile(quantization="fp8_rowwise")
    model, reference, image = _render_pair(profile, capabilities)
    weight = model.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert "Float8" in type(weight).__name__ or "Float8" in type(getattr(weight, "data", None)).__name__, type(weight)
    fidelity = quality.compare([image], [reference])
    print(f"fp8 row-wise vs bf16: {fidelity}")
    assert fidelity["psnr_db"] > 25
    del model, weight
    _free()


def test_fp8_and_compile_levers_combine(capabilities):
    torch._dynamo.reset()
    profile = Profile(quantization="fp8_rowwise", compile="regional")
    model = runner.build(Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="bfloat16"),
                         profile, capabilities)
    image = runner.render(model, Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="bfloat16"),
                          profile, "a red fox", 0)
    assert np.isfinite(image).all()
    # FP8 quantization must not switch on torchao's process-wide inductor settings (minutes of kernel tuning
    # for every later compile); coordinate descent is only the `coordinate-descent` compile mode.
    import torch._inductor.config as inductor_config

    assert not inductor_config.coordinate_descent_tuning


def test_tune_on_tiny_searches_gpu_levers(tmp_path, capabilities):
    from qwendoctor import lockfile, space, tune

    workload = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="bfloat16")
    options = tune.TuneOptions(workload=workload, prompts=["a red fox"], seeds=[0],
                               floor=quality.parse_floor("fast"), lock_path=str(tmp_path / "q.lock"),
                               storage=f"sqlite:///{tmp_path / 's.db'}", trials=4)
    search = space.build_search_space(capabilities, workload)
    assert "regional" in search.values("compile") and "fp8_rowwise" in search.values("quantization")
    result = tune.run_tune(options, capabilities=capabilities)
    lock = lockfile.read_lock(options.lock_path)
    assert lock.fingerprint["device"] == "cuda" and lock.fingerprint["gpu_name"]
    for row in result.trials:
        print(row)
