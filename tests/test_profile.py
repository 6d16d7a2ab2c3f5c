import pytest

from probes.workload import WorkloadError
from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.profile import Capabilities, Profile, Workload, check_runnable

CPU = Capabilities(device="cpu")
H100 = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True)
A100 = Capabilities(device="cuda", compute_capability=(8, 0), has_torchao=True)
BF16 = Workload(model="synthetic", dtype="bfloat16")


def test_default_profile_is_valid_and_describes_itself():
    assert Profile().validate().describe() == "attn=native"


@pytest.mark.parametrize("fields, message", [
    ({"attention_backend": "fastest"}, "profile.attention_backend: 'fastest' is not one of"),
    ({"compile": "fast"}, "profile.compile: 'fast' is not one of"),
    ({"quantization": "int3"}, "profile.quantization"),
    ({"steps": 1}, "profile.steps: must be an integer >= 2"),
    ({"steps": True}, "profile.steps"),
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "needs compile = regional or full"),
    ({"compile": "regional", "compile_mode": "reduce-overhead"},
     "profile.compile_mode: reduce-overhead needs compile = full: under regional compile each block's call starts"),
    ({"compile": "full", "compile_mode": "reduce-overhead", "offload": "model"},
     "profile.compile_mode: reduce-overhead with offload=model: offload moves the weights"),
    ({"compile": "full", "compile_mode": "reduce-overhead", "weight_storage": "fp8_storage"},
     "profile.compile_mode: reduce-overhead with weight_storage=fp8_storage: it breaks the compiled graph"),
    ({"cache": "first_block"}, "profile.cache_threshold: must be in (0, 1]"),
    ({"cache": "first_block", "cache_threshold": 1.5}, "profile.cache_threshold"),
    ({"cache_threshold": 0.1}, "set without a cache"),
    ({"cache": "first_block", "cache_threshold": 0.1, "compile": "regional"}, "cannot be combined with compile"),
    ({"tf32": "yes"}, "profile.tf32"),
])
def test_invalid_profiles_raise_naming_the_field(fields, message):
    with pytest.raises(UsageError, match=None) as error:
        Profile(**fields).validate()
    assert message in str(error.value)


@pytest.mark.parametrize("fields, message", [
    ({"width": 1000}, "width must be a positive multiple of 16, got 1000"),
    ({"height": 0}, "height must be a positive multiple of 16"),
    ({"reference_steps": 1}, "steps must be an integer >= 2"),
    ({"reference_steps": -3}, "steps must be an integer >= 2"),
    ({"true_cfg_scale": 0.5}, "true_cfg_scale must be >= 1"),
    ({"dtype": "float16"}, "workload.dtype"),
    ({"loras": ("style.safetensors",)}, "workload.loras: must be LoRA entries"),
])
def test_invalid_workloads_raise(fields, message):
    with pytest.raises(WorkloadError) as error:
        Workload(**fields).validate()
    assert message in str(error.value)


def test_fp8_is_refused_on_cpu_and_old_gpus_before_loading():
    fp8 = Profile(quantization="fp8_rowwise")
    with pytest.raises(UnavailableLever, match="needs a CUDA GPU"):
        check_runnable(fp8, BF16, CPU)
    with pytest.raises(UnavailableLever, match="compute capability >= 8.9, this GPU has 8.0"):
        check_runnable(fp8, BF16, A100)
    with pytest.raises(UnavailableLever, match="needs torchao"):
        check_runnable(fp8, BF16, Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=False))
    check_runnable(fp8, BF16, H100)
    assert H100.has_fp8 and not A100.has_fp8 and not CPU.has_fp8


def test_gpu_only_levers_are_refused_on_cpu():
    with pytest.raises(UnavailableLever, match="tf32"):
        check_runnable(Profile(tf32=True), Workload(), CPU)
    for backend in ("_native_cudnn", "_native_efficient", "flash", "_flash_3", "fa4"):
        with pytest.raises(UnavailableLever, match=f"attention backend '{backend}' needs a CUDA GPU"):
            check_runnable(Profile(attention_backend=backend), Workload(), CPU)
        check_runnable(Profile(attention_backend=backend), Workload(), H100)
    for backend in ("native", "_native_math", "_native_flash", "flex"):  # SDPA and flex have CPU kernels
        check_runnable(Profile(attention_backend=backend), Workload(), CPU)


def test_attention_backend_must_have_passed_the_probe():
    probed = Capabilities(device="cpu", working_attention_backends=("native", "_native_math"))
    check_runnable(Profile(attention_backend="_native_math"), Workload(), probed)
    with pytest.raises(UnavailableLever, match="did not pass the check"):
        check_runnable(Profile(attention_backend="flex"), Workload(), probed)


def test_profile_round_trips_through_dict():
    profile = Profile(attention_backend="_native_cudnn", compile="regional", compile_mode="max-autotune-no-cudagraphs",
                      quantization="fp8_rowwise", tf32=True, steps=30)
    assert Profile.from_dict(profile.to_dict()) == profile
    cached = Profile(cache="first_block", cache_threshold=0.12)
    assert Profile.from_dict(cached.to_dict()) == cached
