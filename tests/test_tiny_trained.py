"""The trained tiny model: its data set, its checker, its shipped weights, and that it draws held-out prompts."""

import numpy as np
import pytest
import torch

from qwendoctor.tiny import shapes
from qwendoctor.tiny.trained import WEIGHT_FILES, load_trained_tiny, read_config, revision, shipped_dir


def test_the_data_set_is_a_function_of_its_seed():
    scenes = shapes.all_scenes()[::97]
    first = [image for _, image in shapes.images(scenes, 2, seed=3)]
    again = [image for _, image in shapes.images(scenes, 2, seed=3)]
    other = [image for _, image in shapes.images(scenes, 2, seed=4)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert not np.array_equal(first[0], first[1])  # variants of a scene are jittered


def test_the_split_holds_out_whole_prompts_the_same_way_every_time():
    train, held_out = shapes.split(0)
    assert shapes.split(0) == (train, held_out)
    train_prompts, held_out_prompts = {s.prompt for s in train}, {s.prompt for s in held_out}
    assert not train_prompts & held_out_prompts
    assert len(train_prompts | held_out_prompts) == len(shapes.all_scenes())
    assert 0.05 < len(held_out) / len(shapes.all_scenes()) < 0.15
    # every attribute value is still taught: held-out prompts are new combinations, not new words
    for field in ("shape", "colour", "size", "position", "background"):
        assert {getattr(s, field) for s in held_out} <= {getattr(s, field) for s in train}


def test_prompts_parse_back_to_their_scene():
    for scene in shapes.all_scenes()[::50]:
        assert shapes.parse(scene.prompt) == scene
    with pytest.raises(ValueError):
        shapes.parse("a photo of a cat")


def test_the_checker_passes_the_data_sets_own_images():
    scenes = shapes.all_scenes()[::23]
    for scene, image in shapes.images(scenes, 1, seed=0):
        verdict = shapes.check(image, scene.prompt)
        assert verdict["all"], (scene.prompt, verdict)


@pytest.mark.parametrize("change, attribute", [
    ({"colour": "green"}, "colour"),
    ({"background": "white"}, "background"),
    ({"position": "bottom right"}, "position"),
    ({"position": "center"}, "position"),
    ({"size": "large"}, "size"),
])
def test_the_checker_fails_an_image_of_another_scene(change, attribute):
    asked = shapes.Scene("circle", "red", "small", "top left", "blue")
    drawn = shapes.Scene(**{**asked.__dict__, **change})
    image = shapes.render(drawn, np.random.default_rng(0))
    verdict = shapes.check(image, asked.prompt)
    assert not verdict[attribute] and not verdict["all"]
    assert verdict["pass"] == (attribute == "size")  # pass is the colours and the position: size is apart
    assert all(verdict[key] for key in ("background", "colour", "position", "size") if key != attribute)


def test_the_checker_fails_a_plain_background():
    image = np.full((128, 128, 3), shapes.PALETTE["blue"], np.uint8)
    assert not shapes.check(image, "a large red square in the center on a blue background")["pass"]


def test_the_shipped_weights_are_small_and_named_by_their_hash():
    total = sum((shipped_dir() / name).stat().st_size for name in WEIGHT_FILES)
    assert total < 6 * 2**20
    assert revision().startswith("trained-") and revision() == revision()
    assert read_config()["model"]["transformer"]["num_layers"] >= 8


@pytest.fixture(scope="module")
def trained_pipe():
    torch.set_num_threads(1)
    from qwendoctor.models import quiet_libraries

    quiet_libraries()
    return load_trained_tiny("cpu", "float32")


def test_the_loader_builds_the_qwen_image_pipeline_offline(trained_pipe, monkeypatch):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(trained_pipe, QwenImagePipeline)
    assert isinstance(trained_pipe.transformer, QwenImageTransformer2DModel)
    assert len(trained_pipe.transformer.transformer_blocks) >= 8
    assert trained_pipe.vae.config.latents_std != [1.0] * trained_pipe.vae.config.z_dim


def test_the_model_draws_held_out_prompts(trained_pipe):
    """The honest end-to-end test: prompts it never trained on, rendered the way the product renders them."""
    _, held_out = shapes.split(read_config()["training"]["seed"])
    prompts = [held_out[index].prompt for index in np.random.default_rng(0).permutation(len(held_out))[:3]]
    for seed, prompt in enumerate(prompts):
        image = trained_pipe(prompt=prompt, negative_prompt=" ", width=128, height=128, num_inference_steps=20,
                             true_cfg_scale=4.0, generator=torch.Generator().manual_seed(seed)).images[0]
        assert shapes.check(image, prompt)["pass"], (prompt, shapes.check(image, prompt))
