"""qwendoctor bench: the ladder's logic, what a row records, the files it writes, and the CLI's errors."""

import dataclasses
import json
import types

import numpy as np
import pytest

from qwendoctor import bench, quality, runner
from qwendoctor.cli import main
from qwendoctor.profile import Capabilities, Profile

CPU = Capabilities(device="cpu", working_attention_backends=("native", "_native_math"))


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_kernel_kinds_of_real_h100_kernel_names():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off": "gemm",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
        "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at_0x7f": "attention",
        "triton_tem_fused_mm_0": "gemm",
        "triton_tem_fused_flex_attention_0": "attention",
        "triton_poi_fused_fa4_attention_view_3": "elementwise",  # a layout copy named after the op it feeds
        "triton_poi_fused__to_copy_add_mul_0": "elementwise",
        "triton_red_fused_native_layer_norm_1": "elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
        "Memcpy DtoD (Device -> Device)": "memory",
        "aten::addmm": "gemm",
        "aten::scaled_dot_product_attention": "attention",
        "aten::gelu": "elementwise",
        "some_unknown_kernel": "other",
        # SageAttention 1.0.6's Triton kernels, by their function names (not yet seen in a GPU profile)
        "_attn_fwd": "attention",
        "quant_per_block_int8_kernel": "elementwise",
    }
    assert {name: bench.kernel_kind(name) for name in names} == names


def test_the_synthetic_models_config_gives_the_20b_cost_model():
    """The bench counts FLOPs from the loaded transformer's config; synthetic's must be the real 20B model's."""
    from importlib import resources

    from probes import qwen_shapes

    config = json.loads(resources.files("qwendoctor").joinpath("synthetic.json").read_text())["transformer"]
    ours = qwen_shapes.flops_per_step_from_config(config, 1328, 1328, 128, passes=2)
    assert ours == pytest.approx(qwen_shapes.flops_per_step(1328, 1328, 128))
    # A W1 step, two passes of ~95 linear + ~36 attention TFLOP.
    assert 255e12 < ours["total"] < 270e12


