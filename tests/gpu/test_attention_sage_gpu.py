"""SageAttention's `sageattn` (PyPI `sageattention`, carried as a wheel in .whl/) through diffusers' dispatcher on
the GPU: within the 8-bit limit of a float64 reference at Qwen-Image's head shape, passed by the attention probe,
and one opaque op under regional compile with fullgraph=True on the tiny model."""

import pytest
import torch

pytest.importorskip("sageattention", reason="carry the sageattention wheel in .whl/ (pip install sageattention)")

from probes.backends import LOSSY_REL_ERR_LIMIT  # noqa: E402
from qwendoctor import levers, models, runner  # noqa: E402
from qwendoctor.levers import attention  # noqa: E402
from qwendoctor.profile import Profile, Workload  # noqa: E402


def test_sageattn_is_within_the_8bit_limit_at_qwen_image_shapes():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    assert attention.register_sageattn_backend()
    generator = torch.Generator("cuda").manual_seed(0)
    # [B, S, H, D]: 1024x1024's 4096 image tokens and a short prompt, Qwen-Image's 24 heads of 128.
    q, k, v = (torch.randn(1, 4096 + 32, 24, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    out = dispatch_attention_fn(q, k, v, backend="sageattn")
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    error = float(torch.linalg.vector_norm(out.double() - reference) / torch.linalg.vector_norm(reference))
    print(f"sageattn relative error vs float64: {error:.3e}")
    assert error < LOSSY_REL_ERR_LIMIT
    exact = dispatch_attention_fn(q, k, v, backend="native")
    exact_error = float(torch.linalg.vector_norm(exact.double() - reference) / torch.linalg.vector_norm(reference))
    assert exact_error < error  # 8-bit: further from the reference than bf16 SDPA


def test_sageattn_compiles_in_the_tiny_pipeline_and_draws_close_to_native():
    workload = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="bfloat16")
    plain = models.load_model("tiny", "cuda", "bfloat16")
    levers.optimize(plain.pipe, Profile(), workload=workload)
    expected = runner.render(plain, workload, Profile(), "a red fox", 0)
    profile = Profile(attention_backend="sageattn", compile="regional")
    model = models.load_model("tiny", "cuda", "bfloat16")
    levers.optimize(model.pipe, profile, workload=workload)
    image = runner.render(model, workload, profile, "a red fox", 0)
    difference = abs(image.astype("float64") - expected).mean()
    print(f"sageattn + regional compile vs native eager, mean |difference| {difference:.4f}")
    assert difference < 0.05
