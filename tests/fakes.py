"""Fakes shared by the probe tests."""

import importlib


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
