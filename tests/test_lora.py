"""LoRAs in the workload and the `lora_mode` lever (issue 27): seeded random LoRAs of tiny, made here with peft and
saved with diffusers' own writer, loaded with diffusers' loader; fused and unfused draw the same image, a hotswap
changes weights without a new graph, a lock records each file's sha256 and generate refuses a changed one, and
every bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.workload import LoRA, WorkloadError
from qwendoctor import fingerprint, levers, lockfile, models, runner
from qwendoctor.errors import UsageError
from qwendoctor.levers import lora
from qwendoctor.profile import Profile, Workload, check_runnable

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2"]
PROMPT = "a small red circle at the top left on a blue background"


def make_lora(directory: Path, rank: int, seed: int, strength: float = 0.01) -> Path:
    """A seeded random LoRA of tiny in diffusers' format (lora_B nonzero, so it changes the image)."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from qwendoctor.tiny.trained import load_trained_tiny

    transformer = load_trained_tiny().transformer
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, strength)
    state = {key: value.detach().clone().contiguous()
             for key, value in get_peft_model_state_dict(transformer).items()}
    directory.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=state,
                                        weight_name=lora.WEIGHT_NAME)
    return directory / lora.WEIGHT_NAME


def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> Path:
    """A safetensors file from names and shapes (float32 zeros), written without torch."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(offset))
    return path


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    files = {"a": make_lora(root / "a", rank=4, seed=0), "b": make_lora(root / "b", rank=2, seed=1),
             "c": make_lora(root / "c", rank=8, seed=2)}
    files["other"] = write_safetensors(root / "other.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": [4, 8],
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": [8, 4]})
    files["full"] = write_safetensors(root / "full.safetensors", {"transformer_blocks.0.attn.to_q.weight": [8, 8]})
    files["text"] = root / "notes.safetensors"
    files["text"].write_text("not a tensor file at all\n")
    return files


def spec(path: Path, scale: float | None = None) -> str:
    return str(path) if scale is None else f"{path}:{scale}"


def workload_with(*loras: LoRA) -> Workload:
    return Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32", loras=loras).validate()


def render(workload: Workload, profile: Profile):
    model = runner.build(workload, profile, _cpu())
    return model, runner.render(model, workload, profile, PROMPT, 0)


def _cpu():
    from qwendoctor.capabilities import detect_capabilities

    return detect_capabilities()


# ---- the file alone -----------------------------------------------------------------------------------------------

def test_a_spec_reads_scale_sha256_and_rank_from_the_file(lora_files):
    entry = lora.parse_spec(spec(lora_files["a"], 0.5), "tiny")
    assert entry.path == str(lora_files["a"].resolve()) and entry.scale == 0.5 and entry.rank == 4
    assert entry.sha256 == lora.file_sha256(str(lora_files["a"]))
    assert lora.parse_spec(spec(lora_files["b"]), "tiny").scale == 1.0


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("text", "not a safetensors file"),
    ("full", "holds no LoRA tensors"),
    ("nan", "the scale must be a finite number >= -10 and <= 10, got nan"),
    ("inf", "the scale must be a finite number >= -10 and <= 10, got inf"),
    ("absurd", "the scale must be a finite number >= -10 and <= 10, got 11.0"),
])
def test_a_bad_lora_file_or_scale_is_one_line(lora_files, case, message):
    given = {"missing": str(lora_files["a"].parent / "nope.safetensors"), "text": str(lora_files["text"]),
             "full": str(lora_files["full"]), "nan": spec(lora_files["a"], "nan"),
             "inf": spec(lora_files["a"], "inf"), "absurd": spec(lora_files["a"], 11)}[case]
    with pytest.raises(UsageError, match=message) as raised:
        lora.parse_spec(given, "tiny")
    assert "\n" not in str(raised.value)


def test_a_header_length_past_the_file_is_not_safetensors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(UsageError, match="not a safetensors file"):
        lora.read_header(str(tmp_path / "x.safetensors"), "--lora x")


def test_keys_of_another_model_are_named_before_the_model_loads(lora_files):
    entry = lora.parse_spec(spec(lora_files["other"]), "tiny")
    with pytest.raises(UsageError, match="made for another model: its key "
                                         "'transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight'"):
        lora.check_keys_match((entry,), "tiny", models.transformer_config("tiny"))
    lora.check_keys_match((lora.parse_spec(spec(lora_files["a"]), "tiny"),), "tiny", models.transformer_config("tiny"))


def test_tiny_names_resolve_to_the_shipped_adapters_and_only_for_tiny(lora_files, tmp_path, monkeypatch):
    shipped = tmp_path / "adapters"
    (shipped / "frame").mkdir(parents=True)
    (shipped / "frame" / lora.WEIGHT_NAME).write_bytes(lora_files["a"].read_bytes())
    (shipped / "distilled").mkdir()
    (shipped / "distilled" / lora.WEIGHT_NAME).write_bytes(lora_files["b"].read_bytes())
    (shipped / "distilled" / lora.METADATA_NAME).write_text(json.dumps({"kind": "distilled", "steps": [4]}))
    monkeypatch.setattr(lora, "builtin_directory", lambda name: str(shipped / name))
    entry = lora.parse_spec("tiny:frame:0.8", "tiny")
    assert (entry.path, entry.scale, entry.rank) == ("tiny:frame", 0.8, 4)
    with pytest.raises(UsageError, match="names an adapter shipped with the tiny model, and the model is synthetic"):
        lora.parse_spec("tiny:frame", "synthetic")
    with pytest.raises(UsageError, match="tiny:nosuch: no such tiny adapter"):
        lora.parse_spec("tiny:nosuch", "tiny")
    with pytest.raises(UsageError, match="is a distilled few-step adapter"):
        lora.parse_spec("tiny:distilled", "tiny")


# ---- the workload and the lock ------------------------------------------------------------------------------------

def test_the_lock_round_trips_the_loras_and_refuses_a_bad_entry(lora_files, tmp_path):
    workload = workload_with(lora.parse_spec(spec(lora_files["a"], 0.7), "tiny"),
                             lora.parse_spec(spec(lora_files["b"], -1.5), "tiny"))
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=workload, profile=Profile(lora_mode="fused"),
                         measured={"latency_median_s": 1.0, "step_ms": 1.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    again = lockfile.read_lock(tmp_path / "q.lock")
    assert again.workload == workload and again.profile.lora_mode == "fused"
    text = (tmp_path / "q.lock").read_text()
    with pytest.raises(lockfile.LockfileError, match=r"workload.loras\[0\].scale must be"):
        lockfile.parse_lock(text.replace("scale = 0.7", "scale = nan"))
    with pytest.raises(WorkloadError, match=r"workload.loras\[0\]: expected a table"):
        Workload.from_dict({**workload.to_dict(), "loras": ["style.safetensors"]})
    with pytest.raises(WorkloadError, match=r"sha256: must be 64"):
        LoRA(path="x", sha256="abc").validate("workload.loras[0]")
    # A lock without LoRAs reads and writes as before: no lora_mode line at its default.
    assert "lora_mode" not in lockfile.Lock(fingerprint=lock.fingerprint, workload=workload_with(),
                                            profile=Profile(), measured=lock.measured).to_toml()


# ---- the lever ----------------------------------------------------------------------------------------------------

def test_fused_and_unfused_draw_the_same_image_and_differ_from_no_lora(lora_files):
    workload = workload_with(lora.parse_spec(spec(lora_files["a"], 0.8), "tiny"),
                             lora.parse_spec(spec(lora_files["b"], 1.2), "tiny"))
    _, plain = render(workload_with(), Profile())
    unfused_model, unfused = render(workload, Profile())
    fused_model, fused = render(workload, Profile(lora_mode="fused"))
    assert np.abs(fused - unfused).max() < 1e-4  # float32 rounding of W + BA against W x + B(A x)
    assert np.abs(unfused - plain).max() > 1e-2
    assert not any("lora" in name for name, _ in fused_model.pipe.transformer.named_modules())
    assert any("lora_A" in name for name, _ in unfused_model.pipe.transformer.named_modules())
    # Applying again is a no-op; unfused can still be fused in place.
    levers.optimize(unfused_model.pipe, Profile(lora_mode="fused"), workload=workload)
    again = runner.render(unfused_model, workload, Profile(), PROMPT, 0)
    assert np.abs(again - fused).max() < 1e-4
    with pytest.raises(UsageError, match="holds fused LoRAs"):
        levers.optimize(fused_model.pipe, Profile(), workload=workload)


def test_without_loras_the_lever_is_inert_and_not_searched():
    from qwendoctor import space

    search = space.build_search_space(_cpu(), workload_with())
    assert search.values("lora_mode") == ("unfused",)
    with_loras = dataclasses.replace(workload_with(), loras=(LoRA(path="/x", sha256="0" * 64, rank=4),))
    assert space.build_search_space(_cpu(), with_loras).values("lora_mode") == ("unfused", "fused")


def test_unfused_refuses_levers_that_replace_the_linears_and_the_sample_fuses_then():
    workload = dataclasses.replace(workload_with(), loras=(LoRA(path="/x", sha256="0" * 64, rank=4),))
    with pytest.raises(UsageError, match="fused_qkv=true replaces; use lora_mode=fused"):
        check_runnable(Profile(fused_qkv=True), workload, _cpu())
    check_runnable(Profile(fused_qkv=True, lora_mode="fused"), workload, _cpu())
    check_runnable(Profile(fused_qkv=True), workload_with(), _cpu())  # no LoRA: nothing to refuse
    context = levers.SpaceContext(_cpu(), workload, False, lambda rule: None)
    offer = lora._lora_offer(context)
    assert lora._lora_sample(None, offer, {"fused_qkv": True}, context) == {"lora_mode": "fused"}


def test_a_hotswap_replaces_the_weights_without_a_new_graph(lora_files):
    from torch._dynamo.testing import CompileCounter

    first = lora.parse_spec(spec(lora_files["a"], 0.7), "tiny")
    second = lora.parse_spec(spec(lora_files["b"], 0.9), "tiny")
    model = models.load_model("tiny", "cpu", "float32")
    workload = workload_with(first)
    levers.optimize(model.pipe, Profile(), workload=workload)
    counter = CompileCounter()
    torch._dynamo.reset()
    model.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=counter)
    runner.render(model, workload, Profile(), PROMPT, 0)
    graphs = counter.frame_count
    assert graphs > 0
    lora.hotswap(model.pipe, (second,), "tiny")
    swapped = runner.render(model, workload_with(second), Profile(), PROMPT, 0)
    assert counter.frame_count == graphs  # no new graph
    _, expected = render(workload_with(second), Profile())
    assert np.abs(swapped - expected).max() < 1e-4
    larger = lora.parse_spec(spec(lora_files["c"]), "tiny")
    with pytest.raises(UsageError, match="rank 8, larger than the rank 4"):
        lora.hotswap(model.pipe, (larger,), "tiny")
    torch._dynamo.reset()


def test_a_lora_of_another_model_is_refused_as_it_loads(lora_files):
    entry = lora.parse_spec(spec(lora_files["other"]), "tiny")
    with pytest.raises(UsageError, match="made for another model: its key 'transformer.single_transformer_blocks"):
        render(workload_with(entry), Profile())


# ---- generate -----------------------------------------------------------------------------------------------------

@pytest.fixture
def lora_lock(lora_files, tmp_path):
    """A lock of tiny with a copy of LoRA a, which the test may change; compiled and unfused (a hotswap lock)."""
    copy = tmp_path / "style.safetensors"
    copy.write_bytes(lora_files["a"].read_bytes())
    workload = workload_with(lora.parse_spec(str(copy), "tiny"))
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=dataclasses.replace(workload, reference_steps=3), profile=Profile(steps=2),
                         measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(tmp_path / "qwendoctor.lock", lock)
    return tmp_path / "qwendoctor.lock", copy


def run_cli(*argv: str) -> int:
    from qwendoctor.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


def test_generate_renders_with_the_locked_lora_and_refuses_a_changed_or_missing_file(lora_lock, tmp_path, capsys):
    lock_path, copy = lora_lock
    assert run_cli("generate", PROMPT, "--lock", str(lock_path), "--out", str(tmp_path / "out")) == 0
    assert len(os.listdir(tmp_path / "out")) == 1
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli("generate", PROMPT, "--lock", str(lock_path), "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert "the file changed since the lock was tuned" in error and error.count("\n") == 1
    copy.unlink()
    assert run_cli("generate", PROMPT, "--lock", str(lock_path), "--out", str(tmp_path / "out")) == 2
    assert "the file is missing" in capsys.readouterr().err
    assert len(os.listdir(tmp_path / "out")) == 1  # nothing written by the refusals


def test_generate_lora_of_a_larger_rank_than_a_compiled_hotswap_lock_is_refused(lora_lock, lora_files, capsys):
    lock_path, _ = lora_lock
    text = lock_path.read_text().replace("[profile]\n", '[profile]\ncompile = "regional"\n', 1)
    lock_path.write_text(text.replace('compile = "none"\n', ""))
    assert run_cli("generate", PROMPT, "--lock", str(lock_path), "--lora", str(lora_files["c"])) == 2
    assert "rank 8 is larger than the rank 4 the lock's compiled LoRA layers hold" in capsys.readouterr().err


# ---- tune ---------------------------------------------------------------------------------------------------------

def test_a_tune_with_a_lora_completes_and_locks_it(lora_files, tmp_path):
    from qwendoctor import quality
    from qwendoctor.tune import TuneOptions, run_tune

    entry = lora.parse_spec(spec(lora_files["a"], 0.8), "tiny")
    workload = dataclasses.replace(workload_with(entry), reference_steps=4)
    options = TuneOptions(workload=workload, prompts=[PROMPT], seeds=[0], floor=quality.parse_floor("balanced"),
                          lock_path=str(tmp_path / "q.lock"), storage=f"sqlite:///{tmp_path / 'study.db'}",
                          trials=4, timed_steps=2)
    result = run_tune(options)
    locked = lockfile.read_lock(tmp_path / "q.lock")
    assert locked.workload.loras == (entry,)
    assert result.lock.workload.loras == (entry,)
    assert all(row["state"] != "failed" for row in result.trials), result.trials
