import os

import pytest

from qwendoctor import lockfile
from qwendoctor.errors import LockfileError
from qwendoctor.profile import Profile, Workload


def make_lock(**changes):
    fields = dict(
        fingerprint={"device": "cpu", "torch": "2.13.0", "model_id": "tiny", "model_revision": "config-abc",
                     "attention_packages": {}},
        workload=Workload(model="tiny", width=128, height=128, dtype="float32"),
        profile=Profile(attention_backend="_native_math", cache="first_block", cache_threshold=0.1, steps=30),
        measured={"latency_median_s": 0.3, "latency_p90_s": 0.35, "step_ms": 6.1, "psnr_db": float("inf"),
                  "ssim": 1.0, "speedup": 2.0},
        baseline={"latency_median_s": 0.6, "step_ms": 9.0},
        study={"name": "qwendoctor-tiny-x", "storage": "sqlite:///s.db", "trials": 12, "best_trial": 5,
               "floor": "balanced", "floor_psnr_db": 30.0, "floor_ssim": 0.9},
    )
    fields.update(changes)
    return lockfile.Lock(**fields)


def test_round_trip(tmp_path):
    path = tmp_path / "qwendoctor.lock"
    lock = make_lock()
    lockfile.write_lock(path, lock)
    assert lockfile.read_lock(path) == lock
    assert 'schema_version = 1' in path.read_text()


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "qwendoctor.lock"
    lockfile.write_lock(path, make_lock())
    before = path.read_text()

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        lockfile.write_lock(path, make_lock(measured={"latency_median_s": 9.0, "step_ms": 1.0}))
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwendoctor.lock"]


def test_missing_lock(tmp_path):
    with pytest.raises(LockfileError, match="no such lock file; run `qwendoctor tune`"):
        lockfile.read_lock(tmp_path / "nope.lock")


def test_not_toml(tmp_path):
    path = tmp_path / "bad.lock"
    path.write_text("this is [not toml")
    with pytest.raises(LockfileError, match="not valid TOML"):
        lockfile.read_lock(path)


def _mutated(tmp_path, old, new):
    text = make_lock().to_toml()
    assert old in text, old
    path = tmp_path / "q.lock"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, message", [
    ("schema_version = 1", "schema_version = 7", "schema_version: 7 is not supported"),
    ("schema_version = 1", "", "schema_version: missing"),
    ('attention_backend = "_native_math"', 'attention_backend = "warp"', "profile.attention_backend: 'warp'"),
    ("steps = 30", "steps = 0", "profile.steps"),
    ("steps = 30", 'steps = "many"', "profile.steps"),
    ("cache_threshold = 0.1", "cache_threshold = 3.0", "profile.cache_threshold"),
    ("width = 128", "width = 100", "workload.width must be a positive multiple of 16"),
    ('dtype = "float32"', 'dtype = "int8"', "workload.dtype"),
    ("latency_median_s = 0.3", "latency_median_s = -1.0", "measured.latency_median_s: must be a non-negative"),
    ("latency_median_s = 0.3", "", "measured.latency_median_s: missing"),
    ("step_ms = 6.1", 'step_ms = "fast"', "measured.step_ms"),
    ("speedup = 2.0", "speedup = 2.0\nwarp_factor = 9", "measured.warp_factor: unknown field"),
    ('torch = "2.13.0"', "torch = 2", "fingerprint.torch: missing or not a string"),
    ("best_trial = 5", 'best_trial = "five"', "study.best_trial: expected int"),
    ("best_trial = 5", 'best_trial = 5\nquality = "perfect"', "study.quality: 'perfect' is not one of lossless"),
    ("best_trial = 5", 'best_trial = 5\nlossless_speedup = "1.2"', "study.lossless_speedup: expected float"),
    ("[profile]", "[profile]\nturbo = true", "profile.turbo: unknown field"),
    ("[baseline]", "[baseline]\nflavour = 1", "baseline.flavour: unknown field"),
])
def test_each_validation_error_names_the_field(tmp_path, old, new, message):
    with pytest.raises(LockfileError) as error:
        lockfile.read_lock(_mutated(tmp_path, old, new))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_table(tmp_path):
    path = tmp_path / "q.lock"
    path.write_text('schema_version = 1\ncreated = "x"\nqwendoctor_version = "0.1.0"\n')
    with pytest.raises(LockfileError, match="fingerprint: missing table"):
        lockfile.read_lock(path)


def test_writer_refuses_an_invalid_lock(tmp_path):
    with pytest.raises(LockfileError, match="measured.latency_median_s"):
        lockfile.write_lock(tmp_path / "q.lock", make_lock(measured={"step_ms": 1.0}))
    assert not (tmp_path / "q.lock").exists()
