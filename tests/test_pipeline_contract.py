"""The pipeline `levers.optimize` hands back keeps diffusers' contract (issue 16).

Users go on using the QwenImagePipeline as diffusers documents it: lists of prompts (with one negative or a list),
num_images_per_prompt, their own prompt_embeds, callback_on_step_end, output_type="latent", `.to()`,
save_pretrained / from_pretrained. Each lever either honours that, giving the image the unmodified pipeline gives
(to float32 rounding), or refuses with one line. Tiny model, 64x64, 2 steps: every call here takes a fraction of
a second on the CPU.
"""

import gc
import json
import weakref

import numpy as np
import pytest
import torch

from qwendoctor import levers, models
from qwendoctor.levers import cfg_batching
from qwendoctor.levers import real_rope as rope
from qwendoctor.errors import UsageError
from qwendoctor.profile import Profile, Workload

SIDE, STEPS = 64, 2
NEGATIVE = "blurry, low quality"
WORKLOAD = Workload(model="tiny", width=SIDE, height=SIDE, reference_steps=STEPS, dtype="float32").validate()
# float32 throughout; a batch of 2 (CFG batching) or a padded, masked text batch sums in another order.
TOLERANCE = 1e-4


def generate(pipe, **call):
    arguments = {"width": SIDE, "height": SIDE, "num_inference_steps": STEPS, "true_cfg_scale": 4.0,
                 "negative_prompt": NEGATIVE, "output_type": "np", **call}
    arguments.setdefault("generator", torch.Generator("cpu").manual_seed(0))
    images = pipe(**arguments).images
    return images.numpy() if isinstance(images, torch.Tensor) else images


def _embeds(plain):
    """A prompt list of two lengths (so diffusers hands back a mask) and its negatives, encoded once by the
    unmodified pipeline: the very tensors both pipelines are given."""
    prompt, prompt_mask = plain.encode_prompt(["a red fox in the snow", "a house"], device="cpu")
    negative, negative_mask = plain.encode_prompt([NEGATIVE, "dark"], device="cpu")
    return {"prompt_embeds": prompt, "prompt_embeds_mask": prompt_mask, "negative_prompt_embeds": negative,
            "negative_prompt_embeds_mask": negative_mask, "negative_prompt": None}


class SwapsPromptAndNudgesLatents:
    """A callback that uses what diffusers lets it: it replaces the prompt's embeddings (a new tensor, not the
    one encode_prompt returned) and the latents after every step."""

    def __init__(self):
        self.steps = []

    def __call__(self, pipe, step, timestep, tensors):
        self.steps.append(step)
        return {"latents": tensors["latents"] * 0.98, "prompt_embeds": tensors["prompt_embeds"] * 1.5}