def test_tiers_pick_the_fastest_row_within_each_floor():
    def row(id_, ms, psnr, **profile):
        return {"id": id_, "describe": id_, "step_ms": ms, "psnr_db": psnr, "s_per_image": ms / 20,
                "profile": Profile(**profile).to_dict()}

    rows = [row("default", 640, float("inf")), row("compile", 500, 46, compile="regional"),
            row("steps", 300, 45, steps=20), row("lossy", 450, 35, compile="full"),
            row("fp8", 390, 41, quantization="fp8_rowwise", compile="regional"),
            row("fp8-noisy", 350, 25, quantization="fp8_tensorwise", compile="regional"),
            {"id": "oom", "describe": "oom", "failed": "out of memory", "profile": Profile(compile="full").to_dict()}]
    tiers = bench.tiers(rows)
    # fewer steps is not lossless: the tier keeps the workload's step count
    assert tiers["lossless"]["id"] == "compile" and tiers["lossless"]["speedup"] == pytest.approx(640 / 500)
    assert tiers["fp8"]["id"] == "fp8"
    only_default = bench.tiers(rows[:1])
    assert only_default["lossless"]["id"] == "default" and only_default["fp8"] is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA machine in miniature: every profile 'renders' with a step time set per lever, so the stack's
    keep-or-drop decisions can be checked without a GPU."""
    step_ms = {"default": 640.0, "_native_cudnn": 660.0, "sageattn": 640.0, "cfg_batching": 625.0, "regional": 505.0,
               "max-autotune-no-cudagraphs": 520.0, "fp8_rowwise": 380.0}
    built = []

    def fake_build(workload, profile, capabilities):
        built.append(profile)
        config = {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 60}
        pipe = types.SimpleNamespace(transformer=types.SimpleNamespace(config=config))
        return types.SimpleNamespace(pipe=pipe, has_text_encoder=False, synthetic_text_tokens=128, device="cuda")

    def fake_measure(model, workload, profile, prompts, seeds, warmup=1):
        ms = step_ms["default"]
        if profile.attention_backend != "native":
            ms = step_ms[profile.attention_backend]
        if profile.cfg_batching:
            ms -= 15
        if profile.compile != "none":
            ms -= 135 if profile.compile_mode == "default" else 120
        if profile.real_rope and profile.compile != "none":
            ms -= 8
        if profile.fused_qkv:
            ms -= 3
        if profile.gelu_epilogue:
            ms -= 4
        if profile.attention_backend == "sageattn":
            ms -= 60
        if profile.quantization != "none":
            ms -= 110
        noise = 0.002 * ((profile.quantization != "none") + (profile.attention_backend == "sageattn"))
        image = np.full((8, 8, 3), 0.5) + noise * np.random.default_rng(0).standard_normal((8, 8, 3))
        return runner.Measurement(images=[image], latencies_s=[profile.steps * ms / 1000 + 0.2],
                                  step_s=[ms / 1000] * profile.steps, warmup_s=1.0, peak_memory_gib=40.0)

    monkeypatch.setattr(runner, "build", fake_build)
    monkeypatch.setattr(runner, "measure", fake_measure)
    monkeypatch.setattr(bench, "gemm_ceiling", lambda device: {"bf16_tflops": 790.0, "fp8_tflops": 1400.0})
    return built


def test_the_stack_keeps_a_lever_only_where_it_made_the_step_faster(fake_gpu, tmp_path, tiny_workload):
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, compile_works=True,
                                working_attention_backends=("native", "_native_cudnn"))
    workload = dataclasses.replace(tiny_workload, model="synthetic", width=1328, height=1328, reference_steps=50,
                                   dtype="bfloat16")
    options = bench.BenchOptions(workload=workload, timed_steps=6, breakdown=False, out_dir=str(tmp_path))
    result = bench.run_bench(options, capabilities)
    rows = {r["id"]: r for r in result.document["rows"]}
    assert list(rows) == ["default", "attn:_native_cudnn", "fused_qkv", "gelu_epilogue", "fp8_rowwise",
                          "fp8_rowwise_text_bf16",
                          "compile:regional",
                          "cfg_batching", "stack:+cfg_batching", "stack:+compile", "stack:+real_rope",
                          "stack:+fused_qkv", "stack:+gelu_epilogue", "stack:+max_autotune",
                          "stack:+cuda_graphs", "stack:+fp8_rowwise", "stack:+cuda_graphs_fp8"]
    # cuDNN was slower than native here, so the stack starts from native and reuses the alone row for CFG
    assert result.document["stack_start"] == Profile().to_dict()
    assert rows["stack:+cfg_batching"]["same_as"] == "cfg_batching" and rows["stack:+cfg_batching"]["kept"]
    assert rows["stack:+compile"]["kept"] and rows["stack:+compile"]["step_ms"] == pytest.approx(490)
    assert rows["stack:+real_rope"]["kept"] and rows["stack:+real_rope"]["step_ms"] == pytest.approx(482)
    assert rows["stack:+fused_qkv"]["kept"] and rows["stack:+fused_qkv"]["step_ms"] == pytest.approx(479)
    assert rows["stack:+gelu_epilogue"]["kept"] and rows["stack:+gelu_epilogue"]["step_ms"] == pytest.approx(475)
    assert not rows["stack:+max_autotune"]["kept"]  # 490 > 475: dropped
    # CUDA graphs: the whole transformer compiled, on the stack without max-autotune; slower here, dropped
    assert Profile.from_dict(rows["stack:+cuda_graphs"]["profile"]) == Profile(
        cfg_batching=True, compile="full", compile_mode="reduce-overhead", real_rope=True, fused_qkv=True,
        gelu_epilogue=True)
    assert not rows["stack:+cuda_graphs"]["kept"]
    # and again on the FP8 stack, where compiled steps idle most
    assert Profile.from_dict(rows["stack:+cuda_graphs_fp8"]["profile"]) == Profile(
        cfg_batching=True, compile="full", compile_mode="reduce-overhead", real_rope=True, fused_qkv=True,
        quantization="fp8_rowwise")
    assert not rows["stack:+cuda_graphs_fp8"]["kept"]
    # torchao's FP8 weights have no GELU epilogue: the FP8 step takes it out again
    assert rows["stack:+fp8_rowwise"]["profile"] == Profile(cfg_batching=True, compile="regional", real_rope=True,
                                                           fused_qkv=True, quantization="fp8_rowwise").to_dict()
    tiers = result.document["tiers"]
    assert tiers["lossless"]["step_ms"] == pytest.approx(475) and tiers["fp8"]["step_ms"] == pytest.approx(369)
    # ratios, TFLOP/s against the 263 TFLOP step, the estimate of a 50-step image
    assert rows["stack:+compile"]["tflops"] == pytest.approx(result.document["flops_per_step"]["total"] / 0.49 / 1e12)
    assert rows["default"]["s_per_image"] == pytest.approx(0.2 + 50 * 0.64)
    on_disk = json.loads(open(result.path_json).read())
    # the default against itself: identical, at quality's finite ceiling (it was infinite, written as null)
    assert on_disk["rows"][0]["psnr_db"] == quality.PSNR_CEILING_DB
    table = open(result.path_md).read()
    assert "| + regional compile | attn=native compile=regional cfg-batch | 490.0 | 1.31x |" in table
    assert "(not kept)" in table and "| lossless |" in table


def test_a_failing_row_is_recorded_and_the_ladder_goes_on(fake_gpu, tmp_path, tiny_workload, monkeypatch):
    real_measure = runner.measure

    def flaky(model, workload, profile, *args, **kwargs):
        if profile.compile != "none":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_measure(model, workload, profile, *args, **kwargs)

    monkeypatch.setattr(runner, "measure", flaky)
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), compile_works=True)
    workload = dataclasses.replace(tiny_workload, model="synthetic", dtype="bfloat16")
    result = bench.run_bench(bench.BenchOptions(workload=workload, timed_steps=4, breakdown=False,
                                                out_dir=str(tmp_path)), capabilities)
    rows = {r["id"]: r for r in result.document["rows"]}
    assert rows["compile:regional"]["failed"].startswith("RuntimeError: CUDA out of memory")
    assert "step_ms" in rows["stack:+cfg_batching"]
    assert "failed: RuntimeError: CUDA out of memory" in open(result.path_md).read()


def test_8bit_attention_is_the_ladders_last_step_never_its_start(fake_gpu, tmp_path, tiny_workload):
    """SageAttention is the fastest kernel alone here, but lossy: the exact stack starts from native, and 8-bit
    attention is tried last, on top of FP8, against the FP8 floor."""
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, compile_works=True,
                                working_attention_backends=("native", "sageattn"))
    workload = dataclasses.replace(tiny_workload, model="synthetic", width=1328, height=1328, reference_steps=50,
                                   dtype="bfloat16")
    result = bench.run_bench(bench.BenchOptions(workload=workload, timed_steps=6, breakdown=False,
                                                out_dir=str(tmp_path)), capabilities)
    rows = {r["id"]: r for r in result.document["rows"]}
    # Above even the exact floor here (40 dB): its lossiness, not its PSNR, keeps it from starting the stack.
    assert rows["attn:sageattn"]["step_ms"] == pytest.approx(580) and rows["attn:sageattn"]["psnr_db"] > 40
    assert result.document["stack_start"] == Profile().to_dict()
    assert list(rows)[-1] == "stack:+sageattn" and rows["stack:+sageattn"]["kept"]
    assert Profile.from_dict(rows["stack:+sageattn"]["profile"]) == Profile(
        attention_backend="sageattn", cfg_batching=True, compile="regional", real_rope=True, fused_qkv=True,
        quantization="fp8_rowwise")
    tiers = result.document["tiers"]
    assert tiers["lossless"]["id"] == "stack:+gelu_epilogue" and tiers["fp8"]["id"] == "stack:+sageattn"


def test_each_stack_step_says_what_it_removed_from_the_step_it_was_tried_on(fake_gpu, tmp_path, tiny_workload,
                                                                            monkeypatch):
    """Breakdowns stand in for the profiler's: compile takes elementwise time out, CFG batching idle time, fused
    q/k/v GEMM time. Each stack row's removed_ms is against the row it was built on, kept or not."""
    def fake_breakdown(model, workload, profile, prompt, seed, step_ms):
        elementwise = 150.0 - (100 if profile.compile != "none" else 0)
        gemm = 300.0 - (2 if profile.fused_qkv else 0) - (110 if profile.quantization != "none" else 0)
        idle = 20.0 - (12 if profile.cfg_batching else 0)
        top = [{"name": "nvjet_sm90_tst_192x192_bias_TNN", "kind": "gemm", "ms": gemm}]
        if profile.gelu_epilogue:
            top.append({"name": "nvjet_sm90_tst_192x192_gelu_bias_TNN", "kind": "gemm", "ms": 1.0})
        elif profile.compile != "none":  # Inductor numbers its kernels: real RoPE's compile numbers this one anew
            top.append({"name": f"triton_poi_fused_gelu_view_{13 if profile.real_rope else 11}",
                        "kind": "elementwise", "ms": 15.3})
        return {"kernel_ms": {"gemm": gemm, "attention": 120.0, "elementwise": elementwise, "memory": 10.0,
                              "other": 5.0}, "idle_ms": idle, "busy_ms": 0.0, "profiled_step_ms": step_ms,
                "source": "fake", "top": top}

    monkeypatch.setattr(bench, "step_breakdown", fake_breakdown)
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, compile_works=True,
                                working_attention_backends=("native",))
    workload = dataclasses.replace(tiny_workload, model="synthetic", width=1328, height=1328, reference_steps=50,
                                   dtype="bfloat16")
    result = bench.run_bench(bench.BenchOptions(workload=workload, timed_steps=6, breakdown=True,
                                                out_dir=str(tmp_path)), capabilities)
    rows = {r["id"]: r for r in result.document["rows"]}
    assert rows["stack:+cfg_batching"]["stack_base"] == "default"
    assert rows["stack:+cfg_batching"]["removed_ms"] == {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0,
                                                         "memory": 0.0, "other": 0.0, "idle": 12.0}
    assert rows["stack:+compile"]["stack_base"] == "stack:+cfg_batching"
    assert rows["stack:+compile"]["removed_ms"]["elementwise"] == 100.0
    assert rows["stack:+fused_qkv"]["removed_ms"]["gemm"] == 2.0
    # max-autotune was dropped: FP8 is tried on the stack before it, and says so
    assert not rows["stack:+max_autotune"]["kept"] and rows["stack:+fp8_rowwise"]["stack_base"] == "stack:+gelu_epilogue"
    assert rows["stack:+fp8_rowwise"]["removed_ms"]["gemm"] == 110.0
    # by name: the GELU kernel the epilogue took away, the cuBLASLt kernel it brought; a renumbered kernel is not
    # a change
    changes = rows["stack:+gelu_epilogue"]["kernel_changes"]
    assert [k["name"] for k in changes["gone"]] == ["triton_poi_fused_gelu_view_13"]
    assert [k["name"] for k in changes["new"]] == ["nvjet_sm90_tst_192x192_gelu_bias_TNN"]
    assert rows["stack:+real_rope"]["kernel_changes"] == {"gone": [], "new": []}
    assert [k["name"] for k in rows["stack:+compile"]["kernel_changes"]["new"]] == ["triton_poi_fused_gelu_view"
                                                                                    "_11"]
    table = open(result.path_md).read()
    assert "| + regional compile | + CFG batching | 0.0 | 0.0 | 100.0 | 0.0 | 0.0 | 0.0 | yes |" in table
    assert ("| + MLP GELU in the GEMM epilogue | `triton_poi_fused_gelu_view_13` 15.3 | "
            "`nvjet_sm90_tst_192x192_gelu_bias_TNN` 1.0 |") in table


