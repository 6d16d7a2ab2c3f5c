"""benchmarks/tools/lora_gpu.py's parts that need no GPU, on the CPU: the LoRA it makes from module shapes (every
targeted Linear, diffusers loads it, the lever holds it), the Lightning rank's arithmetic, and the whole script run
with tiny, eager, on the CPU in place of synthetic compiled on CUDA, so its first GPU run does not fail on a typo."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qwendoctor import models, runner
from qwendoctor.levers import lora
from qwendoctor.profile import Profile, Workload

SPEC = importlib.util.spec_from_file_location("lora_gpu", Path(__file__).parents[1] / "benchmarks/tools/lora_gpu.py")
lora_gpu = importlib.util.module_from_spec(SPEC)
sys.modules["lora_gpu"] = lora_gpu
SPEC.loader.exec_module(lora_gpu)


@pytest.fixture(scope="module")
def tiny_shapes():
    return lora_gpu.lora_shapes(models.transformer_config("tiny"))


def test_the_shapes_are_every_targeted_linear_of_every_block(tiny_shapes):
    transformer = models.load_model("tiny", "cpu", "float32").pipe.transformer
    blocks = len(transformer.transformer_blocks)
    assert len(tiny_shapes) == blocks * len(lora_gpu.TARGETS)
    for name, (fan_in, fan_out) in tiny_shapes.items():
        module = transformer.get_submodule(name)
        assert isinstance(module, torch.nn.Linear) and (module.in_features, module.out_features) == (fan_in, fan_out)


def test_a_written_lora_loads_through_the_lever_on_every_targeted_linear(tiny_shapes, tmp_path):
    file = lora_gpu.write_lora(tmp_path / "a", tiny_shapes, rank=4, seed=0, dtype=torch.float32)
    entry = lora.parse_spec(f"{file}:0.5", "tiny")
    assert entry.rank == 4
    header = lora.read_header(str(file), "x")
    assert all(key.startswith("transformer.transformer_blocks.") for key in header if key != "__metadata__")
    lora.check_keys_match((entry,), "tiny", models.transformer_config("tiny"))  # no key of another model
    workload = Workload(model="tiny", width=128, height=128, reference_steps=2, dtype="float32",
                        loras=(entry,)).validate()
    from qwendoctor.capabilities import detect_capabilities

    model = runner.build(workload, Profile(), detect_capabilities())
    transformer = model.pipe.transformer
    for name, (fan_in, fan_out) in tiny_shapes.items():
        module = transformer.get_submodule(name)
        assert module.lora_A["lora0"].weight.shape == (4, fan_in), name
        assert module.lora_B["lora0"].weight.shape == (fan_out, 4), name
    loaded = model.pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q").lora_A["lora0"].weight
    written = lora_gpu.lora_state_dict(tiny_shapes, 4, 0, dtype=torch.float32)["transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.equal(loaded.detach().cpu(), written)


def test_the_lora_output_is_about_the_asked_fraction_of_a_random_linear(tiny_shapes):
    state = lora_gpu.lora_state_dict(tiny_shapes, 8, seed=3, relative=0.05, dtype=torch.float32)
    ratios = []
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.3.attn.to_k"):
        y = x @ state[f"{name}.lora_A.weight"].T @ state[f"{name}.lora_B.weight"].T
        ratios.append(float(y.std() / x.std()))
    assert all(0.03 < ratio < 0.08 for ratio in ratios), ratios


def test_lightning_rank_64_is_what_its_published_file_size_holds():
    shapes = lora_gpu.lora_shapes(models.transformer_config("synthetic"))
    assert len(shapes) == 60 * 12
    header = lora_gpu.LIGHTNING_FILE_BYTES - lora_gpu.payload_bytes(shapes, 64)
    assert 0 < header < 2**20  # what is left is a safetensors header of 1,440 tensors
    for other in (32, 48, 96, 128):
        assert abs(lora_gpu.LIGHTNING_FILE_BYTES - lora_gpu.payload_bytes(shapes, other)) > 50 * 2**20


def test_unknown_rows_and_a_hotswap_rank_above_lightning_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lora_gpu.main(["--out", str(tmp_path), "--rows", "no_lora,nosuch"])
    assert "unknown row 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lora_gpu.main(["--out", str(tmp_path), "--rows", "hotswap", "--rank", "128"])
    assert "--rank 128" in capsys.readouterr().err


def test_the_whole_script_runs_with_tiny_eager_on_the_cpu(tmp_path, monkeypatch, capsys):
    """synthetic/cuda/bf16/regional swapped for tiny/cpu/float32/eager: every row's code path once (FP8 is refused
    on the CPU, which the tiny row records as its finding)."""
    monkeypatch.setattr(lora_gpu, "MODEL", "tiny")
    monkeypatch.setattr(lora_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(lora_gpu, "DTYPE", "float32")
    monkeypatch.setattr(lora_gpu, "COMPILE", "none")
    assert lora_gpu.main(["--out", str(tmp_path), "--rank", "4", "--timed-steps", "2", "--width", "128",
                          "--height", "128", "--tiny-prompts", "1", "--tiny-steps", "2", "--rows",
                          "no_lora,fused,unfused,hotswap,tiny_fp8,eager_fused"]) == 0
    document = json.loads((tmp_path / "lora_gpu.json").read_text())
    rows = document["rows"]
    assert not [name for name, row in rows.items() if "error" in row], {n: r.get("error") for n, r in rows.items()}
    assert list(rows) == ["no_lora", "fused", "unfused", "hotswap", "tiny_fp8", "eager_fused"]
    for name in ("fused", "unfused", "hotswap"):
        assert math.isfinite(rows[name]["vs_no_lora"]) and len(rows[name]["step_ms"]) == 2
    assert "vs_no_lora" not in rows["eager_fused"]  # its baseline is eager_no_lora, not asked for
    assert rows["hotswap"]["graphs_new_after_hotswap"] == 0 and rows["hotswap"]["no_new_graph"]
    assert rows["hotswap"]["psnr_db_vs_unfused"] < 60  # another LoRA, another image
    assert rows["fused"]["psnr_db_vs_no_lora"] < 60 and rows["unfused"]["psnr_db_fused_vs_unfused"] > 60
    assert document["loras"]["lightning"]["rank"] == 64 and document["loras"]["user"]["rank"] == 4
    assert document["loras"]["adapted_linears"] == 8 * 12
    tiny = rows["tiny_fp8"]
    assert set(tiny["bf16_fused"]["block_linear_weights"]) == {"Parameter"}  # bf16: nothing quantized
    assert "needs a CUDA GPU" in tiny["fp8_rowwise_fused"]["error"]
    assert set(tiny["bf16_no_lora"]) >= {"style_present", "checker_pass_inside_frame", "vs_bf16_fused"}
    assert document["verdicts"]["hotswap_compiled_no_new_graph"] is True
    table = capsys.readouterr().out
    assert "| hotswap |" in table and "| eager_fused | lightning | fused | none |" in table


def test_a_replaced_transformer_is_freed_after_a_hotswap(tmp_path, monkeypatch, tiny_shapes):
    """Two 20B transformers do not fit beside the text encoder: nothing (peft, the hotswap, the lever's records)
    may keep the previous one alive once the next row replaces it."""
    import argparse
    import gc
    import weakref

    from qwendoctor.capabilities import detect_capabilities

    monkeypatch.setattr(lora_gpu, "MODEL", "tiny")
    monkeypatch.setattr(lora_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(lora_gpu, "DTYPE", "float32")
    monkeypatch.setattr(lora_gpu, "COMPILE", "none")
    loras = {"lightning": lora.parse_spec(str(lora_gpu.write_lora(tmp_path / "a", tiny_shapes, 8, 0)), "tiny"),
             "user": lora.parse_spec(f"{lora_gpu.write_lora(tmp_path / 'b', tiny_shapes, 4, 1)}:0.8", "tiny")}
    args = argparse.Namespace(width=128, height=128, timed_steps=2, profile="")
    bench = lora_gpu.Synthetic(args, detect_capabilities(), loras)
    bench.run("unfused")
    held = weakref.ref(bench.model.pipe.transformer)
    bench.hotswap({})
    bench.prepare("fused")
    gc.collect()
    assert held() is None
    assert bench.model.pipe.transformer._qwendoctor_loras[0] == "fused"
    bench.close()