# name -> (call arguments given the unmodified pipeline, whether the call runs true CFG)
CASES = {
    "one_prompt": (lambda plain: {"prompt": "a red fox in the snow"}, True),
    "prompt_list_one_negative": (lambda plain: {"prompt": ["a red fox in the snow", "a small blue house", "x"]},
                                 True),
    "prompt_list_negative_list": (lambda plain: {"prompt": ["a red fox in the snow", "a small blue house", "x"],
                                                 "negative_prompt": [NEGATIVE, "dark", "a long negative prompt"]},
                                  True),
    "num_images_per_prompt": (lambda plain: {"prompt": "a red fox", "num_images_per_prompt": 2}, True),
    "prompt_lists_and_images_per_prompt": (lambda plain: {"prompt": ["a red fox in the snow", "a house"],
                                                          "negative_prompt": [NEGATIVE, "dark"],
                                                          "num_images_per_prompt": 2}, True),
    "prompt_embeds": (lambda plain: _embeds(plain), True),
    "callback_on_step_end": (lambda plain: {"prompt": "a red fox", "callback_on_step_end": SwapsPromptAndNudgesLatents(),
                                            "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]},
                             True),
    "output_type_latent": (lambda plain: {"prompt": ["a red fox", "a house"], "output_type": "latent"}, True),
    "no_cfg": (lambda plain: {"prompt": "a red fox", "negative_prompt": None}, False),
}

# Levers that keep the image: the same images as the unmodified pipeline are expected. The caches get a
# threshold under which nothing is ever reused (their hooks run, their shortcuts do not), so every call shape
# passes through their code and must come out as the unmodified pipeline's.
LOSSLESS = {
    "default": Profile(),
    "cfg_batching": Profile(cfg_batching=True),
    "attention_math": Profile(attention_backend="_native_math"),
    "real_rope": Profile(real_rope=True),
    "first_block": Profile(cache="first_block", cache_threshold=1e-9),
    "dbcache": Profile(cache="dbcache", cache_threshold=1e-9, cache_warmup=0),
    "dbcache_cfg_batching": Profile(cache="dbcache", cache_threshold=1e-9, cache_warmup=0, cfg_batching=True),
}


@pytest.fixture(scope="module")
def plain(tiny_model):
    return tiny_model.pipe


@pytest.fixture(scope="module")
def references(plain):
    """Each case rendered by the unmodified pipeline, before any lever (real RoPE is process-wide) is on."""
    assert not rope.enabled()
    return {name: generate(plain, **arguments(plain)) for name, (arguments, _) in CASES.items()}


@pytest.fixture(scope="class", params=list(LOSSLESS), ids=list(LOSSLESS))
def optimized(request, references):
    profile = LOSSLESS[request.param]
    if profile.cache == "dbcache":
        pytest.importorskip("cache_dit")
    model = models.load_model("tiny", "cpu", "float32")
    levers.optimize(model.pipe, profile, workload=WORKLOAD)
    yield profile, model.pipe
    # Process-wide state (real RoPE, cache-dit's patch of the pipeline class) must not outlive the profile.
    levers.optimize(model.pipe, Profile(), undoable_only=True, workload=WORKLOAD)


class TestLosslessLevers:
    """Each lossless lever, every call shape: the pipeline is built once per lever (class scope)."""

    @pytest.mark.parametrize("case", list(CASES))
    def test_every_call_diffusers_documents_gives_the_unmodified_image(self, optimized, plain, references, case):
        profile, pipe = optimized
        arguments, runs_cfg = CASES[case]
        batching = cfg_batching.interception(pipe.transformer)
        before = batching.batched_calls if batching else 0
        call = arguments(plain)
        images = generate(pipe, **call)
        assert images.shape == references[case].shape
        np.testing.assert_allclose(images, references[case], atol=TOLERANCE, rtol=0)
        if profile.cfg_batching:
            # Batched, not run as two passes: one batch-2 pass a step whenever the call runs CFG.
            assert batching.batched_calls - before == (STEPS if runs_cfg else 0)
        if "callback_on_step_end" in call:
            assert call["callback_on_step_end"].steps == list(range(STEPS))

    def test_to_reaches_the_transformer_and_save_pretrained_writes_one_that_loads_back(self, optimized, plain,
                                                                                           references, tmp_path):
        from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

        _, pipe = optimized
        pipe.to(torch.float64)  # float32 -> float64 -> float32 is exact: the images after it must not move
        assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}
        pipe.to(torch.float32)
        assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
        assert isinstance(pipe.components["transformer"], torch.nn.Module)

        pipe.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "transformer" / "config.json").read_text())
        assert config["_class_name"] == "QwenImageTransformer2DModel"
        assert list((tmp_path / "transformer").glob("*.safetensors"))
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]

        loaded = QwenImagePipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded.transformer) is QwenImageTransformer2DModel  # plain diffusers, nothing of qwendoctor
        call = CASES["one_prompt"][0](plain)
        np.testing.assert_allclose(generate(loaded, **call), references["one_prompt"], atol=TOLERANCE, rtol=0)
        # and the pipeline that was saved still works as it did
        np.testing.assert_allclose(generate(pipe, **call), references["one_prompt"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("call", [
    {"prompt": "a red fox", "negative_prompt": ["dark", "a long negative prompt"]},
    {"prompt": ["a red fox", "a house"], "negative_prompt": [NEGATIVE, "dark", "x"]},
    {"prompt": ["a red fox", "a house"], "num_images_per_prompt": 2},
], ids=["one_prompt_two_negatives", "two_prompts_three_negatives", "one_negative_for_two_prompts_twice_each"])
def test_calls_diffusers_cannot_run_fail_the_same_way_under_cfg_batching(plain, call):
    """Batches that do not line up are run as diffusers' two passes, so they fail as diffusers fails: never a
    batched guess at what diffusers would have done."""
    pipe = models.load_model("tiny", "cpu", "float32").pipe
    levers.optimize(pipe, Profile(cfg_batching=True), workload=WORKLOAD)
    with pytest.raises(Exception) as unmodified:
        generate(plain, **call)
    with pytest.raises(type(unmodified.value)) as batched:
        generate(pipe, **call)
    assert str(batched.value) == str(unmodified.value)
    assert cfg_batching.interception(pipe.transformer).batched_calls == 0


def test_cfg_batching_keeps_the_real_transformer_registered_and_gives_its_class_back():
    from diffusers import QwenImageTransformer2DModel

    pipe = models.load_model("tiny", "cpu", "float32").pipe
    transformer = pipe.transformer
    levers.optimize(pipe, Profile(cfg_batching=True))
    assert pipe.transformer is transformer and pipe.components["transformer"] is transformer
    assert isinstance(transformer, QwenImageTransformer2DModel)
    assert type(transformer).__name__ == "QwenImageTransformer2DModel"
    levers.optimize(pipe, Profile())
    assert type(pipe.transformer) is QwenImageTransformer2DModel and "encode_prompt" not in vars(pipe)
    assert cfg_batching.interception(pipe.transformer) is None


def test_to_moves_the_transformer_to_another_device_under_cfg_batching():
    pipe = models.load_model("tiny", "cpu", "float32").pipe
    levers.optimize(pipe, Profile(cfg_batching=True))
    pipe.to("meta")  # the one other device every machine has
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}


@pytest.mark.parametrize("compile_", ["regional", "full"])
def test_compiled_transformer_saves_and_moves_like_the_plain_one(plain, references, tmp_path, recorded_compiles,
                                                                 compile_):
    from diffusers import QwenImagePipeline

    pipe = models.load_model("tiny", "cpu", "float32").pipe
    levers.optimize(pipe, Profile(compile=compile_, cfg_batching=True), workload=WORKLOAD)
    assert recorded_compiles
    pipe.to(torch.float64)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}
    pipe.to(torch.float32)
    pipe.save_pretrained(tmp_path)
    loaded = QwenImagePipeline.from_pretrained(tmp_path)
    assert loaded.transformer.state_dict().keys() == plain.transformer.state_dict().keys()
    loaded.set_progress_bar_config(disable=True)
    call = CASES["one_prompt"][0](plain)
    np.testing.assert_allclose(generate(loaded, **call), references["one_prompt"], atol=TOLERANCE, rtol=0)


