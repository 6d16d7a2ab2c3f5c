import pytest
import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def free_the_card():
    """Each test's pipelines go with it: compiled graphs and cache hooks keep a 40 GB transformer alive after
    `del model`, and two of them left behind ran the next file's tests out of memory on a 141 GB H200."""
    yield
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
