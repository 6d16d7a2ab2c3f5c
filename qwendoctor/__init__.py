"""qwendoctor: measure, tune and run Qwen-Image as fast as this machine allows."""

__version__ = "0.1.0"


def load_pipeline(lock_path="qwendoctor.lock", *, ignore_fingerprint: bool = False):
    """The tuned pipeline a lock describes, as a `qwendoctor.generate.TunedPipeline` (call it with a prompt).

    Refuses a lock tuned on another machine or software stack unless `ignore_fingerprint` is set.
    """
    from qwendoctor.generate import load_tuned
    from qwendoctor.noise import quiet_import_noise

    quiet_import_noise()  # as quiet as the CLI

    return load_tuned(lock_path, ignore_fingerprint=ignore_fingerprint)


def apply(pipe, profile, *, workload=None, ignore_fingerprint: bool = False):
    """Apply a profile to a diffusers pipeline you built, in place, and return it: `profile` is a
    `qwendoctor.profile.Profile`, a `name=value,...` string (`"compile=regional,cfg_batching=true"`) or a lock's
    path. The checks are `generate`'s; bad input raises a one-line `qwendoctor.errors.UsageError`.

    The whole contract (workload, fingerprint, what stays a call argument): `qwendoctor.own_pipeline.apply`.
    """
    from qwendoctor.noise import quiet_import_noise
    from qwendoctor.own_pipeline import apply as apply_profile

    quiet_import_noise()  # as quiet as the CLI

    return apply_profile(pipe, profile, workload=workload, ignore_fingerprint=ignore_fingerprint)