def test_rows_are_on_disk_as_they_finish(fake_gpu, tmp_path, tiny_workload, monkeypatch):
    real_measure = runner.measure

    def interrupted(model, workload, profile, *args, **kwargs):
        if profile.cfg_batching:
            raise KeyboardInterrupt
        return real_measure(model, workload, profile, *args, **kwargs)

    monkeypatch.setattr(runner, "measure", interrupted)
    workload = dataclasses.replace(tiny_workload, model="synthetic", dtype="bfloat16")
    options = bench.BenchOptions(workload=workload, timed_steps=4, breakdown=False, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(options, Capabilities(device="cuda", compute_capability=(9, 0), compile_works=False))
    saved = json.loads((tmp_path / "bench-synthetic-128x128.json").read_text())
    assert [r["id"] for r in saved["rows"]] == ["default", "fused_qkv", "gelu_epilogue"]
    assert saved["rows"][0]["step_ms"] > 0


def test_resume_keeps_finished_rows_and_measures_the_rest(fake_gpu, tmp_path, tiny_workload, monkeypatch):
    real_measure = runner.measure
    stop = {"at": "cfg"}

    def interrupted(model, workload, profile, *args, **kwargs):
        if profile.cfg_batching and stop["at"] == "cfg":
            raise KeyboardInterrupt
        return real_measure(model, workload, profile, *args, **kwargs)

    monkeypatch.setattr(runner, "measure", interrupted)
    workload = dataclasses.replace(tiny_workload, model="synthetic", dtype="bfloat16")
    capabilities = Capabilities(device="cuda", compute_capability=(9, 0), compile_works=False)
    options = bench.BenchOptions(workload=workload, timed_steps=4, breakdown=False, out_dir=str(tmp_path),
                                 resume=True)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(options, capabilities)
    stop["at"] = None
    fake_gpu.clear()
    result = bench.run_bench(options, capabilities)
    rows = result.document["rows"]
    assert [r["id"] for r in rows] == ["default", "fused_qkv", "gelu_epilogue", "cfg_batching", "stack:+cfg_batching",
                                       "stack:+fused_qkv", "stack:+gelu_epilogue"]
    assert rows[0]["resumed"] and rows[1]["resumed"] and rows[2]["resumed"] and "resumed" not in rows[3]
    # the default and the two fusion rows were not built again
    assert fake_gpu == [Profile(cfg_batching=True), Profile(cfg_batching=True, fused_qkv=True),
                        Profile(cfg_batching=True, fused_qkv=True, gelu_epilogue=True)]
    assert rows[3]["psnr_db"] > 40  # compared with the default's image the first run stored
    # Another workload does not resume from this file: everything is measured again.
    other = dataclasses.replace(options, workload=dataclasses.replace(workload, true_cfg_scale=3.0))
    fake_gpu.clear()
    assert "resumed" not in bench.run_bench(other, capabilities).document["rows"][0]
    assert fake_gpu[0] == Profile()


def test_bench_on_tiny_measures_rows_and_breaks_a_step_down(tmp_path, tiny_workload):
    options = bench.BenchOptions(workload=tiny_workload, timed_steps=3, rows=("cfg_batching",),
                                 given=(("tf32 off, 3 steps", Profile(steps=3)),), out_dir=str(tmp_path))
    result = bench.run_bench(options, CPU, command="qwendoctor bench --rows cfg_batching")
    rows = {r["id"]: r for r in result.document["rows"]}
    assert list(rows) == ["default", "cfg_batching", "given:tf32 off, 3 steps"]
    assert rows["cfg_batching"]["psnr_db"] > 60  # the same image, up to float32 rounding
    assert rows["given:tf32 off, 3 steps"]["image_steps"] == 3
    for row in rows.values():
        assert row["step_ms"] > 0 and row["timed_steps"] == 3 and row["tflops"] > 0
        breakdown = row["breakdown"]
        assert breakdown["source"] == "CPU aten ops" and breakdown["kernel_ms"]["gemm"] > 0
        assert breakdown["busy_ms"] <= breakdown["profiled_step_ms"] * 1.05
    assert result.document["command"] == "qwendoctor bench --rows cfg_batching"
    assert result.document["gemm_ceiling"] == {"bf16_tflops": None, "fp8_tflops": None}


@pytest.mark.parametrize("args, message", [
    (["--rows", "attn:fa9"], "--rows: unknown row 'attn:fa9'"),
    (["--profile", "compile=fast"], "profile.compile: 'fast' is not one of"),
    (["--profile", "warp=9"], "profile.warp: unknown field"),
    (["--timed-steps", "2"], "--timed-steps must be at least 3"),
    (["--lock", "missing.lock"], "missing.lock"),
    (["--width", "100"], "width must be a positive multiple of 16"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("qwendoctor.cli.probe_capabilities", lambda log=None, workload=None: CPU)
    code, _, err = run_cli(["bench", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "benchmarks").exists()


def test_bench_cli_writes_json_and_table(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("qwendoctor.cli.probe_capabilities", lambda log=None, workload=None: CPU)
    code, out, _ = run_cli(["bench", "--steps", "4", "--timed-steps", "3", "--no-ladder", "--no-breakdown",
                            "--profile", "cfg_batching=true", "--json"], capsys)
    assert code == 0
    document = json.loads(out)
    assert [r["id"] for r in document["rows"]] == ["default", "given:cfg_batching=true"]
    assert document["command"].startswith("qwendoctor bench") or document["command"]
    assert (tmp_path / "benchmarks" / "bench-tiny-128x128.md").read_text().startswith("# qwendoctor bench: tiny")
