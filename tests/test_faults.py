"""The fault suite: bad input and injected faults, on the CPU with `tiny`, through the real CLI in a process of its
own as a user meets them (all but six: the plot's full disk, a damaged reference render, the two foreign studies,
a killed writer's temporary file and the race to create a study are injected in-process or on the storage alone).

What is promised, and checked for every case: a bad input ends in one line on stderr (`qwendoctor: error: ...`,
naming what is wrong) and exit 2, never a traceback; a fault ends in a clear one-line error or a correct result,
and loses nothing: a lock is the old one or the new one, never half of one; no image is overwritten or left
truncated; no temporary file outlives the run that recovers; a stopped study resumes with every finished trial
kept and no trial run twice. BAD_INPUTS and FAULTS count what the suite tries; the README states the counts, and
`test_the_readme_states_what_the_suite_tries` keeps the two in step.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from qwendoctor import files, lockfile
from qwendoctor import study as coordination
from qwendoctor.profile import Profile, Workload

ROOT = Path(__file__).resolve().parent.parent
INJECT = str(Path(__file__).resolve().parent / "fault_injection.py")
TIGHT = "a small red circle at the top left on a blue background"
# The smallest tune that still draws, times and renders: every fault below reruns it.
TUNE = ["tune", "--steps", "4", "--num-prompts", "1", "--timed-steps", "2"]

FAULTS: list[str] = []


def fault(*names: str):
    """Register the faults a test injects (its count is the README's)."""
    FAULTS.extend(names)
    return lambda test: test


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, inject: tuple[str, ...] = (),
        preexec=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, with faults from tests/fault_injection.py where `inject` names them."""
    command = ([sys.executable, INJECT, *inject, "--"] if inject
               else [sys.executable, "-c", "from qwendoctor.cli import main; main()"])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=environment, preexec_fn=preexec)


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run's stderr is exactly one `qwendoctor: error:` line containing `fragments`; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("qwendoctor: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_temporaries(*directories: Path) -> None:
    left = [p for d in directories if d.exists() for p in d.rglob("*.tmp")]
    assert not left, left


# ---- bad input -------------------------------------------------------------------------------------------------

# (arguments, message, answered before torch is imported). {tmp} is the test's directory, {lock} a valid tiny lock.
BAD_INPUTS = [
    (["generate", "x", "--lock", "{tmp}/missing.lock"], "no such lock file; run `qwendoctor tune`", True),
    (["generate", "x", "--lock", "{tmp}/garbage.lock"], "not valid TOML", True),
    (["generate", "x", "--lock", "{tmp}/half.lock"], "half.lock", True),
    (["generate", "x", "--lock", "{tmp}/bad-field.lock"], "profile.compile: 'turbo' is not one of", True),
    (["generate", "x", "--lock", "{tmp}"], "Is a directory", True),
    (["generate", "x", "--num-images", "0"], "--num-images must be at least 1", True),
    (["generate", "x", "--out", "{tmp}/garbage.lock"], "garbage.lock: is a file, not a directory", True),
    (["generate", "   "], "the prompt is empty", True),
    (["generate", "a fox", "--seed", "-1"], "--seed must be in 0..18446744073709551615 for 1 image(s)", True),
    (["generate", "a fox", "--seed", "18446744073709551615", "--num-images", "2"],
     "--seed must be in 0..18446744073709551614 for 2 image(s) (each uses seed + its index), got "
     "18446744073709551615", True),
    (["generate", "x", "--lock", "{lock}", "--gpus", "0"], "--gpus must be at least 1, got 0", True),
    (["tune", "--width", "1000"], "width must be a positive multiple of 16, got 1000 (at most 4096)", True),
    (["tune", "--width", "abc"], "Invalid value for '--width'", True),
    (["tune", "--steps", "0"], "steps must be an integer >= 2", True),
    (["tune", "--steps", "-5"], "steps must be an integer >= 2", True),
    (["tune", "--true-cfg-scale", "-1"], "true_cfg_scale must be >= 1", True),
    (["tune", "--model", "no-such-model", "--trials", "1"], "unknown model 'no-such-model'", False),
    (["tune", "--model", "Qwen/Qwen-Image"], "not in the local Hugging Face cache; download it first", False),
    (["tune", "--model", "synthetic"], "needs a CUDA GPU", False),
    (["tune", "--floor", "shiny"], "--floor 'shiny': use one of lossless", True),
    (["tune", "--trials", "0"], "--trials must be at least 1, got 0", True),
    (["tune", "--num-prompts", "0"], "--num-prompts and --seeds must be at least 1", True),
    (["tune", "--seeds", "0"], "--num-prompts and --seeds must be at least 1", True),
    (["tune", "--timeout", "-1"], "--timeout must be a finite number > 0 and <= 2592000 seconds, got -1.0", True),
    (["tune", "--heartbeat", "0"], "Invalid value for '--heartbeat'", True),
    (["tune", "--timed-steps", "1"], "--timed-steps must be an integer >= 2 and <= 1000, got 1", True),
    (["tune", "--prompts", "{tmp}/missing.txt"], "--prompts {tmp}/missing.txt: No such file or directory", False),
    (["tune", "--prompts", "{tmp}/empty.txt"], "no prompts in the file", False),
    (["tune", "--lock", "{tmp}"], "is a directory; name the lock file", True),
    (["tune", "--lock", "{tmp}/garbage.lock/qwendoctor.lock"], "garbage.lock: is a file, not a directory", True),
    (["tune", "--gpus", "0"], "--gpus must be at least 1, got 0", True),
    (["tune", "--gpus", "2", "--storage", "journal:///{tmp}/j.log"],
     "--gpus > 1 measures the multi-GPU strategies in one process", False),
    (["tune", "--storage", "bogus://x"], "--storage bogus://x: Can't load plugin: sqlalchemy.dialects:bogus", True),
    (["tune", "--storage", "nothing-here"], "--storage nothing-here: not a storage URL", True),
    (["tune", "--storage", "sqlite:///"], "--storage sqlite:///: an in-memory SQLite database loses the study", True),
    (["tune", "--storage", "sqlite:///:memory:"], "an in-memory SQLite database loses the study when tune exits",
     True),
    (["tune", "--storage", "journal:///{tmp}/no-such-dir/study.log"], "no-such-dir does not exist", False),
    (["bench", "--height", "8"], "height must be a positive multiple of 16, got 8", True),
    (["bench", "--profile", "compile=turbo"], "profile.compile: 'turbo' is not one of none, regional, full", False),
    (["check", "--only", "nope"], "unknown probe 'nope'", True),
    (["check", "--only", "system", "--width", "16384"], "--width must be at most 4096 (a multiple of 16)", True),
    (["tune", "--memory-limit", "0"], "--memory-limit must be a positive number of GiB, got 0.0", True),
    (["generate", "x", "--lock", "{lock}", "--memory-limit", "-1"],
     "--memory-limit must be a positive number of GiB, got -1.0", True),
    (["bench", "--memory-limit", "nan"], "--memory-limit must be a positive number of GiB, got nan", True),
    (["check", "--memory-limit", "100000"], "--memory-limit 100000: ", True),  # no GPU here, or not that big
    (["tune", "--memory-limit", "100000"], "--memory-limit 100000: ", True),
    (["frobnicate"], "No such command 'frobnicate'", True),
    (["generate", "x", "--lock", "{lock}", "--env", "DIFFUSERS_ATTN_BACKEND=bogus"],
     "DIFFUSERS_ATTN_BACKEND='bogus': diffusers refuses it", False),
    # ---- issue 31: nothing may harm the machine or the user's files --------------------------------------------
    # {tmp}/device is a character device node made for the test (/dev/null's numbers) where this runs as root, a
    # FIFO elsewhere; no real device is ever named.
    (["generate", "x", "--lock", "{tmp}/fifo"], "--lock {tmp}/fifo: is a FIFO, not a regular file", True),
    (["generate", "x", "--lock", "{tmp}/device"], "--lock {tmp}/device: is a ", True),
    (["generate", "x", "--lock", "{tmp}/big.lock"], "big.lock: larger than 1 MiB", True),
    (["tune", "--prompts", "{tmp}/device"], "not a regular file", False),
    (["tune", "--prompts", "{tmp}/fifo"], "--prompts {tmp}/fifo: is a FIFO, not a regular file", False),
    (["tune", "--prompts", "{tmp}/big.lock"], "big.lock: larger than 1 MiB", False),
    (["tune", "--lock", "{tmp}/device"], "qwendoctor only replaces regular files", True),
    (["tune", "--lock", "{tmp}/fifo"], "--lock {tmp}/fifo: is a FIFO; qwendoctor only replaces regular files", True),
    (["tune", "--lock", "{tmp}/link.lock"], "link.lock: is a symbolic link; qwendoctor only replaces", True),
    (["tune", "--lock", "{tmp}/qwendoctor-study.db"], "is the study's own file (the default study database)", True),
    (["tune", "--storage", "sqlite:///{tmp}/s.db", "--lock", "{tmp}/s.db"],
     "is the study's own file (--storage sqlite:///{tmp}/s.db)", True),
    (["tune", "--storage", "journal:///{tmp}/j.log", "--lock", "{tmp}/j.log"], "is the study's own file", True),
    (["generate", "x", "--lock", "{lock}", "--gpus", "9"], "--gpus 9: no GPU here; at most 8 CPU ranks", False),
    (["generate", "x", "--lock", "{tmp}/many-ranks.lock"], "many-ranks.lock: profile.gpus 64: no GPU here; at most 8 CPU ranks",
     False),
    (["tune", "--gpus", "1000000"], "--gpus must be an integer >= 1 and <= 1024, got 1000000", True),
    (["generate", "x", "--lock", "{lock}", "--gpus", "1000000"], "--gpus must be an integer >= 1 and <= 1024", True),
    # ---- every size, count and duration in its range, before any model loads ------------------------------------
    (["tune", "--width", "16384", "--height", "16384"], "width must be at most 4096 (a multiple of 16), got 16384",
     True),
    (["bench", "--height", "8192"], "height must be at most 4096", True),
    (["tune", "--steps", "1000000000"], "steps must be an integer >= 2 and <= 1000", True),
    (["bench", "--steps", "1000000000"], "steps must be an integer >= 2 and <= 1000", True),
    (["generate", "x", "--lock", "{tmp}/huge-steps.lock"], "workload.steps must be an integer >= 2 and <= 1000", True),
    (["generate", "x", "--lock", "{tmp}/huge-profile-steps.lock"], "profile.steps: must be an integer >= 2 and <= 1000",
     True),
    (["generate", "x", "--lock", "{tmp}/huge-width.lock"], "workload.width must be at most 4096", True),
    (["tune", "--true-cfg-scale", "inf"], "true_cfg_scale must be >= 1 and <= 100, a finite number", True),
    (["tune", "--true-cfg-scale", "nan"], "true_cfg_scale must be >= 1 and <= 100, a finite number", True),
    (["generate", "x", "--lock", "{tmp}/inf-cfg.lock"], "workload.true_cfg_scale must be >= 1 and <= 100", True),
    (["generate", "x", "--lock", "{tmp}/nan-cfg.lock"], "got nan", True),
    (["generate", "x", "--lock", "{tmp}/nan-threshold.lock"], "profile.cache_threshold: must be a finite number",
     True),
    (["bench", "--profile", "cache=first_block,cache_threshold=nan"],
     "profile.cache_threshold: must be a finite number, got nan", True),
    (["tune", "--timeout", "nan"], "--timeout must be a finite number > 0", True),
    (["tune", "--timeout", "inf"], "--timeout must be a finite number > 0", True),
    (["tune", "--heartbeat", "10000000000"], "--heartbeat must be an integer >= 1 and <= 86400 seconds", True),
    (["tune", "--trials", "100000000"], "--trials must be an integer >= 1 and <= 100000", True),
    (["tune", "--num-prompts", "100000"], "--num-prompts must be an integer >= 1 and <= 1000", True),
    (["tune", "--seeds", "100000"], "--seeds must be an integer >= 1 and <= 1000", True),
    (["tune", "--timed-steps", "100000"], "--timed-steps must be an integer >= 2 and <= 1000", True),
    (["tune", "--floor", "psnr=nan"], "--floor psnr must be a finite number >= 0 and <= 1000 dB, got nan", True),
    (["generate", "a fox", "--num-images", "100000000000000000000"],
     "--num-images must be an integer >= 1 and <= 10000, got 100000000000000000000", True),
    (["bench", "--timed-steps", "100000"], "--timed-steps must be an integer >= 2 and <= 1000", True),
    # ---- every error names its cause and the option or variable that set it -------------------------------------
    (["tune", "--lock", ""], "--lock is empty; name the lock file", True),
    (["generate", "x", "--lock", ""], "--lock is empty; name the lock file", True),
    (["bench", "--out", "{tmp}/garbage.lock"], "--out {tmp}/garbage.lock: is a file, not a directory", True),
    (["bench", "--name", "../escape"], "--name '../escape': a file stem, without path separators", True),
    (["bench", "--profile", "parallel=cfg,gpus=2"], "bench measures one process on one GPU; gpus=2", True),
    (["tune", "--env", "QWENDOCTOR_CACHE={tmp}/garbage.lock"],
     "QWENDOCTOR_CACHE {tmp}/garbage.lock: is a file, not a directory", True),
    (["bench", "--env", "QWENDOCTOR_CACHE={tmp}/garbage.lock/cache"], "QWENDOCTOR_CACHE {tmp}/garbage.lock/cache: ",
     True),
    (["check", "--only", "system", "--env", "QWENDOCTOR_CHECK_TRACE={tmp}/garbage.lock/trace"],
     "QWENDOCTOR_CHECK_TRACE={tmp}/garbage.lock/trace: Not a directory; unset it", False),
    (["check", "--only", "system", "--env", "QWENDOCTOR_CHECK_TRACE={tmp}/fifo"],
     "QWENDOCTOR_CHECK_TRACE={tmp}/fifo: No such device or address", False),
    # issue 27: LoRA files, told from their safetensors header alone where it can tell.
    (["tune", "--lora", "{tmp}/missing.safetensors"], "--lora {tmp}/missing.safetensors: no such file", True),
    (["tune", "--lora", "{tmp}/garbage.lock"], "garbage.lock: not a safetensors file", True),
    (["tune", "--lora", "{tmp}/full.safetensors"], "full.safetensors: holds no LoRA tensors", True),
    (["tune", "--lora", "{tmp}/rank4.safetensors:nan"], "the scale must be a finite number >= -10 and <= 10, got nan",
     True),
    (["tune", "--lora", "{tmp}/rank4.safetensors:1e9"], "the scale must be a finite number >= -10 and <= 10", True),
    (["tune", "--lora", "tiny:nosuch"], "--lora tiny:nosuch: no such tiny adapter", True),
    (["bench", "--lora", "{tmp}/fifo"], "--lora {tmp}/fifo: not a regular file", False),
    (["tune", "--lora", "{tmp}/other-model.safetensors"],
     "made for another model: its key 'transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight'", False),
    (["generate", "x", "--lock", "{tmp}/lora-changed.lock"], "the file changed since the lock was tuned", False),
    (["generate", "x", "--lock", "{tmp}/lora-missing.lock"], "the file is missing", False),
    (["generate", "x", "--lock", "{tmp}/lora-compiled.lock", "--lora", "{tmp}/rank8.safetensors"],
     "rank 8 is larger than the rank 4 the lock's compiled LoRA layers hold", True),
    # issue 31's campaign run again (2026-12-07): new cases of the same kinds. All were clean but `--width 0`,
    # which ran a whole tune at the default size (`width or default`); now refused like any other width.
    (["tune", "--width", "0"], "width must be a positive multiple of 16, got 0 (at most 4096)", True),
    (["tune", "--height", "0"], "height must be a positive multiple of 16, got 0 (at most 4096)", True),
    (["bench", "--width", "0"], "width must be a positive multiple of 16, got 0 (at most 4096)", True),
    (["bench", "--width", "4112"], "width must be at most 4096 (a multiple of 16), got 4112", True),
    (["check", "--height", "0"], "--height must be a positive multiple of 16, got 0 (at most 4096)", True),
    (["check", "--only", "no-such-probe"], "unknown probe 'no-such-probe'; known: system", True),
    (["tune", "--floor", "ssim=2"], "--floor 'ssim=2': ssim must be in [-1, 1]", True),
    (["tune", "--memory-limit", "nan"], "--memory-limit must be a positive number of GiB, got nan", True),
    (["bench", "--profile", "cache_threshold=nan"], "profile.cache_threshold: must be a finite number, got nan", True),
    (["bench", "--profile", "steps=0"], "profile.steps: must be an integer >= 2, got 0", True),
    (["bench", "--timed-steps", "2"], "--timed-steps must be at least 3 (2 warm up the row), got 2", True),
    (["bench", "--steps", "1"], "steps must be an integer >= 2 and <= 1000 (the scheduler yields NaN at 1), got 1",
     True),
    (["tune", "--steps", "1001"], "steps must be an integer >= 2 and <= 1000", True),
    (["generate", "x", "--num-images", "100000"], "--num-images must be an integer >= 1 and <= 10000, got 100000",
     True),
    (["generate", "x", "--seed", "abc"], "Invalid value for '--seed': 'abc' is not a valid integer", True),
    (["generate", "x", "--parallel", "bogus"], "Invalid value for '--parallel': 'bogus' is not one of", True),
    (["tune", "--num-prompts", "1001"], "--num-prompts must be an integer >= 1 and <= 1000, got 1001", True),
    (["tune", "--trials", "1000000"], "--trials must be an integer >= 1 and <= 100000, got 1000000", True),
    (["tune", "--heartbeat", "100000"], "--heartbeat must be an integer >= 1 and <= 86400 seconds, got 100000",
     True),
    (["tune", "--storage", "mysql://x"], "--storage mysql://x: Failed to import DB access module", False),
    (["bench", "--lock", "{tmp}/fifo"], "--lock {tmp}/fifo: is a FIFO, not a regular file", True),
    # issue 29: input images, masks and strengths, each answered before the model loads (and before torch).
    (["tune", "--task", "img2img", "--image", "{tmp}/missing.png"], "--image {tmp}/missing.png: no such file", True),
    (["tune", "--task", "img2img", "--image", "{tmp}/garbage.lock"],
     "--image {tmp}/garbage.lock: not an image PIL can read", True),
    (["tune", "--task", "img2img", "--image", "{tmp}/truncated.png"],
     "--image {tmp}/truncated.png: a damaged or truncated image", True),
    (["tune", "--task", "img2img", "--image", "{tmp}/fifo"], "--image {tmp}/fifo: is a FIFO, not a regular file", True),
    (["tune", "--task", "img2img", "--image", "{tmp}"], "--image {tmp}: is a directory, not an image file", True),
    (["tune", "--task", "img2img", "--image", "{tmp}/too-wide.png"],
     "--image {tmp}/too-wide.png: each side must be an integer >= 1 and <= 8192 pixels, got 8208", True),
    (["tune", "--task", "img2img", "--strength", "0"], "--strength must be a finite number > 0 and <= 1, got 0.0",
     True),
    (["tune", "--task", "img2img", "--strength", "nan"], "--strength must be a finite number > 0 and <= 1, got nan",
     True),
    (["bench", "--task", "inpaint", "--strength", "1.5"], "--strength must be a finite number > 0 and <= 1, got 1.5",
     True),
    (["tune", "--image", "{tmp}/in.png"], "--image is for --task edit, img2img or inpaint; this is text-to-image",
     True),
    (["tune", "--task", "edit", "--strength", "0.5"], "--strength is for --task img2img or inpaint", True),
    (["tune", "--task", "edit", "--image", "{tmp}/in.png", "--image", "{tmp}/in.png"],
     "--image given 2 times; this model's edit pipeline takes 1 input image", True),
    (["bench", "--task", "img2img", "--image", "{tmp}/in.png", "--image", "{tmp}/in.png"],
     "--task img2img takes one --image, got 2", True),
    (["tune", "--task", "inpaint", "--image", "{tmp}/in.png"], "--task inpaint needs --mask PATH", True),
    (["tune", "--task", "inpaint", "--image", "{tmp}/in.png", "--mask", "{tmp}/small.png"],
     "--mask {tmp}/small.png: 64x64, the image {tmp}/in.png is 128x128; the mask must be the image's size", True),
    (["tune", "--task", "img2img", "--image", "{tmp}/in.png", "--mask", "{tmp}/in.png"],
     "--mask is for --task inpaint; this is image-to-image", True),
    (["generate", "x", "--lock", "{lock}", "--image", "{tmp}/in.png"],
     "--image: {lock} is a text-to-image lock (task generate), which takes no input image", True),
    (["generate", "x", "--lock", "{tmp}/img2img.lock", "--task", "edit", "--image", "{tmp}/in.png"],
     "{tmp}/img2img.lock was tuned for image-to-image (task img2img), not --task edit", True),
    (["generate", "x", "--lock", "{tmp}/img2img.lock", "--image", "{tmp}/small.png"],
     "--image {tmp}/small.png: 64x64, {tmp}/img2img.lock was tuned for inputs of 128x128", True),
    (["generate", "x", "--lock", "{tmp}/img2img.lock"],
     "{tmp}/img2img.lock is for image-to-image (task img2img): give the input with --image PATH", True),
    (["generate", "x", "--lock", "{tmp}/img2img.lock", "--image", "{tmp}/truncated.png"],
     "a damaged or truncated image", True),
    (["generate", "x", "--lock", "{tmp}/img2img.lock", "--image", "{tmp}/in.png", "--strength", "inf"],
     "--strength must be a finite number > 0 and <= 1, got inf", True),
    (["generate", "x", "--lock", "{tmp}/inpaint.lock", "--image", "{tmp}/in.png", "--mask", "{tmp}/small.png"],
     "the mask must be the image's size", True),
    (["generate", "x", "--lock", "{tmp}/bad-strength.lock", "--image", "{tmp}/in.png"],
     "workload.strength: must be a finite number > 0 and <= 1, got 2.0", True),
    (["generate", "x", "--lock", "{tmp}/bad-task.lock"], "workload.task: 'paint' is not one of", True),
    (["generate", "x", "--lock", "{tmp}/sizes-without-task.lock"],
     "workload: input images given to a text-to-image workload (task generate)", True),
]

# All the bad inputs in one process, in order (a process per case cost two minutes of imports on two cores): those
# answered before torch first, each recording whether torch had been imported when it returned; then the rest,
# the DIFFUSERS_ATTN_BACKEND case before anything imports diffusers' models.
BATCH_DRIVER = """
import contextlib, io, json, os, sys
from qwendoctor.cli import main
results = []
for case in json.load(open(sys.argv[1])):
    os.environ.update(case["env"])
    stderr = io.StringIO()
    code = None
    with contextlib.redirect_stderr(stderr):
        try:
            main(case["argv"])
        except SystemExit as done:
            code = done.code
    for name in case["env"]:
        del os.environ[name]
    if case["env"]:
        # A refused DIFFUSERS_ATTN_BACKEND leaves diffusers half-imported: later cases import it afresh, as their
        # own process would.
        for module in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
            del sys.modules[module]
    results.append({"code": code, "stderr": stderr.getvalue(), "torch": "torch" in sys.modules})
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory):
    """Files the bad inputs name: garbage, half a lock, a lock with a bad field, a valid lock, an empty prompt file."""
    from qwendoctor import fingerprint, models

    directory = tmp_path_factory.mktemp("bad-input")
    revision = models.builtin_revision("tiny")
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", revision),
                         workload=Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32"),
                         profile=Profile(steps=2), measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(directory / "valid.lock", lock)
    text = (directory / "valid.lock").read_text()
    (directory / "garbage.lock").write_text("[[[ not toml")
    (directory / "half.lock").write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")
    (directory / "bad-field.lock").write_text(text.replace('compile = "none"', 'compile = "turbo"'))
    (directory / "empty.txt").write_text("\n \n")
    # issue 31: what a hostile user names, every one made here, none a real device.
    os.mkfifo(directory / "fifo")
    try:
        os.mknod(directory / "device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        os.mkfifo(directory / "device")
    (directory / "link.lock").symlink_to(directory / "valid.lock")
    (directory / "big.lock").write_text(text + "#" * (1 << 20))
    for name, old, new in (("huge-steps", "reference_steps = 3", "reference_steps = 1000000000"),
                           ("huge-profile-steps", "steps = 2\n", "steps = 1000000000\n"),
                           ("huge-width", "width = 128", "width = 16384"),
                           ("inf-cfg", "true_cfg_scale = 4.0", "true_cfg_scale = inf"),
                           ("nan-cfg", "true_cfg_scale = 4.0", "true_cfg_scale = nan"),
                           ("nan-threshold", 'cache = "none"', 'cache = "first_block"\ncache_threshold = nan'),
                           ("many-ranks", 'cache = "none"', 'cache = "none"\nparallel = "ulysses"\ngpus = 64')):
        assert old in text, old
        (directory / f"{name}.lock").write_text(text.replace(old, new, 1))
    _lora_inputs(directory, lock)
    _image_inputs(directory, lock)
    return directory


def _image_inputs(directory: Path, lock: lockfile.Lock) -> None:
    """Input images (one of the locks' size, a smaller one, one cut short, one too wide) and locks of image-to-image
    and inpainting, one with a strength out of range, one of no known task, one with inputs and no task."""
    import dataclasses

    from PIL import Image

    Image.new("RGB", (128, 128), (200, 40, 40)).save(directory / "in.png")
    Image.new("L", (64, 64), 255).save(directory / "small.png")
    Image.new("RGB", (8208, 1)).save(directory / "too-wide.png")
    whole = (directory / "in.png").read_bytes()
    (directory / "truncated.png").write_bytes(whole[: len(whole) // 2])
    for task in ("img2img", "inpaint"):
        lockfile.write_lock(directory / f"{task}.lock", dataclasses.replace(lock, workload=dataclasses.replace(
            lock.workload, task=task, input_sizes=((128, 128),), strength=0.6)))
    text = (directory / "img2img.lock").read_text()
    for name, old, new in (("bad-strength", "strength = 0.6", "strength = 2.0"),
                           ("bad-task", 'task = "img2img"', 'task = "paint"'),
                           ("sizes-without-task", 'task = "img2img"\n', "")):
        assert old in text, old
        (directory / f"{name}.lock").write_text(text.replace(old, new, 1))


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file of float32 zeros: a LoRA's header is all the checks read."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * shape[0] * shape[1]]}
        offset = header[name]["data_offsets"][1]
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(offset))
    return path


def _lora_inputs(directory: Path, lock: lockfile.Lock) -> None:
    """LoRA files of rank 4 and 8, one of another model, a full checkpoint, and locks whose LoRA changed, went
    missing, or is held unfused under compile (a hotswap lock)."""
    import dataclasses

    from qwendoctor.levers import lora

    def of_rank(rank: int) -> dict[str, list[int]]:
        return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": [rank, 64],
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": [64, rank]}

    rank4 = _safetensors(directory / "rank4.safetensors", of_rank(4))
    _safetensors(directory / "rank8.safetensors", of_rank(8))
    _safetensors(directory / "other-model.safetensors",
                 {key.replace("transformer_blocks", "single_transformer_blocks"): shape
                  for key, shape in of_rank(4).items()})
    _safetensors(directory / "full.safetensors", {"transformer_blocks.0.attn.to_q.weight": [64, 64]})
    entry = lora.parse_spec(str(rank4), "tiny")
    for name, loras, profile in (
            ("lora-changed", (dataclasses.replace(entry, sha256="0" * 64),), lock.profile),
            ("lora-missing", (dataclasses.replace(entry, path=str(directory / "gone.safetensors")),), lock.profile),
            ("lora-compiled", (entry,), dataclasses.replace(lock.profile, compile="regional"))):
        lockfile.write_lock(directory / f"{name}.lock", dataclasses.replace(
            lock, workload=dataclasses.replace(lock.workload, loras=loras), profile=profile))


def _filled(text: str, directory: Path) -> str:
    return text.replace("{tmp}", str(directory)).replace("{lock}", str(directory / "valid.lock"))


@pytest.fixture(scope="module")
def bad_input_results(bad_input_dir):
    """Each bad input's exit code, stderr and whether torch was imported by then, by its index in BAD_INPUTS."""
    cases = []
    for index, (args, _, before_torch) in enumerate(BAD_INPUTS):
        argv, env = [_filled(a, bad_input_dir) for a in args], {}
        if "--env" in argv:
            at = argv.index("--env")
            name, value = argv[at + 1].split("=", 1)
            env[name] = value
            del argv[at:at + 2]
        cases.append((0 if before_torch else 1 if env else 2, index, {"argv": argv, "env": env}))
    cases.sort(key=lambda case: case[:2])
    (bad_input_dir / "cases.json").write_text(json.dumps([case for _, _, case in cases]))
    done = subprocess.run([sys.executable, "-c", BATCH_DRIVER, str(bad_input_dir / "cases.json"),
                           str(bad_input_dir / "results.json")], capture_output=True, text=True, timeout=600,
                          cwd=bad_input_dir, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                  "HF_HOME": str(bad_input_dir / "hf")})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((bad_input_dir / "results.json").read_text())
    return {index: result for (_, index, _), result in zip(cases, results)}


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[" ".join(a[:3]) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(bad_input_dir, bad_input_results, index):
    """One line naming the problem, exit 2, no traceback; where it can be, answered before torch is imported
    (seconds on a small machine)."""
    _, message, before_torch = BAD_INPUTS[index]
    result = bad_input_results[index]
    assert result["code"] == 2, result
    if before_torch:
        assert not result["torch"], "torch was imported to answer it"
    one_error_line(subprocess.CompletedProcess([], 2, "", result["stderr"]), _filled(message, bad_input_dir))


# ---- faults: kills at each phase of tune -----------------------------------------------------------------------

KILL_PHASES = [
    ("probing", "qwendoctor.tune:probe_capabilities:KILL"),
    ("the reference render", "qwendoctor.runner:measure:KILL"),
    ("a trial's timed steps", "qwendoctor.runner:time_steps:KILL"),  # the default trial is not timed: the next is
    ("the lock's write", "os:fsync:KILL"),  # tune fsyncs only the lock, after its temporary file is written
]


def _tune_lock(directory: Path) -> lockfile.Lock:
    return lockfile.read_lock(directory / "qwendoctor.lock")


def _study(directory: Path, lock: lockfile.Lock) -> optuna.Study:
    return optuna.load_study(study_name=lock.study["name"], storage=f"sqlite:///{directory}/qwendoctor-study.db")


@fault(*(f"kill -9 during {phase}" for phase, _ in KILL_PHASES))
def test_kill_at_each_phase_of_tune_loses_nothing(tmp_path):
    """kill -9 in each phase, then the same command again: it finishes with exactly --trials trials, says how many
    it will run and runs that many, keeps the previous lock until the new one is whole, leaves no temporary file."""
    env = {"QWENDOCTOR_CACHE": str(tmp_path / "cache")}
    for phase, spec in KILL_PHASES[:3]:
        killed = cli(*TUNE, "--trials", "2", cwd=tmp_path, env=env, inject=(spec,))
        assert killed.returncode == -signal.SIGKILL, (phase, killed.stderr[-2000:])
        assert not (tmp_path / "qwendoctor.lock").exists(), phase
    resumed = cli(*TUNE, "--trials", "2", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The trial killed mid-measure is queued again at once (its process is gone), and counted in what is announced.
    announced = re.search(r"(\d+) trial\(s\) done, (\d+) to run", resumed.stderr)
    assert announced and int(announced.group(2)) == len(re.findall(r"^qwendoctor: trial \d+/2:", resumed.stderr,
                                                                   re.M)), resumed.stderr
    first = _tune_lock(tmp_path)
    assert first.study["trials"] == 2

    killed = cli(*TUNE, "--trials", "3", cwd=tmp_path, env=env, inject=(KILL_PHASES[3][1],))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _tune_lock(tmp_path) == first  # the old lock, whole
    assert list(tmp_path.glob(".qwendoctor~*.lock.tmp")), "the kill was meant to land mid-write"
    resumed = cli(*TUNE, "--trials", "3", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _tune_lock(tmp_path).study["trials"] == 3
    no_temporaries(tmp_path)
    trials = _study(tmp_path, _tune_lock(tmp_path)).trials
    profiles = [json.dumps(t.user_attrs["profile"], sort_keys=True) for t in trials
                if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(profiles) == len(set(profiles)), "a finished trial was measured twice"


@fault("SIGTERM mid-trial", "Ctrl-C (SIGINT) mid-trial")
def test_sigterm_and_ctrl_c_mid_trial_stop_cleanly_and_resume(tmp_path):
    env = {"QWENDOCTOR_CACHE": str(tmp_path / "cache")}
    # The second trial of the first run, then (the third trial of the second) the retry of that very trial.
    for spec, code, word in (("qwendoctor.runner:time_steps:TERM", 143, "terminated"),
                             ("qwendoctor.runner:time_steps:INT", 130, "interrupted")):
        stopped = cli(*TUNE, "--trials", "3", cwd=tmp_path, env=env, inject=(spec,))
        assert stopped.returncode == code, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr and "[W " not in stopped.stderr, stopped.stderr
        last = [line for line in stopped.stderr.splitlines() if line.strip()][-1]
        assert last == f"qwendoctor: {word}; a tune resumes where it stopped when rerun"
    resumed = cli(*TUNE, "--trials", "3", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    announced = re.search(r"(\d+) trial\(s\) done, (\d+) to run", resumed.stderr)
    assert announced and announced.groups() == ("1", "2"), resumed.stderr  # the default, then retry + one new
    study = _study(tmp_path, _tune_lock(tmp_path))
    stopped_trials = [t for t in study.trials if t.user_attrs.get("failure") == coordination.INTERRUPTED]
    assert len(stopped_trials) == 2, [t.user_attrs for t in study.trials]
    assert _tune_lock(tmp_path).study["trials"] == 3
    no_temporaries(tmp_path)


# ---- faults: studies and storage -------------------------------------------------------------------------------

@fault("four workers at a time opening a new study file")
def test_two_tunes_started_together_on_a_new_study_file_both_finish(tmp_path):
    """Both processes race to create Optuna's tables in one new SQLite file; the loser retries instead of dying
    with "table ... already exists"."""
    from qwendoctor import storage

    workers = [subprocess.Popen([sys.executable, "-c", (
        "import sys, time, optuna\nfrom qwendoctor import storage\n"
        "s = storage.open_storage(sys.argv[1], 30)\n"
        "optuna.create_study(storage=s, study_name='race', load_if_exists=True)\nprint('ok')\n"),
        f"sqlite:///{tmp_path}/study-{attempt}.db"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for attempt in range(3) for _ in range(4)]
    outcomes = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 and out.strip() == "ok" for w, (out, _) in zip(workers, outcomes)), outcomes
    assert storage.lost_creation_race(sqlite3.OperationalError("table version_info already exists"))


@fault("a study of the same name made to maximize", "a study of the same name with trials qwendoctor did not write")
def test_a_foreign_study_under_the_same_name_is_refused_and_left_untouched(tmp_path):
    """In-process (the refusal is a UsageError, which the CLI prints in one line with exit 2, as every bad input
    above shows): a CLI run per variant would cost its probing for no more coverage."""
    from qwendoctor import tune

    name = _tune_in_process(tmp_path).lock.study["name"]
    for variant, expected in (("maximize", "to maximize, not to minimize"),
                              ("foreign trials", "with trials qwendoctor did not record")):
        url = f"sqlite:///{tmp_path}/{variant.replace(' ', '-')}.db"
        other = optuna.create_study(study_name=name, storage=url,
                                    direction="maximize" if variant == "maximize" else "minimize")
        other.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        with pytest.raises(tune.UsageError) as refused:
            _tune_in_process(tmp_path, storage=url, lock_name="other.lock")
        message = str(refused.value)
        assert "\n" not in message and expected in message and "optuna delete-study" in message, message
        assert len(optuna.load_study(study_name=name, storage=url).trials) == 2  # nothing written into it
        assert not (tmp_path / "other.lock").exists()


@fault("a study file that is not a database")
def test_a_corrupt_study_file_is_one_line_and_the_lock_survives(tmp_path):
    env = {"QWENDOCTOR_CACHE": str(tmp_path / "cache")}
    (tmp_path / "qwendoctor.lock").write_text("kept")
    (tmp_path / "qwendoctor-study.db").write_bytes(b"\x00not a database" * 100)
    refused = cli(*TUNE, "--trials", "1", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    # No --storage was given: the error names the default study file, not an option the user never typed.
    line = one_error_line(refused, f"the study database {tmp_path}/qwendoctor-study.db (the default beside --lock",
                          "file is not a database")
    assert "--storage sqlite" not in line
    assert (tmp_path / "qwendoctor.lock").read_text() == "kept"


# ---- faults: caches --------------------------------------------------------------------------------------------

def _tune_in_process(directory: Path, trials: int = 1, log=None, storage: str | None = None,
                     lock_name: str = "q.lock"):
    """tune's own function with the machine's findings given (probing is the CLI cases' job): seconds, not tens."""
    from qwendoctor import tune
    from qwendoctor.profile import Capabilities

    options = tune.TuneOptions(
        workload=Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32").validate(),
        prompts=[TIGHT], seeds=[0], floor=tune.quality.parse_floor("balanced"), lock_path=str(directory / lock_name),
        storage=storage or f"sqlite:///{directory}/study.db", trials=trials, timed_steps=2,
        cache_dir=str(directory / "cache"))
    return tune.run_tune(options, capabilities=Capabilities(device="cpu", working_attention_backends=("native",)),
                         log=log or (lambda line: None))


@fault("a truncated reference render in the cache", "a bit-flipped reference render in the cache")
def test_a_damaged_reference_cache_is_rendered_again(tmp_path):
    _tune_in_process(tmp_path)
    (cached,) = (tmp_path / "cache").glob("reference-*.npz")
    whole = cached.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:-200] + bytes(b ^ 0xFF for b in whole[-200:])):
        cached.write_bytes(damaged)
        logged = []
        _tune_in_process(tmp_path, log=logged.append)
        assert any("not usable" in line and "rendering them again" in line for line in logged), logged
        assert cached.read_bytes() != damaged
    no_temporaries(tmp_path)


# ---- faults: disks ---------------------------------------------------------------------------------------------

def _file_size_limit(limit: int):
    """A real write failure without root: RLIMIT_FSIZE makes writes past `limit` bytes fail (EFBIG), as a full
    disk or a quota would, at the same calls."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def valid_lock(tmp_path):
    from qwendoctor import fingerprint, models

    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", models.builtin_revision("tiny")),
                         workload=Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32"),
                         profile=Profile(steps=2), measured={"latency_median_s": 0.1, "step_ms": 5.0})
    lockfile.write_lock(tmp_path / "qwendoctor.lock", lock)
    return tmp_path / "qwendoctor.lock"


@fault("disk full while writing an image")
def test_a_full_disk_while_writing_an_image_leaves_no_truncated_png(tmp_path, valid_lock):
    out = tmp_path / "out"
    full = cli("generate", TIGHT, "--num-images", "2", "--out", str(out), cwd=tmp_path,
               preexec=_file_size_limit(2048))
    assert full.returncode == 1
    one_error_line(full, f"writing {out}/", "File too large", "nothing kept of it (0 image(s) written before it)")
    assert not list(out.iterdir())  # no PNG, no temporary file


@fault("kill -9 while writing an image")
def test_a_kill_while_writing_an_image_leaves_no_png_and_the_next_run_cleans_up(tmp_path, valid_lock):
    out = tmp_path / "out"
    killed = cli("generate", TIGHT, "--out", str(out), cwd=tmp_path, inject=("os:fsync:KILL",))
    assert killed.returncode == -signal.SIGKILL
    assert not list(out.glob("*.png")) and len(list(out.glob("*.tmp"))) == 1
    again = cli("generate", TIGHT, "--out", str(out), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in out.iterdir()] == [Path(json.loads(again.stdout)["images"][0]["path"]).name]


@fault("disk full while writing the plot")
def test_a_full_disk_while_writing_the_plot_keeps_the_new_lock_and_exit_0(tmp_path, monkeypatch):
    """The plot is written after the lock: the run did its job, so it returns (the CLI exits 0) and says the plot is
    missing."""
    from qwendoctor import plot

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(plot, "write_tune_plot", no_space)
    logged = []
    result = _tune_in_process(tmp_path, log=logged.append)
    assert result.plot_path is None and lockfile.read_lock(tmp_path / "q.lock") == result.lock
    assert any(line.startswith("plot not written: ") and "No space left on device" in line for line in logged)


@fault("a temporary file of a killed writer beside the lock")
def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    import socket

    dead_pid = 2**22 + 12345  # above the default pid_max: no process has it
    host = socket.gethostname()
    dead = tmp_path / f".qwendoctor~{dead_pid}~{host}~abc.lock.tmp"
    live = tmp_path / f".qwendoctor~{os.getpid()}~{host}~def.lock.tmp"
    other_host = tmp_path / f".qwendoctor~{dead_pid}~another-host~ghi.lock.tmp"
    for path in (dead, live, other_host):
        path.write_text("partial")
    files.write_text_atomic(tmp_path / "qwendoctor.lock", "new")
    assert not dead.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "qwendoctor.lock").read_text() == "new"
    assert oct((tmp_path / "qwendoctor.lock").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- faults: a broken install -----------------------------------------------------------------------------------

def _shadow(directory: Path, package: str, source: str) -> dict[str, str]:
    """A package of `package`'s name ahead of the installed one on the path: a broken install, made on purpose."""
    (directory / package).mkdir(parents=True)
    (directory / package / "__init__.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)])}


@fault("a package whose dependency is not installed")
def test_check_names_a_missing_dependency_and_blocks_the_probe_that_needs_it(tmp_path):
    """diffusers importing a module nobody installed (as huggingface_hub 2.x without httpx2): `imports` fails with
    the module's name and the pip command; `attention_backends` is a skip pointing there, not a crash."""
    env = _shadow(tmp_path / "site", "diffusers", "import qwendoctor_test_missing_dependency\n")
    result = cli("check", "--only", "imports", "--only", "attention_backends", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(r"\[.\] imports: diffusers does not import: no module named "
                     r"'qwendoctor_test_missing_dependency'", result.stdout), result.stdout
    assert "fix: python -m pip install qwendoctor-test-missing-dependency" in result.stdout
    assert re.search(r"attention_backends: blocked: .*\(see imports\)", result.stdout), result.stdout


@fault("an import that hangs")
def test_check_reports_an_import_that_hangs_and_finishes(tmp_path):
    """optuna's import never returning: `check` still ends, saying which import hangs and where. The limit (60 s per
    package) is cut to 20 s here, still well above what the other imports take on a loaded two-core machine."""
    env = _shadow(tmp_path / "site", "optuna", "import time\ntime.sleep(3600)\n")
    result = cli("check", "--only", "imports", cwd=tmp_path, env=env, inject=("probes.imports:IMPORT_TIMEOUT_S=20",),
                 timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"imports: importing optuna hangs: no answer within the limit of 20 s, stuck at "
                     r".*optuna/__init__.py:2", result.stdout), result.stdout
    assert "transformers hangs" not in result.stdout and "diffusers hangs" not in result.stdout


# ---- faults: hostile environments (issue 31) --------------------------------------------------------------------

def _launcher_env(tmp_path: Path) -> dict[str, str]:
    """The launcher's and its ranks' environment: the repository importable (the ranks run tests' modules), the
    system temporary folder replaced by one of the test's own, to see what is left in it."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _left_in_temp(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").iterdir()
                  if p.name.startswith(("qwendoctor-ranks-", "torchelastic_")))


def _wait_for(condition, limit_s: float = 180) -> bool:
    """Poll `condition` until it holds or `limit_s` passes (a bound on a hang, not a timing assertion)."""
    import time

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@fault("kill -9 of the launcher while its ranks run", "the temporary folder of a launcher killed outright")
def test_ranks_die_with_a_killed_launcher_and_its_folder_goes_with_the_next_launch(tmp_path, monkeypatch):
    """A launcher killed outright (the OOM killer, kill -9) can clean nothing up: torchrun dies with it and the
    ranks with torchrun (PR_SET_PDEATHSIG), and the next launch removes the folder it left."""
    import psutil

    from qwendoctor import parallel

    pids = tmp_path / "pids"
    pids.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom qwendoctor import parallel\n"
         "parallel.launch(2, ['tests.hostile_ranks', 'sleep', sys.argv[1]])", str(pids)],
        cwd=ROOT, env=_launcher_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: len(list(pids.glob("*.pid"))) == 2 or launcher.poll() is not None)
        assert launcher.poll() is None, "the launcher ended before its ranks started"
        ranks = [int(p.read_text()) for p in pids.glob("*.pid")]
    finally:
        launcher.kill()
        launcher.wait()

    def ours_gone() -> bool:  # torchrun and the ranks both carry the pid folder in their command lines
        alive = []
        for process in psutil.process_iter(["cmdline", "status"]):
            if str(pids) in " ".join(process.info["cmdline"] or []) and process.info["status"] != "zombie":
                alive.append(process.pid)
        return not alive

    assert _wait_for(ours_gone, 60), "ranks or torchrun outlived their launcher"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in ranks)
    assert [name.startswith("qwendoctor-ranks-") for name in _left_in_temp(tmp_path)] == [True]
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    assert len(parallel.remove_stale_scratch()) == 1 and _left_in_temp(tmp_path) == []


@fault("the logs of a multi-rank run", "a QWENDOCTOR_DIST_TIMEOUT_S that is not a number")
def test_a_multi_rank_run_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
    """torchrun writes a log tree per run into the system temporary folder unless told otherwise (a million of
    them filled 3.9 GB): the launcher keeps them in its own folder and removes it, failing ranks or not."""
    from qwendoctor import parallel
    from qwendoctor.errors import QwendoctorError

    for name, value in _launcher_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(QwendoctorError) as refused:  # named before any rank starts
        parallel.launch(2, ["tests.parallel_ranks", "fail"])
    assert str(refused.value).startswith("QWENDOCTOR_DIST_TIMEOUT_S='soon': must be a number of seconds")
    monkeypatch.delenv(parallel.TIMEOUT_ENV)
    with pytest.raises(QwendoctorError) as failed:
        parallel.launch(2, ["tests.parallel_ranks", "fail"])
    assert str(failed.value) == "rank 1: rank one gave up on purpose"
    assert _left_in_temp(tmp_path) == []


@fault("RANK=1, WORLD_SIZE=2 and LOCAL_RANK=1 left in the environment")
def test_stray_rank_variables_do_not_silence_generate(tmp_path, valid_lock, monkeypatch, capsys):
    """Cluster nodes often export these: only ranks our own launcher started are ranks (it sets its marker)."""
    from qwendoctor import cli as cli_module

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli_module.main(["generate", TIGHT, "--lock", str(valid_lock), "--out", str(tmp_path / "out")])
    assert done.value.code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _stopped_generate(tmp_path, valid_lock, monkeypatch, capsys, stop: BaseException) -> tuple[int, str]:
    from qwendoctor import cli as cli_module
    from qwendoctor import generate

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(generate, "build_tuned", stopped)  # as if the signal came while loading
    with pytest.raises(SystemExit) as done:
        cli_module.main(["generate", TIGHT, "--lock", str(valid_lock), "--out", str(tmp_path / "out")])
    return done.value.code, capsys.readouterr().err.strip()  # click writes a newline of its own first


@fault("Ctrl-C in generate", "SIGTERM in generate")
def test_an_interrupted_generate_does_not_promise_to_resume(tmp_path, valid_lock, monkeypatch, capsys):
    from qwendoctor import cli as cli_module

    assert _stopped_generate(tmp_path, valid_lock, monkeypatch, capsys, KeyboardInterrupt()) == (
        130, "qwendoctor: interrupted")
    assert _stopped_generate(tmp_path, valid_lock, monkeypatch, capsys, cli_module.Terminated()) == (
        143, "qwendoctor: terminated")


@fault("a bench row that fails after it was timed")
def test_a_bench_row_failing_after_its_timing_is_reported_as_that_failure(tmp_path, monkeypatch, capsys):
    """The given row's comparison fails after its steps were timed: the row says why, the report is written (it
    crashed with KeyError: 'psnr_db', hiding the error)."""
    from qwendoctor import bench, cli as cli_module

    real = bench.quality.compare
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the comparison broke on purpose")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.quality, "compare", second_fails)
    monkeypatch.setenv("QWENDOCTOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as done:
        cli_module.main(["bench", "--no-ladder", "--no-breakdown", "--timed-steps", "3", "--steps", "4",
                         "--profile", "steps=3", "--out", str(tmp_path / "b"), "--json"])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err
    rows = json.loads(captured.out)["rows"]
    assert rows[1]["failed"].endswith("the comparison broke on purpose") and "step_ms" not in rows[1]
    assert "the comparison broke on purpose" in (tmp_path / "b" / "bench-tiny-128x128.md").read_text()


@fault("a --timeout that ends the study before any trial")
def test_a_timeout_before_any_trial_is_named_not_the_floor(tmp_path, monkeypatch):
    from qwendoctor import tune

    real = tune.TuneOptions.validate

    def tiny_timeout(options):
        options.timeout_s = 1e-9
        return real(options)

    monkeypatch.setattr(tune.TuneOptions, "validate", tiny_timeout)
    with pytest.raises(tune.QwendoctorError) as stopped:
        _tune_in_process(tmp_path)
    assert str(stopped.value).startswith("--timeout 1e-09: the time ran out before any trial finished")
    assert "floor" not in str(stopped.value)


@fault("a tune whose lock goes into a folder that does not exist yet")
def test_a_lock_in_a_new_folder_gets_its_default_study_beside_it(tmp_path, monkeypatch):
    """The default study sits beside the lock; its folder is made before the study opens (the error used to
    blame --storage, which the user never gave)."""
    from qwendoctor import cli as cli_module
    from qwendoctor import report, storage

    opened = []

    def open_only(options, as_json):
        storage.open_storage(options.storage, 60)
        opened.append(options.storage)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run_tune_with_progress", open_only)
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "new" / "folder" / "q.lock"
    with pytest.raises(SystemExit) as done:
        cli_module.main(["tune", "--lock", str(lock)])
    assert done.value.code == 130
    assert opened == [f"sqlite:///{lock.parent}/qwendoctor-study.db"] and (lock.parent / "qwendoctor-study.db").exists()


@fault("a DIFFUSERS_ATTN_BACKEND that diffusers refuses, in check")
def test_check_names_a_refused_attention_variable_instead_of_a_reinstall(tmp_path):
    result = cli("check", "--only", "imports", cwd=tmp_path, env={"DIFFUSERS_ATTN_BACKEND": "bogus"}, timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imports: diffusers does not import: DIFFUSERS_ATTN_BACKEND='bogus' is refused by diffusers" \
        in result.stdout, result.stdout
    assert "fix: unset DIFFUSERS_ATTN_BACKEND" in result.stdout and "reinstall" not in result.stdout


# ---- the counts ------------------------------------------------------------------------------------------------

def test_the_readme_states_what_the_suite_tries():
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"fault suite \(`tests/test_faults.py`.*?tries (\d+) bad inputs and (\d+) injected faults",
                       readme, re.S)
    assert stated, "the README's fault suite sentence is missing"
    assert (int(stated.group(1)), int(stated.group(2))) == (len(BAD_INPUTS), len(FAULTS))
    assert len(BAD_INPUTS) >= 30 and len(FAULTS) >= 15
