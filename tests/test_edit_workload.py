"""Editing, image-to-image and inpainting workloads (issue 29): what a lock records of them, the input files' checks,
diffusers' img2img and inpaint pipelines on tiny end to end, and the synthetic edit pipeline (its vision tower and
the input's latents in the sequence) at toy size on the CPU, through the levers and the bench's breakdown.

The bad inputs (missing, truncated, not an image, of another size, a mask that does not match, a strength out of
range) are in tests/test_faults.py's BAD_INPUTS, where each is also checked to be answered before torch loads."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from probes.workload import InputImage, Workload, WorkloadError, edit_input_size
from qwendoctor import bench, inputs, levers, lockfile, models, runner
from qwendoctor.capabilities import Capabilities
from qwendoctor.errors import UsageError
from qwendoctor.profile import Profile

PROMPT = "a large green square at the bottom right on a yellow background"
CPU = Capabilities(device="cpu", working_attention_backends=("native",))


def run_cli(*argv: str) -> int:
    from qwendoctor.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


def solid(path, colour, size=(128, 128), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return str(path)


def img2img(tiny_workload, path, strength=0.6, steps=5) -> Workload:
    return inputs.task_workload(dataclasses.replace(tiny_workload, reference_steps=steps), "img2img", (str(path),),
                                None, strength)


# ---- what a lock records -----------------------------------------------------------------------------------------

def test_a_text_to_image_workload_is_written_to_a_lock_as_before():
    """task, input_sizes and strength are left out at their defaults: older locks and their readers see no change."""
    assert set(Workload().to_dict()) == {"model", "width", "height", "true_cfg_scale", "negative_prompt",
                                         "reference_steps", "dtype", "loras"}


def test_an_img2img_lock_records_task_size_and_strength_never_the_file(tmp_path, tiny_workload):
    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (255, 0, 0), size=(96, 64)), strength=0.45)
    assert workload.inputs[0].path == str(tmp_path / "in.png") and len(workload.inputs[0].sha256) == 64
    lock = lockfile.Lock(fingerprint={"device": "cpu", "torch": "x", "model_id": "tiny"}, workload=workload,
                         profile=Profile(), measured={"latency_median_s": 1.0, "step_ms": 1.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    text = (tmp_path / "q.lock").read_text()
    assert "in.png" not in text and workload.inputs[0].sha256 not in text
    read = lockfile.read_lock(tmp_path / "q.lock").workload
    assert (read.task, read.input_sizes, read.strength, read.inputs) == ("img2img", ((96, 64),), 0.45, ())
    # A lock is not where input files go: a hand-written one naming them is refused.
    with pytest.raises(WorkloadError, match="workload.inputs: unknown field"):
        Workload.from_dict({**read.to_dict(), "inputs": []})


def test_a_multi_gpu_rank_gets_the_inputs_back_from_the_identity(tmp_path, tiny_workload):
    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (0, 0, 255)))
    again = Workload.from_identity(json.loads(json.dumps(workload.identity())))
    assert again == workload and again.inputs == workload.inputs


@pytest.mark.parametrize("fields, message", [
    ({"task": "paint"}, "workload.task: 'paint' is not one of generate, edit, img2img, inpaint"),
    ({"input_sizes": ((64, 64),)}, "input images given to a text-to-image workload"),
    ({"task": "edit"}, "an edit takes 1 to 8 input images, got 0"),
    ({"task": "edit", "input_sizes": ((64, 64),), "strength": 0.5}, "only img2img and inpaint take a strength"),
    ({"task": "edit", "input_sizes": ((4096, 16),)}, "over 200:1, which Qwen2-VL's image processor refuses"),
    ({"task": "img2img", "input_sizes": ((64, 64),)}, "workload.strength: task img2img needs a strength"),
    ({"task": "img2img", "input_sizes": ((64, 64),), "strength": 0.0}, "must be a finite number > 0 and <= 1"),
    ({"task": "img2img", "input_sizes": ((64, 64), (64, 64)), "strength": 0.5}, "takes one input image, got 2"),
    ({"task": "img2img", "input_sizes": ((0, 64),), "strength": 0.5}, "input_sizes[0]: must be an integer >= 1"),
    ({"task": "img2img", "input_sizes": ((64, 64),), "strength": 0.5,
      "inputs": (InputImage("/x.png", "0" * 64, 32, 32),)}, "workload.inputs: 32x32 for inputs of 64x64"),
])
def test_a_workload_of_a_task_is_checked_as_a_whole(fields, message):
    with pytest.raises(WorkloadError, match=re.escape(message)):
        Workload(**fields).validate()


@pytest.mark.parametrize("size", [(1024, 1024), (1328, 1328), (640, 480), (480, 640), (1920, 1080), (50, 4000)])
def test_an_edits_input_tokens_are_those_of_diffusers_resize(size):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(1024 * 1024, size[0] / size[1])
    assert edit_input_size(*size) == (width, height)
    workload = Workload(task="edit", input_sizes=(size,), width=512, height=512).validate()
    assert workload.input_image_tokens == (width // 16) * (height // 16)
    assert dataclasses.replace(workload, task="img2img", strength=0.5).validate().input_image_tokens == 0


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.6, 0.75, 1.0])
def test_the_steps_an_img2img_call_runs_are_the_ones_counted(tmp_path, tiny_model, tiny_workload, strength):
    """denoised_steps is diffusers' own count (get_timesteps), checked against the steps the pipeline calls back for;
    schedule_for asks for enough of a schedule to run a number of them."""
    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (9, 9, 9)), strength=strength)
    pipe = models.task_pipeline("img2img", dict(tiny_model.pipe.components))
    model = dataclasses.replace(tiny_model, pipe=pipe)
    for steps in (2, 5, 7):
        seen = []
        runner.render(model, workload, Profile(steps=steps), PROMPT, 0,
                      clock=lambda pipe, step, t, kwargs: seen.append(step) or {})
        assert len(seen) == workload.denoised_steps(steps), (steps, strength)
    for wanted in (1, 3, 6):
        schedule = workload.schedule_for(wanted)
        assert workload.denoised_steps(schedule) >= wanted and (
            schedule == wanted or workload.denoised_steps(schedule - 1) < wanted)


# ---- the input files ---------------------------------------------------------------------------------------------

def test_an_input_file_changed_after_it_was_checked_is_refused_at_render(tmp_path):
    path = solid(tmp_path / "in.png", (10, 20, 30))
    checked = inputs.read_image(path)
    inputs._decoded.clear()  # another process (a multi-GPU rank) reads it again
    solid(path, (30, 20, 10))
    with pytest.raises(UsageError, match=r"--image .*in.png: the file changed while qwendoctor ran"):
        inputs.load(checked)


def test_the_stand_in_is_the_same_drawing_every_run_and_its_mask_the_centre_half():
    first = inputs.stand_in("tiny", 96, 64)
    inputs._decoded.clear()
    again = inputs.stand_in("tiny", 96, 64)
    assert first == again and first.path == "tiny:stand-in" and first.size == (96, 64)
    mask = np.asarray(inputs.load(inputs.stand_in("tiny", 96, 64, mask=True), mask=True))
    assert mask.shape == (64, 96) and mask[32, 48] == 255 and mask[2, 2] == 0 and (mask == 255).mean() == 0.25


def test_a_model_that_draws_is_never_given_a_stand_in_by_generate(tiny_workload):
    locked = dataclasses.replace(tiny_workload, task="img2img", input_sizes=((128, 128),), strength=0.6)
    with pytest.raises(UsageError, match="is for image-to-image .*give the input with --image PATH"):
        inputs.for_lock(locked, None, (), None, None, "q.lock")
    synthetic = inputs.for_lock(dataclasses.replace(locked, model="synthetic"), None, (), None, None, "q.lock")
    assert synthetic.inputs[0].path == "synthetic:stand-in" and synthetic.inputs[0].size == (128, 128)


def test_an_edit_needs_an_edit_checkpoint_and_takes_as_many_images_as_its_pipeline(tmp_path, tiny_workload):
    def checkpoint(name: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
        return str(folder)

    with pytest.raises(UsageError, match="is a QwenImagePipeline checkpoint, not an edit model"):
        models.check_task(checkpoint("QwenImagePipeline"), "edit")
    assert models.check_task("tiny", "edit") == 1  # tiny's edit model (qwendoctor/tiny/edit) takes one image
    assert models.check_task(checkpoint("QwenImageEditPlusPipeline"), "edit") is None
    single = models.check_task(checkpoint("QwenImageEditPipeline"), "edit")
    assert single == 1 and models.check_task("synthetic", "edit") == 1
    images = tuple(solid(tmp_path / f"{i}.png", (i, i, i)) for i in range(2))
    model = dataclasses.replace(tiny_workload, model=str(tmp_path / "QwenImageEditPipeline"))
    with pytest.raises(UsageError, match="--image given 2 times; this model's edit pipeline takes 1 input image"):
        inputs.task_workload(model, "edit", images, None, None, max_images=single)
    several = inputs.task_workload(model, "edit", images, None, None, max_images=None)
    assert several.input_sizes == ((128, 128), (128, 128)) and several.strength is None


# ---- image-to-image and inpainting on tiny -----------------------------------------------------------------------

def test_img2img_starts_from_the_input_and_strength_sets_how_far_it_moves(tmp_path, tiny_model, tiny_workload):
    """tiny learned its shapes world: at a low strength the render keeps the input's colour, at full strength it
    draws the prompt whatever the input."""
    pipe = models.task_pipeline("img2img", dict(tiny_model.pipe.components))
    model = dataclasses.replace(tiny_model, pipe=pipe)
    renders = {}
    for colour in ((230, 30, 30), (30, 30, 230)):
        for strength in (0.3, 1.0):
            workload = img2img(tiny_workload, solid(tmp_path / f"{colour[0]}.png", colour), strength, steps=10)
            renders[colour, strength] = runner.render(model, workload, Profile(), PROMPT, 0)
    red, blue = (np.abs(renders[c, 0.3] - np.array(c) / 255).mean() for c in ((230, 30, 30), (30, 30, 230)))
    assert red < 0.2 and blue < 0.2  # close to its own input
    assert np.abs(renders[(230, 30, 30), 0.3] - renders[(30, 30, 230), 0.3]).mean() > 0.3
    # At full strength the input's colour is gone: the two renders are close to each other.
    assert np.abs(renders[(230, 30, 30), 1.0] - renders[(30, 30, 230), 1.0]).mean() < 0.1


def test_inpainting_repaints_where_the_mask_says(tmp_path, tiny_model, tiny_workload):
    pipe = models.task_pipeline("inpaint", dict(tiny_model.pipe.components))
    model = dataclasses.replace(tiny_model, pipe=pipe)
    image = solid(tmp_path / "in.png", (230, 230, 230))
    half = Image.new("L", (128, 128), 0)
    half.paste(255, (0, 0, 64, 128))
    half.save(tmp_path / "left.png")
    workload = inputs.task_workload(dataclasses.replace(tiny_workload, reference_steps=8), "inpaint", (image,),
                                    str(tmp_path / "left.png"), 1.0)
    drawn = runner.render(model, workload, Profile(), PROMPT, 0)
    kept, repainted = drawn[:, 72:], drawn[:, :56]
    assert np.abs(kept - 230 / 255).mean() < 0.05 < np.abs(repainted - 230 / 255).mean()


def test_cfg_batching_and_the_block_cache_apply_to_img2img(tmp_path, tiny_workload):
    pytest.importorskip("cache_dit")
    model = models.load_model("tiny", "cpu", "float32", task="img2img")
    assert type(model.pipe).__name__ == "QwenImageImg2ImgPipeline"
    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (40, 200, 40)), strength=0.6, steps=10)
    plain = runner.render(model, workload, Profile(), PROMPT, 0)
    batched = Profile(cfg_batching=True)
    levers.optimize(model.pipe, batched, workload=workload)
    np.testing.assert_allclose(runner.render(model, workload, batched, PROMPT, 0), plain, atol=2e-5)
    assert model.pipe.transformer.batched_calls == workload.denoised_steps(10) == 6
    cached = Profile(cache="dbcache", cache_threshold=1.0, cache_warmup=2)
    levers.optimize(model.pipe, cached, undoable_only=True, workload=workload)
    assert np.isfinite(runner.render(model, workload, cached, PROMPT, 0)).all()
    assert 0 < levers.cached_steps(model.pipe) < 6  # of the 6 steps image-to-image runs, not the schedule's 10


def test_the_step_breakdown_profiles_three_steps_run_whatever_the_strength(tmp_path, tiny_model, tiny_workload):
    from qwendoctor.step_profile import step_breakdown

    pipe = models.task_pipeline("img2img", dict(tiny_model.pipe.components))
    model = dataclasses.replace(tiny_model, pipe=pipe)
    # At 0.3 a three-step schedule runs one step: the breakdown must ask for enough of a schedule to run three.
    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (1, 2, 3)), strength=0.3)
    breakdown = step_breakdown(model, workload, Profile(), PROMPT, 0, unprofiled_step_ms=50.0)
    assert breakdown["profiled_step_ms"] > 0 and breakdown["kernel_ms"]["gemm"] > 0


def test_a_loaded_img2img_lock_renders_from_the_image_it_is_given(tmp_path, tiny_workload):
    import qwendoctor

    workload = img2img(tiny_workload, solid(tmp_path / "in.png", (250, 250, 250)), strength=0.3, steps=6)
    lock = lockfile.Lock(fingerprint={"device": "cpu", "torch": "x", "model_id": "tiny"}, workload=workload,
                         profile=Profile(), measured={"latency_median_s": 1.0, "step_ms": 1.0})
    lockfile.write_lock(tmp_path / "q.lock", lock)
    tuned = qwendoctor.load_pipeline(str(tmp_path / "q.lock"), ignore_fingerprint=True)
    light = np.asarray(tuned(PROMPT, image=tmp_path / "in.png"), dtype=float)
    dark = np.asarray(tuned(PROMPT, image=solid(tmp_path / "dark.png", (5, 5, 5))), dtype=float)
    assert light.mean() - dark.mean() > 100
    with pytest.raises(UsageError, match="64x64, the pipeline's lock was tuned for inputs of 128x128"):
        tuned(PROMPT, image=solid(tmp_path / "small.png", (5, 5, 5), (64, 64)))


def test_tune_generate_and_bench_run_img2img_on_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    # tune in this process marks it resumable (for its Ctrl-C message): put back as it was for the next test
    monkeypatch.setattr("qwendoctor.cli._resumable", False)
    image, small = solid(tmp_path / "in.png", (200, 60, 60)), solid(tmp_path / "small.png", 0, (64, 64))
    lock = str(tmp_path / "q.lock")
    assert run_cli("tune", "--task", "img2img", "--image", image, "--strength", "0.5", "--steps", "4",
                   "--num-prompts", "1", "--timed-steps", "2", "--trials", "2", "--lock", lock) == 0
    locked = lockfile.read_lock(lock).workload
    assert (locked.task, locked.input_sizes, locked.strength) == ("img2img", ((128, 128),), 0.5)
    out = tmp_path / "out"
    assert run_cli("generate", PROMPT, "--lock", lock, "--image", image, "--out", str(out)) == 0
    written = list(out.iterdir())
    assert len(written) == 1
    info = Image.open(written[0]).text
    assert info["task"] == "img2img" and info["strength"] == "0.5"
    assert json.loads(info["inputs"]) == [{"path": image, "sha256": inputs.read_image(image).sha256}]
    capsys.readouterr()
    assert run_cli("generate", PROMPT, "--lock", lock, "--image", small, "--out", str(out)) == 2
    assert "64x64" in capsys.readouterr().err and len(list(out.iterdir())) == 1  # nothing written
    assert run_cli("bench", "--task", "img2img", "--image", image, "--steps", "4", "--timed-steps", "3",
                   "--no-ladder", "--no-breakdown", "--out", str(tmp_path / "b")) == 0
    document = json.loads((tmp_path / "b" / "bench-tiny-img2img-128x128.json").read_text())
    assert document["workload"]["task"] == "img2img" and document["workload"]["strength"] == 0.6
    assert "task: image-to-image of 128x128, strength 0.6" in document["notes"]
    assert document["rows"][0]["image_steps"] == 3  # 4 steps at 0.6 run 3


# ---- the synthetic edit pipeline, at toy size on the CPU ---------------------------------------------------------

def toy_synthetic_config() -> dict:
    """synthetic.json's layout with every component shrunk: the same classes and wiring (the text encoder's vision
    tower included), built by the same code as the full-size model."""
    config = json.loads(json.dumps(models._package_json("qwendoctor", "synthetic.json")))
    encoder = config["text_encoder"]
    encoder["text_config"].update(num_hidden_layers=1, hidden_size=256, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=512)
    encoder["vision_config"].update(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=256,
                                    fullatt_block_indexes=[0])
    encoder.update(hidden_size=256, vocab_size=512)
    config["transformer"].update(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=256,
                                 axes_dims_rope=[8, 12, 12])
    config["vae"].update(base_dim=8, num_res_blocks=1)
    return config


@pytest.fixture(scope="module")
def toy_edit():
    return models.build_synthetic(toy_synthetic_config(), "cpu", "float32", task="edit")


@pytest.fixture
def edit_workload():
    workload = Workload(model="synthetic", width=128, height=128, reference_steps=4, dtype="float32")
    return inputs.task_workload(workload, "edit", (), None, None, max_images=models.check_task("synthetic", "edit"))


def test_synthetic_edits_with_diffusers_edit_pipeline_and_its_vision_tower(toy_edit):
    pipe = toy_edit.pipe
    assert type(pipe).__name__ == "QwenImageEditPipeline" and toy_edit.has_text_encoder
    assert pipe.text_encoder.config.image_token_id == pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # The embeddings start after the template's system prompt, as Qwen's 64 tokens do: at the vision markers.
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("x"))["input_ids"]
    assert ids[pipe.prompt_template_encode_start_idx] == pipe.tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_an_edits_sequence_holds_the_inputs_latents_and_the_vision_tokens(toy_edit, edit_workload):
    sequence = runner.transformer_sequence(toy_edit, edit_workload, "make it blue", 0)
    # The 128x128 output's 64 tokens and the input's, resized by the pipeline to 1024x1024: 4096.
    assert sequence["image_tokens"] == edit_workload.image_tokens + edit_workload.input_image_tokens == 64 + 4096
    # Qwen2.5-VL's processor makes 1036x1036 of it: 74x74 patches of 14 px, merged 2x2, 1369 tokens in the prompt.
    assert 1369 < sequence["text_tokens"] < 1369 + 20


def test_cfg_batching_batches_the_edits_longer_sequence_as_two_passes_would(toy_edit, edit_workload):
    plain = runner.render(toy_edit, edit_workload, Profile(), "make it blue", 0)
    batched = Profile(cfg_batching=True)
    levers.optimize(toy_edit.pipe, batched, workload=edit_workload)
    try:
        np.testing.assert_allclose(runner.render(toy_edit, edit_workload, batched, "make it blue", 0), plain,
                                   atol=2e-5)
        assert toy_edit.pipe.transformer.batched_calls == 4
    finally:
        levers.optimize(toy_edit.pipe, Profile(), undoable_only=True, workload=edit_workload)


def test_bench_times_the_edit_with_its_sequence_and_the_step_breakdown(toy_edit, edit_workload, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda model, device, dtype, on_cpu=frozenset(), task="generate": (
        toy_edit if task == "edit" else pytest.fail("bench built another task's pipeline")))
    options = bench.BenchOptions(workload=edit_workload, timed_steps=3, ladder=False, out_dir=str(tmp_path))
    result = bench.run_bench(options, CPU)
    assert result.path_json.endswith("bench-synthetic-edit-128x128.json")
    flops = result.document["flops_per_step"]
    assert flops["image_tokens"] == 64 + 4096 and flops["text_tokens"] > 1369
    row = result.document["rows"][0]
    assert row["id"] == "default" and row["timed_steps"] == 3 and row["breakdown"]["kernel_ms"]["gemm"] > 0
    table = (tmp_path / "bench-synthetic-edit-128x128.md").read_text()
    assert "# qwendoctor bench: synthetic edit 128x128" in table and "Sequence per pass: 4160 image tokens" in table


# ---- tiny's edit model through the CLI ----------------------------------------------------------------------------

def scene_image(path, prompt=PROMPT, seed=5) -> str:
    from qwendoctor.tiny import shapes

    Image.fromarray(shapes.render(shapes.parse(prompt), np.random.default_rng(seed), 128)).save(path)
    return str(path)


def test_tiny_edits_with_its_own_model_and_its_instructions_are_the_built_in_prompts():
    from qwendoctor import prompts
    from qwendoctor.tiny import edit, edit_data

    model = models.load_model("tiny", "cpu", "float32", task="edit")
    assert model.revision == edit.revision() == models.builtin_revision("tiny", "edit") != models.builtin_revision(
        "tiny")
    # cache-dit finds its support for a pipeline by the class name's prefix: tiny's subclass must still match.
    assert type(model.pipe).__name__.startswith("QwenImageEditPipeline")
    instructions = prompts.default_prompts("tiny", "edit")
    assert len(instructions) == 14 and len(set(instructions)) == 14
    assert [edit_data.parse_instruction(text)[0] for text in instructions[:3]] == list(edit_data.KINDS)
    held, seeds = prompts.held_out_set("tiny", instructions[:2], [0], "edit")
    assert held and not set(held) & set(instructions[:2]) and seeds == [1]
    assert all(edit_data.parse_instruction(text) for text in held)


def test_the_block_cache_runs_on_tinys_edit_pipeline(tiny_workload):
    pytest.importorskip("cache_dit")
    model = models.load_model("tiny", "cpu", "float32", task="edit")
    workload = inputs.task_workload(dataclasses.replace(tiny_workload, reference_steps=6), "edit", (), None, None,
                                    max_images=1)
    cached = Profile(cache="dbcache", cache_threshold=1.0, cache_warmup=2)
    levers.optimize(model.pipe, cached, workload=workload)
    assert np.isfinite(runner.render(model, workload, cached, "make the background green", 0)).all()
    assert 0 < levers.cached_steps(model.pipe) < 6


def test_tune_and_generate_edit_on_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qwendoctor.cli._resumable", False)
    lock = str(tmp_path / "q.lock")
    assert run_cli("tune", "--task", "edit", "--steps", "4", "--num-prompts", "1", "--timed-steps", "2",
                   "--trials", "2", "--lock", lock) == 0
    locked = lockfile.read_lock(lock)
    assert (locked.workload.task, locked.workload.input_sizes) == ("edit", ((128, 128),))
    # No --true-cfg-scale: the scale tiny's edit model records it was trained for.
    from qwendoctor.tiny import edit

    trained_for = edit.read_config().get("reference_true_cfg_scale", 4.0)
    assert locked.workload.true_cfg_scale == models.default_true_cfg_scale("tiny", "edit") == trained_for
    assert models.default_true_cfg_scale("tiny", "generate") == models.default_true_cfg_scale("synthetic", "edit") == 4
    assert locked.fingerprint["model_revision"].startswith("edit-")
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli("generate", "make the background green", "--lock", lock, "--out", str(out)) == 2
    assert "give the input with --image PATH" in capsys.readouterr().err  # tiny draws: never a stand-in
    image = scene_image(tmp_path / "in.png")
    assert run_cli("generate", "make the background green", "--lock", lock, "--image", image, "--out", str(out)) == 0
    assert "note" not in capsys.readouterr().err
    assert run_cli("generate", "paint it blue", "--lock", lock, "--image", image, "--out", str(out)) == 0
    assert "tiny edits with instructions like 'make the circle red'" in capsys.readouterr().err
    assert len(list(out.iterdir())) == 2