# ---- a lossy lever: block caching on a fixed schedule ---------------------------------------------------------

def test_fixed_cache_schedule_treats_each_image_of_a_batch_as_its_own(plain, tmp_path):
    """A fixed schedule reuses the same steps whatever the images are, so each image of a batch (a list of
    prompts with their negatives, num_images_per_prompt) must come out as that image rendered alone, with or
    without CFG batching; and not as the unmodified pipeline's, since the cache is on. What save_pretrained
    writes is the unmodified pipeline."""
    pytest.importorskip("cache_dit")
    from diffusers import QwenImagePipeline

    steps = 4  # [1, 0, 0, 1]: two of four steps reuse the cached blocks
    workload = Workload(model="tiny", width=SIDE, height=SIDE, reference_steps=steps, dtype="float32").validate()
    prompts, negatives = ["a red fox in the snow", "a house"], [NEGATIVE, "dark"]

    def seeds(*values):
        return [torch.Generator("cpu").manual_seed(value) for value in values]

    uncached = generate(plain, prompt=prompts[0], negative_prompt=negatives[0], generator=seeds(0),
                        num_inference_steps=steps)
    for batching in (False, True):
        profile = Profile(cache="dbcache", cache_schedule=0.5, cache_warmup=1, cfg_batching=batching)
        pipe = models.load_model("tiny", "cpu", "float32").pipe
        levers.optimize(pipe, profile, workload=workload)
        try:
            together = generate(pipe, prompt=prompts, negative_prompt=negatives, generator=seeds(0, 1),
                                num_inference_steps=steps)
            assert levers.cached_steps(pipe) == 2
            assert np.abs(together[0] - uncached[0]).max() > 0.05  # the cache is on
            alone = generate(pipe, prompt=prompts[1], negative_prompt=negatives[1], generator=seeds(1),
                             num_inference_steps=steps)
            np.testing.assert_allclose(together[1], alone[0], atol=TOLERANCE, rtol=0)
            twice = generate(pipe, prompt=prompts[0], negative_prompt=negatives[0], num_images_per_prompt=2,
                             generator=seeds(0, 1), num_inference_steps=steps)
            np.testing.assert_allclose(twice[0], together[0], atol=TOLERANCE, rtol=0)
            if batching:
                latents = generate(pipe, prompt=prompts[0], negative_prompt=negatives[0], generator=seeds(0),
                                   num_inference_steps=steps, output_type="latent")
                assert latents.shape[0] == 1 and np.isfinite(latents).all()
                pipe.save_pretrained(tmp_path)
                loaded = QwenImagePipeline.from_pretrained(tmp_path)
                loaded.set_progress_bar_config(disable=True)
                np.testing.assert_allclose(
                    generate(loaded, prompt=prompts[0], negative_prompt=negatives[0], generator=seeds(0),
                             num_inference_steps=steps), uncached, atol=TOLERANCE, rtol=0)
        finally:
            levers.optimize(pipe, Profile(), undoable_only=True, workload=workload)


