"""Fakes shared by the probe tests."""

import importlib
import time


def fake_import(**modules):
    """import_module that serves fakes by dotted name (`diffusers__hooks` for diffusers.hooks); an
    Exception value is raised; everything else is the real import."""
    table = {name.replace("__", "."): mod for name, mod in modules.items()}

    def import_module(name):
        if name in table:
            if isinstance(table[name], BaseException):
                raise table[name]
            return table[name]
        return importlib.import_module(name)

    return import_module


class FakeEvent:
    """torch.cuda.Event on the host clock: elapsed_time in ms between two records."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3
