import os
import sys


def probe(ctx):
    sys.stderr.write("loading libfoo.so\nImportError: libcudart.so.13: cannot open shared object file\n")
    sys.stderr.flush()
    os._exit(3)
