"""generate, load_pipeline, and the CLI's exit codes and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import qwendoctor
from qwendoctor import cli, generate, lockfile
from qwendoctor.generate import claim_path
from qwendoctor.profile import Profile, Workload


@pytest.fixture
def tiny_lock(tmp_path):
    """A lock for the tiny model on this machine, as tune would write it."""
    from qwendoctor import fingerprint, models

    revision = models.load_model("tiny", "cpu", "float32").revision
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", revision),
                         workload=Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32"),
                         profile=Profile(attention_backend="_native_math", steps=2),
                         measured={"latency_median_s": 0.1, "step_ms": 5.0})
    path = tmp_path / "qwendoctor.lock"
    lockfile.write_lock(path, lock)
    return path


def run_cli(*args, cwd=None):
    """The installed entry point in a fresh process: what a user sees, stdout, stderr and exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd or ".") + "/hf-home"}
    return subprocess.run([sys.executable, "-c", "from qwendoctor.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def test_load_pipeline_returns_the_tuned_pipeline(tiny_lock):
    tuned = qwendoctor.load_pipeline(str(tiny_lock))
    assert tuned.profile == Profile(attention_backend="_native_math", steps=2)
    backends = {getattr(m.processor, "_attention_backend", None) for m in tuned.pipeline.transformer.modules()
                if hasattr(m, "processor")}
    assert {getattr(b, "value", b) for b in backends} == {"_native_math"}
    image = tuned("a lighthouse", seed=1)
    assert image.size == (128, 128)


def test_generate_writes_pngs_with_metadata_and_never_overwrites(tiny_lock, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    reads, checks = [], []
    read_lock, check_fingerprint = lockfile.read_lock, generate.check_fingerprint
    monkeypatch.setattr(lockfile, "read_lock", lambda path: reads.append(path) or read_lock(path))
    monkeypatch.setattr(generate, "check_fingerprint", lambda *a: checks.append(a) or check_fingerprint(*a))
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            cli.main(["generate", "a lighthouse at dusk", "--lock", str(tiny_lock), "--seed", "7",
                      "--num-images", "2", "--out", str(out)])
        assert done.value.code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a-lighthouse-at-dusk-7-1.png", "a-lighthouse-at-dusk-7.png",
                     "a-lighthouse-at-dusk-8-1.png", "a-lighthouse-at-dusk-8.png"]
    info = Image.open(out / "a-lighthouse-at-dusk-8.png").text
    assert info["prompt"] == "a lighthouse at dusk" and info["seed"] == "8" and info["model"] == "tiny"
    assert json.loads(info["profile"]) == {"attention_backend": "_native_math", "compile": "none",
                                           "compile_mode": "default", "quantization": "none", "cache": "none",
                                           "tf32": False, "cfg_batching": False, "real_rope": False,
                                           "steps": 2}
    assert " s" in capsys.readouterr().out  # time per image printed
    assert len(reads) == len(checks) == 2  # the lock is read and checked once per run


def test_generate_on_tiny_says_when_a_prompt_is_outside_what_it_learned(tiny_lock, tmp_path, capsys):
    for prompt, noted in (("a lighthouse at dusk", True),
                          ("a small green square in the center on a white background", False)):
        with pytest.raises(SystemExit) as done:
            cli.main(["generate", prompt, "--lock", str(tiny_lock), "--out", str(tmp_path / "o")])
        assert done.value.code == 0
        err = capsys.readouterr().err
        assert ("qwendoctor: note: tiny draws prompts like 'a large red circle at the top left on a blue "
                "background'" in err) == noted, err


def test_generate_refuses_a_lock_from_another_setup(tiny_lock, tmp_path, capsys):
    lock = lockfile.read_lock(tiny_lock)
    lock.fingerprint["torch"] = "2.5.0"
    lock.fingerprint["gpu_name"] = "NVIDIA H100 80GB HBM3"
    lockfile.write_lock(tiny_lock, lock)
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "x", "--lock", str(tiny_lock), "--out", str(tmp_path / "o")])
    assert done.value.code == 1
    error = capsys.readouterr().err
    assert "gpu_name: lock NVIDIA H100 80GB HBM3, here none" in error and "torch: lock 2.5.0" in error
    assert "--ignore-fingerprint" in error and error.count("\n") == 1
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "x", "--lock", str(tiny_lock), "--out", str(tmp_path / "o"), "--ignore-fingerprint"])
    assert done.value.code == 0


