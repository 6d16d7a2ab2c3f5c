"""FP8 row-wise with the text stream left in bf16 (`quantization_text_stream="bf16"`), on Qwen-Image's full-width
blocks: the faster of the lever's two text-stream choices where the memory allows (1.15x a step on an H100 at
1024x1024, measured by benchmarks/tools/fp8_diagnose.py before the choice was the lever's). The text stream's
Linears keep their bf16 weights, the image stream's are torchao's FP8, and both compile modes run and stay close
to bf16."""

import pytest
import torch
from test_fp8_synthetic_gpu import _inputs, _relative_error, _two_full_width_blocks

from qwendoctor import levers
from qwendoctor.levers.quantization import in_text_stream
from qwendoctor.profile import Profile

if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 needs compute capability 8.9 or newer", allow_module_level=True)


@pytest.mark.parametrize("compile_mode", ["none", "regional"])
def test_fp8_rowwise_with_the_text_stream_in_bf16(compile_mode):
    from types import SimpleNamespace

    transformer = _two_full_width_blocks()
    with torch.no_grad():
        reference = transformer(**_inputs())[0].float()
    profile = Profile(quantization="fp8_rowwise", quantization_text_stream="bf16", compile=compile_mode)
    levers.apply_quantization(SimpleNamespace(transformer=transformer), profile)
    linears = {name: module for name, module in transformer.transformer_blocks.named_modules()
               if isinstance(module, torch.nn.Linear)}
    text = [name for name in linears if in_text_stream(name)]
    image = [name for name in linears if not in_text_stream(name)]
    assert text and image
    assert all(type(linears[name].weight) is torch.nn.Parameter and linears[name].weight.dtype == torch.bfloat16
               for name in text), "a text-stream weight was quantized"
    assert all(type(linears[name].weight.data) is not torch.Tensor for name in image), "an image weight stayed bf16"
    relative = _relative_error(transformer, reference, compile_mode)
    print(f"FP8 row-wise, text stream bf16 ({compile_mode}) vs bf16 on two full-width blocks: relative error "
          f"{relative:.4f}")
    assert relative < 0.1
