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
