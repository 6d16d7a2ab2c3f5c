"""`qwendoctor.apply(pipe, profile)`: a profile applied to a pipeline the user built, on the tiny model, with the
checks `generate` makes and one-line errors for bad input."""

from pathlib import Path

import numpy as np
import pytest

import qwendoctor
from qwendoctor import fingerprint, lockfile, models, runner
from qwendoctor.errors import LockfileError, QwendoctorError, UnavailableLever, UsageError
from qwendoctor.levers import cfg_batching, fused_qkv
from qwendoctor.profile import Profile, Workload

WORKLOAD = Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32")


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


@pytest.fixture
def tiny_lock(tmp_path, fresh_tiny):
    """A lock for the tiny model on this machine, as tune would write it."""
    lock = lockfile.Lock(fingerprint=fingerprint.machine_fingerprint("tiny", fresh_tiny.revision), workload=WORKLOAD,
                         profile=Profile(attention_backend="_native_math", fused_qkv=True, steps=2),
                         measured={"latency_median_s": 0.1, "step_ms": 5.0})
    path = tmp_path / "qwendoctor.lock"
    lockfile.write_lock(path, lock)
    return path


def _attention_backends(pipe) -> set:
    return {getattr(b, "value", b) for b in (getattr(m.processor, "_attention_backend", None)
                                             for m in pipe.transformer.modules() if hasattr(m, "processor"))}


def _fused(pipe) -> bool:
    attentions = [m for m in pipe.transformer.modules() if hasattr(m, "processor")]
    return bool(attentions) and all(fused_qkv.is_fused(m) for m in attentions)


def test_apply_is_public_beside_load_pipeline():
    assert callable(qwendoctor.apply) and callable(qwendoctor.load_pipeline)
    assert "Profile" in qwendoctor.apply.__doc__ and "lock" in qwendoctor.apply.__doc__


def test_apply_with_a_profile_changes_the_pipeline_and_returns_it(fresh_tiny):
    reference = runner.render(fresh_tiny, WORKLOAD, Profile(), "a fox", 0)
    pipe = fresh_tiny.pipe
    assert qwendoctor.apply(pipe, Profile(attention_backend="_native_math", fused_qkv=True)) is pipe
    assert _attention_backends(pipe) == {"_native_math"} and _fused(pipe)
    image = runner.render(fresh_tiny, WORKLOAD, Profile(), "a fox", 0)
    assert np.abs(image - reference).max() < 1e-3  # the same model, rounding apart


def test_apply_with_a_string_parses_it_as_profile_from_text(fresh_tiny):
    pipe = qwendoctor.apply(fresh_tiny.pipe, "cfg_batching=true, vae_decode=tiled")
    assert cfg_batching.interception(pipe.transformer) is not None
    assert pipe.vae.use_tiling
    # Without a workload none is recorded on the pipeline: the user's calls decide steps and CFG.
    assert getattr(pipe, "_qwendoctor_workload", None) is None


@pytest.mark.parametrize("as_path", [str, Path])
def test_apply_with_a_lock_path_applies_its_profile_and_its_workload(fresh_tiny, tiny_lock, as_path):
    pipe = qwendoctor.apply(fresh_tiny.pipe, as_path(tiny_lock))
    assert _attention_backends(pipe) == {"_native_math"} and _fused(pipe)
    assert pipe._qwendoctor_workload == WORKLOAD


def test_a_lock_from_another_setup_is_refused_as_generate_refuses_it(fresh_tiny, tiny_lock):
    lock = lockfile.read_lock(tiny_lock)
    lock.fingerprint["torch"] = "2.5.0"
    lockfile.write_lock(tiny_lock, lock)
    with pytest.raises(QwendoctorError, match=r"tuned on another setup \(torch: lock 2\.5\.0") as refused:
        qwendoctor.apply(fresh_tiny.pipe, tiny_lock)
    assert "\n" not in str(refused.value) and _attention_backends(fresh_tiny.pipe) != {"_native_math"}
    qwendoctor.apply(fresh_tiny.pipe, tiny_lock, ignore_fingerprint=True)
    assert _attention_backends(fresh_tiny.pipe) == {"_native_math"}


@pytest.mark.parametrize("profile, error, message", [
    ("compile=fast", UsageError, r"^profile\.compile: 'fast' is not one of none, regional, full$"),
    ("speed=3", UsageError, r"^profile\.speed: unknown field$"),
    ("regional", UsageError, r"^profile 'regional': expected name=value pairs separated by commas, got 'regional'$"),
    ("cache=first_block,compile=regional,cache_threshold=0.1", UsageError,
     r"^profile: cache 'first_block' cannot be combined with compile 'regional'"),
    ("missing.lock", LockfileError, r"^missing\.lock: no such lock file"),
    (42, UsageError, r"^profile: expected a Profile, a name=value,\.\.\. string or a lock path, got int$"),
    # What this machine cannot run is refused before the pipeline is touched, as generate refuses it.
    ("attention_backend=sageattn", UnavailableLever, r"^attention backend 'sageattn' needs a CUDA GPU"),
])
def test_bad_input_is_one_line_and_leaves_the_pipeline_alone(fresh_tiny, profile, error, message):
    with pytest.raises(error, match=message) as refused:
        qwendoctor.apply(fresh_tiny.pipe, profile)
    assert "\n" not in str(refused.value)
    assert _attention_backends(fresh_tiny.pipe) != {"sageattn"} and not _fused(fresh_tiny.pipe)


def test_an_invalid_lock_is_one_line(fresh_tiny, tiny_lock, tmp_path):
    broken = tmp_path / "broken.lock"
    broken.write_text("this is [not toml\n")
    with pytest.raises(LockfileError, match=r"broken\.lock: not valid TOML") as refused:
        qwendoctor.apply(fresh_tiny.pipe, broken)
    assert "\n" not in str(refused.value)
    unknown = tmp_path / "unknown.lock"
    unknown.write_text(tiny_lock.read_text().replace("[profile]\n", "[profile]\nspeed = 3\n"))
    with pytest.raises(LockfileError, match=r"profile\.speed: unknown field") as refused:
        qwendoctor.apply(fresh_tiny.pipe, str(unknown))
    assert "\n" not in str(refused.value)


def test_a_workload_is_checked_and_handed_to_the_levers(fresh_tiny, tiny_lock):
    no_cfg = Workload(model="tiny", width=128, height=128, reference_steps=3, dtype="float32", true_cfg_scale=1.0)
    with pytest.raises(UsageError, match="profile.cfg_batching batches true CFG's two passes; this workload has no"):
        qwendoctor.apply(fresh_tiny.pipe, "cfg_batching=true", workload=no_cfg)
    with pytest.raises(UsageError, match=r"^workload: a lock brings the workload it was tuned for"):
        qwendoctor.apply(fresh_tiny.pipe, tiny_lock, workload=WORKLOAD)
    with pytest.raises(UsageError, match=r"^width must be a positive multiple of 16"):
        qwendoctor.apply(fresh_tiny.pipe, Profile(), workload=Workload(model="tiny", width=100, dtype="float32"))
    pipe = qwendoctor.apply(fresh_tiny.pipe, Profile(), workload=WORKLOAD)
    assert pipe._qwendoctor_workload == WORKLOAD

