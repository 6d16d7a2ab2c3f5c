"""The GELU-epilogue lever on the GPU: CUDA's fused op is the tanh GELU Qwen-Image uses (the CPU's is not), it
runs as one GEMM kernel with no GELU kernel beside it, also under regional compile, and the tiny model draws the
unfused image. Speed is the bench's (rows `gelu_epilogue` and `stack:+gelu_epilogue`), never asserted here."""

import numpy as np
import torch

from qwendoctor import bench, levers, models, runner
from qwendoctor.profile import Profile, Workload

PROMPT = "a red fox in the snow"


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _kernels(run) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    run()  # compile and cuBLASLt's heuristics outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as recorded:
        run()
        torch.cuda.synchronize()
    return [event.name for event in recorded.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def _gelu_kernels(names: list[str]) -> list[str]:
    """Kernels that compute a GELU outside a GEMM: ATen's GeluCUDAKernelImpl or an Inductor kernel fusing one."""
    return [n for n in names if "gelu" in n.lower() and bench.kernel_kind(n) != "gemm"]


def test_the_cuda_op_is_the_tanh_gelu_in_one_gemm_kernel():
    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=generator)
    w = torch.randn(1024, 256, device="cuda", generator=generator) / 16
    b = torch.randn(1024, device="cuda", generator=generator)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMM: the GELUs differ by far more than its rounding
    try:
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    linear = torch.addmm(b.double(), x.double(), w.t().double())
    tanh = torch.nn.functional.gelu(linear, approximate="tanh")
    exact = torch.nn.functional.gelu(linear)
    to_tanh, to_exact = float((fused - tanh).abs().max()), float((fused - exact).abs().max())
    print(f"fused vs tanh GELU {to_tanh:.2e}, vs exact {to_exact:.2e}")
    assert to_tanh < 1e-4 < to_exact

    # Qwen-Image's MLP at 1024x1024 with CFG batching: 2 x 4096 tokens, 3072 -> 12288, bf16.
    x = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16, generator=generator)
    w = torch.randn(12288, 3072, device="cuda", dtype=torch.bfloat16, generator=generator) / 64
    b = torch.randn(12288, device="cuda", dtype=torch.bfloat16, generator=generator)
    names = _kernels(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    print("kernels:", names)
    # Where cuBLASLt declines the epilogue, torch runs its GEMM and then ATen's GELU kernel: that is the failure.
    assert not _gelu_kernels(names) and any(bench.kernel_kind(n) == "gemm" for n in names), names


def test_tiny_draws_the_unfused_image_eager_and_compiled_with_no_gelu_kernel_left():
    workload = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="bfloat16")
    plain = models.load_model("tiny", "cuda", "bfloat16")
    expected = runner.render(plain, workload, Profile(), PROMPT, 0)
    for profile in (Profile(gelu_epilogue=True),
                    Profile(gelu_epilogue=True, fused_qkv=True, compile="regional", real_rope=True)):
        model = models.load_model("tiny", "cuda", "bfloat16")
        levers.optimize(model.pipe, profile, workload=workload)
        image = runner.render(model, workload, profile, PROMPT, 0)
        # bf16: the epilogue rounds once where the unfused path rounds the GEMM's output and then the GELU's.
        assert _psnr(image, expected) > 35, (profile.describe(), _psnr(image, expected))
        names = _kernels(lambda model=model, profile=profile: runner.render(model, workload, profile, PROMPT, 0))
        assert not _gelu_kernels(names), (profile.describe(), _gelu_kernels(names))
    # the check can fail: without the lever the compiled step has its GELU kernel
    unfused = Profile(fused_qkv=True, compile="regional", real_rope=True)
    model = models.load_model("tiny", "cuda", "bfloat16")
    levers.optimize(model.pipe, unfused, workload=workload)
    assert _gelu_kernels(_kernels(lambda: runner.render(model, workload, unfused, PROMPT, 0)))
