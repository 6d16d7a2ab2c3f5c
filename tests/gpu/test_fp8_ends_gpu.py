"""FP8 with the blocks at either end left in bf16 (`quantization_bf16_blocks`), on the GPU with torchao: those
blocks keep plain bf16 weights, the others hold torchao's FP8 tensors, and the pipeline renders. Whether keeping
them buys image quality is tune's to measure against its floor, not asserted here."""

import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.profile import Profile, Workload

if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 needs compute capability 8.9 or newer", allow_module_level=True)


def test_the_end_blocks_stay_bf16_and_the_rest_are_fp8():
    workload = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="bfloat16")
    model = models.load_model("tiny", "cuda", "bfloat16")
    profile = Profile(quantization="fp8_rowwise", quantization_bf16_blocks=2)
    levers.optimize(model.pipe, profile, workload=workload)
    blocks = model.pipe.transformer.transformer_blocks
    kinds = [type(block.attn.to_q.weight).__name__ for block in blocks]
    print("to_q weight types by block:", kinds)
    assert kinds[:2] == kinds[-2:] == ["Parameter", "Parameter"]
    assert all(kind != "Parameter" for kind in kinds[2:-2])
    image = runner.render(model, workload, profile, "a red fox", 0)
    assert image.shape == (128, 128, 3) and float(image.std()) > 0