@pytest.mark.parametrize("field, value, message", [
    ("attention_backend", "sageattn", "attention backend 'sageattn' needs a CUDA GPU; this machine runs on the CPU"),
    ("attention_backend", "fa4", "attention backend 'fa4' needs a CUDA GPU; this machine runs on the CPU"),
    ("gelu_epilogue", True, "gelu_epilogue needs a CUDA GPU (cuBLASLt's GELU epilogue); on the CPU torch's fused op "
                            "computes the exact GELU, not the tanh approximation Qwen-Image's MLP uses"),
])
def test_a_lock_asking_for_a_kernel_this_machine_lacks_is_one_line_and_exit_2(tiny_lock, tmp_path, capsys, field,
                                                                               value, message):
    lock = lockfile.read_lock(tiny_lock)
    lock.profile = Profile.from_dict({**lock.profile.to_dict(), field: value})
    lockfile.write_lock(tiny_lock, lock)
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "x", "--lock", str(tiny_lock), "--out", str(tmp_path / "o")])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"qwendoctor: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_claim_path_is_exclusive(tmp_path):
    first, handle = claim_path(str(tmp_path), "img")
    handle.close()
    second, handle = claim_path(str(tmp_path), "img")
    handle.close()
    assert first != second and second.endswith("img-1.png")


def test_help_and_version_exit_0():
    assert run_cli("--help").returncode == 0
    version = run_cli("--version")
    assert version.returncode == 0 and qwendoctor.__version__ in version.stdout


def test_tune_cli_end_to_end_then_generate(tmp_path):
    """The quick start's loop through the real CLI, small: tune writes a lock, generate reads it."""
    tune = run_cli("tune", "--trials", "3", "--steps", "4", "--num-prompts", "1", "--json", cwd=tmp_path)
    assert tune.returncode == 0, tune.stderr
    report = json.loads(tune.stdout)
    assert report["counts"]["trials"] == 3 and report["measured"]["speedup"] > 0
    lockfile.read_lock(tmp_path / "qwendoctor.lock")
    generate = run_cli("generate", "a red fox", "--json", cwd=tmp_path)
    assert generate.returncode == 0, generate.stderr
    written = json.loads(generate.stdout)["images"]
    assert len(written) == 1 and (tmp_path / written[0]["path"]).exists()


def test_warm_up_runs_for_every_profile_and_generate_reports_the_first_image_apart(tiny_lock, monkeypatch):
    """An eager lock's first image paid one-time costs (2.62 s against a 1.39 s warm median on the CPU) that
    generate warmed up only for compiled or quantized profiles."""
    from qwendoctor import generate, runner

    tuned = qwendoctor.load_pipeline(str(tiny_lock))
    rendered = []
    monkeypatch.setattr(runner, "render", lambda model, workload, profile, prompt, seed: rendered.append(profile))
    assert generate.warm_up(tuned) >= 0  # eager, unquantized: warmed up too
    import dataclasses

    compiled = dataclasses.replace(tuned, profile=Profile(compile="regional", steps=3))
    assert generate.warm_up(compiled) >= 0
    assert rendered == [Profile(attention_backend="_native_math", steps=2), Profile(compile="regional", steps=2)]
    assert generate.first_image_extra_s([2.62, 1.48, 1.39, 1.41]) == pytest.approx(2.62 - 1.41)
    assert generate.first_image_extra_s([2.62]) is None


def test_generate_json_gives_the_warm_up_and_the_first_images_extra_cost(tiny_lock, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "a red circle", "--lock", str(tiny_lock), "--num-images", "2", "--out",
                  str(tmp_path / "o"), "--json"])
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["warm_up_s"] >= 0 and isinstance(printed["first_image_extra_s"], float)
    assert len(printed["images"]) == 2


def test_a_lock_is_stale_only_for_the_packages_its_profile_uses(tiny_lock):
    """torchao matters to an FP8 profile, not to a bf16 one: installing the test extras after the quick start must
    not invalidate its lock (and the other way round)."""
    from qwendoctor.errors import QwendoctorError
    from qwendoctor.generate import check_fingerprint

    lock = lockfile.read_lock(tiny_lock)
    lock.fingerprint["torchao"] = "0.1.0"
    lock.fingerprint["attention_packages"] = {"flash-attn-4": "4.0.0b1"}
    lock.fingerprint["cache_dit"] = "0.1"
    check_fingerprint(lock, str(tiny_lock))  # a math-attention bf16 profile uses none of them
    for profile, field in ((Profile(quantization="fp8_rowwise"), "torchao: lock 0.1.0"),
                           (Profile(attention_backend="fa4"), "attention_packages: lock flash-attn-4 4.0.0b1"),
                           (Profile(cache="dbcache", cache_threshold=0.1), "cache_dit: lock 0.1")):
        lock.profile = profile
        with pytest.raises(QwendoctorError, match=field):
            check_fingerprint(lock, str(tiny_lock))


def test_load_pipeline_is_as_quiet_as_the_cli(tiny_lock):
    """No library noise on stderr (torchao's optional extensions, torch's enum deprecations) from the Python API."""
    import subprocess
    import sys

    code = f"import qwendoctor\nqwendoctor.load_pipeline({str(tiny_lock)!r})\nprint('loaded')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr
    assert result.stderr == "", result.stderr
