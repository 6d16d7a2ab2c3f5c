"""tiny's shipped LoRA adapters: they load with diffusers' loader and change the model, their declarations hold,
the frame style is read from the pixels, the plain data set is untouched, and their trainers are deterministic."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwendoctor.tiny import adapters, shapes
from qwendoctor.tiny.trained import load_trained_tiny

# sha256 of the plain renders of all_scenes()[::25] (rng seeded by index) before the style argument existed: the
# base model's training data must not move.
PLAIN_RENDERS_SHA256 = "7da3c7c5245f462914e53ce9c65859fdfe73bdd1de7a456fb69da3db15166975"


def transformer_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeddings, mask = pipe.encode_prompt(shapes.EXAMPLE_PROMPT, device="cpu")
    with torch.no_grad():
        return pipe.transformer(hidden_states=torch.randn(1, 64, 32, generator=generator),
                                timestep=torch.tensor([0.6]), encoder_hidden_states=embeddings,
                                encoder_hidden_states_mask=mask, img_shapes=[[(1, 8, 8)]], return_dict=False)[0]


@pytest.mark.parametrize("name", adapters.NAMES)
def test_a_shipped_adapter_loads_with_diffusers_and_changes_the_transformer(name):
    pipe = load_trained_tiny()
    before = transformer_output(pipe)
    pipe.load_lora_weights(str(adapters.path(name)), adapter_name=name)
    assert pipe.get_active_adapters() == [name]
    lora_modules = [module for module_name, module in pipe.transformer.named_modules()
                    if module_name.endswith("lora_A")]
    state = load_file(adapters.path(name))
    assert len(lora_modules) * 2 == len(state)  # every saved tensor found its module: no key was left unused
    after = transformer_output(pipe)
    assert (after - before).abs().max() > 1e-3
    pipe.set_adapters([name], [0.0])  # scale 0 is the base again
    assert torch.allclose(transformer_output(pipe), before, atol=1e-6)


@pytest.mark.parametrize("name", adapters.NAMES)
def test_a_shipped_adapters_declaration_is_valid_and_matches_its_weights(name):
    data = adapters.metadata(name)
    state = load_file(adapters.path(name))
    ranks = {tensor.shape[0] for key, tensor in state.items() if "lora_A" in key}
    assert ranks == {data["rank"]}
    assert adapters.sha256(name) == hashlib.sha256(adapters.path(name).read_bytes()).hexdigest()
    if data["kind"] == "distilled":
        assert data["true_cfg_scale"] == 1.0 and max(data["steps"]) <= 8 and data["scheduler"]
    else:
        assert data["style"] == "frame" and data["true_cfg_scale"] > 1.0


def test_the_distilled_declaration_changes_the_sigmas_the_pipeline_visits():
    from qwendoctor.tiny.lora import sigmas_for

    pipe = load_trained_tiny()
    own = sigmas_for(pipe, 4)
    declared = sigmas_for(pipe, 4, adapters.metadata("distilled")["scheduler"])
    assert len(own) == len(declared) == 5 and not torch.allclose(own, declared)
    assert torch.allclose(declared, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-4)  # Lightning's


@pytest.mark.parametrize("change, message", [
    ({"kind": "lightning"}, "kind"), ({"steps": []}, "steps"), ({"steps": [4.5]}, "steps"),
    ({"true_cfg_scale": float("nan")}, "true_cfg_scale"), ({"true_cfg_scale": 4.0}, "CFG off"),
    ({"scheduler": None}, "scheduler"), ({"rank": 0}, "rank")])
def test_a_declaration_a_runner_could_not_follow_is_refused_in_one_line(change, message):
    data = json.loads(json.dumps(adapters.metadata("distilled"))) | change
    with pytest.raises(ValueError, match=message) as error:
        adapters.validate(data)
    assert "\n" not in str(error.value)


def test_an_unknown_adapter_name_says_which_exist():
    with pytest.raises(KeyError, match="distilled"):
        adapters.path("anime")


def test_the_plain_renders_are_unchanged_by_the_style_argument():
    digest = hashlib.sha256()
    for index, scene in enumerate(shapes.all_scenes()[::25]):
        plain = shapes.render(scene, np.random.default_rng(index))
        assert np.array_equal(plain, shapes.render(scene, np.random.default_rng(index), style=None))
        digest.update(plain.tobytes())
    assert digest.hexdigest() == PLAIN_RENDERS_SHA256


def test_the_style_checker_reads_the_frame_and_only_the_frame():
    scenes = shapes.all_scenes()[::11]  # 115 scenes: every colour pair, shape, size and position
    for index, scene in enumerate(scenes):
        plain = shapes.render(scene, np.random.default_rng(index))
        framed = shapes.render(scene, np.random.default_rng(index), style="frame")
        assert not shapes.style_present(plain), scene.prompt
        assert shapes.style_present(framed), scene.prompt
        # inside the frame the picture is the one the prompt asks for, and reads as such
        assert shapes.check(framed, scene.prompt, style="frame")["pass"], scene.prompt
        margin = round(shapes.FRAME_WIDTH * 128) + 1
        assert np.array_equal(plain[margin:-margin, margin:-margin], framed[margin:-margin, margin:-margin])
    with pytest.raises(ValueError, match="unknown style"):
        shapes.render(scenes[0], np.random.default_rng(0), style="outline")


def test_the_frame_is_always_a_third_colour():
    for scene in shapes.all_scenes():
        assert shapes.frame_colour(scene) not in (scene.colour, scene.background)


def run_twice(tmp_path, main, arguments):
    outputs = []
    for run in ("first", "second"):
        main([*arguments, "--out", str(tmp_path / run)])
        outputs.append({path.name: path.read_bytes() for path in sorted((tmp_path / run).iterdir())})
    return outputs


def test_a_short_distillation_run_is_byte_identical_on_a_rerun(tmp_path):
    from qwendoctor.tiny import distill

    first, second = run_twice(tmp_path, distill.main, ["--prompts", "2", "--steps", "2", "--batch", "4",
                                                       "--eval-prompts", "0"])
    assert first == second and set(first) == {"pytorch_lora_weights.safetensors", "adapter.json"}
    lora_b = [tensor for key, tensor in load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors").items()
              if "lora_B" in key]
    assert any(tensor.abs().max() > 0 for tensor in lora_b)  # it trained: lora_B left zero


def test_a_short_style_run_is_byte_identical_on_a_rerun(tmp_path):
    from qwendoctor.tiny import style

    first, second = run_twice(tmp_path, style.main, ["--scenes", "4", "--variants", "1", "--steps", "2",
                                                     "--batch", "4", "--eval-prompts", "0"])
    assert first == second
    assert json.loads(first["adapter.json"])["kind"] == "style"


def test_load_installs_the_declared_scheduler_and_says_how_to_render():
    pipe = load_trained_tiny()
    own = dict(pipe.scheduler.config)
    kwargs = adapters.load(pipe, "distilled")
    assert kwargs == {"num_inference_steps": 4, "true_cfg_scale": 1.0}  # no negative prompt: CFG off
    assert pipe.scheduler.config["base_shift"] == pytest.approx(np.log(3)) != own["base_shift"]
    assert pipe.scheduler.config["shift_terminal"] is None
    assert pipe.get_active_adapters() == ["distilled"]
    pipe = load_trained_tiny()
    assert adapters.load(pipe, "frame") == {"num_inference_steps": 50, "true_cfg_scale": 4.0, "negative_prompt": " "}
    assert dict(pipe.scheduler.config) == own