# ---- FP8: weights diffusers cannot convert or save ------------------------------------------------------------

def test_fp8_serves_batches_and_refuses_dtype_moves_and_saving_in_one_line(tmp_path):
    """torchao's FP8 weight-only quantization runs on the CPU too (the other FP8 modes need a GPU). Its weights
    stay in the model's dtype whatever `.to(dtype)` asks and cannot be saved: both calls are refused before any
    component moved or any file was written."""
    pytest.importorskip("torchao")
    pipe = models.load_model("tiny", "cpu", "bfloat16").pipe
    levers.optimize(pipe, Profile(quantization="fp8_weight_only", cfg_batching=True), workload=WORKLOAD)
    prompts = ["a red fox in the snow", "a house"]
    together = generate(pipe, prompt=prompts, generator=[torch.Generator("cpu").manual_seed(seed) for seed in (0, 1)])
    alone = generate(pipe, prompt=prompts[1], generator=torch.Generator("cpu").manual_seed(1))
    np.testing.assert_allclose(together[1], alone[0], atol=1e-2, rtol=0)  # bf16: a batch rounds otherwise
    assert cfg_batching.interception(pipe.transformer).batched_calls == 2 * STEPS

    for move in (lambda: pipe.to(torch.float32), lambda: pipe.to("cpu", torch.float16),
                 lambda: pipe.to(dtype=torch.float32), lambda: pipe.transformer.to(torch.float32)):
        with pytest.raises(UsageError, match=r"^quantization 'fp8_weight_only': to\(torch\.float\d+\) cannot convert "
                                             "the FP8 weights; build the pipeline in float"):
            move()
    assert {p.dtype for p in pipe.vae.parameters()} | {p.dtype for p in pipe.transformer.parameters()} == {
        torch.bfloat16}  # nothing moved
    pipe.to(torch.bfloat16)  # its own dtype: nothing to convert
    for save in (pipe.save_pretrained, pipe.transformer.save_pretrained):
        with pytest.raises(UsageError, match="^quantization 'fp8_weight_only': save_pretrained cannot write the FP8 "
                                             "weights; save the pipeline before applying the profile"):
            save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.to("meta")  # device moves go through
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}

    # The refusals go with the quantized transformer, and do not keep it alive: the pool frees it before it
    # builds the next, and two full-size transformers do not fit on one card.
    quantized = weakref.ref(pipe.transformer)
    levers.optimize(pipe, Profile(), undoable_only=True)
    pipe.transformer = None
    gc.collect()
    assert quantized() is None
    pipe.transformer = models.load_model("tiny", "cpu", "bfloat16").pipe.transformer
    pipe.to(torch.float32)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}


# ---- a pipeline without a transformer ---------------------------------------------------------------------

@pytest.fixture
def encode_only():
    from diffusers import QwenImagePipeline

    pipe = models.load_model("tiny", "cpu", "float32").pipe
    return QwenImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                             tokenizer=pipe.tokenizer, transformer=None)


def test_default_profile_works_on_a_pipeline_without_a_transformer(encode_only, plain):
    levers.optimize(encode_only, Profile(), workload=WORKLOAD)
    embeds, _ = encode_only.encode_prompt("a red fox", device="cpu")
    expected, _ = plain.encode_prompt("a red fox", device="cpu")
    assert torch.equal(embeds, expected)
    try:  # process-wide levers need no transformer
        levers.optimize(encode_only, Profile(real_rope=True), workload=WORKLOAD)
        assert rope.enabled()
    finally:
        levers.apply_real_rope(encode_only, Profile())


@pytest.mark.parametrize("profile, message", [
    (Profile(attention_backend="_native_math"), "profile.attention_backend = '_native_math'"),
    (Profile(cfg_batching=True), "profile.cfg_batching = True"),
    (Profile(compile="regional"), "profile.compile = 'regional'"),
    (Profile(cache="first_block", cache_threshold=0.1), "profile.cache = 'first_block'"),
    (Profile(quantization="fp8_rowwise"), "profile.quantization = 'fp8_rowwise'"),
], ids=["attention", "cfg_batching", "compile", "cache", "quantization"])
def test_a_lever_that_changes_the_transformer_is_refused_without_one(encode_only, profile, message):
    with pytest.raises(UsageError) as refused:
        levers.optimize(encode_only, profile, workload=WORKLOAD)
    assert str(refused.value) == (f"{message} changes the pipeline's transformer, and this pipeline has none "
                                  "(transformer=None)")
    assert "encode_prompt" not in vars(encode_only)
