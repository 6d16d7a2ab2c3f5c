import sys

import pytest

from qwendoctor import compile_stats


def test_nothing_is_counted_before_torch_compiled_anything(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch._dynamo.utils", raising=False)
    assert compile_stats.snapshot() == {}
    assert compile_stats.since({}) == {}


def test_describe_names_graphs_seconds_and_the_cache():
    line = compile_stats.describe({"graphs": 60, "frames": 60, "compile_s": 118.4, "trace_s": 40.0,
                                   "inductor_s": 61.2, "fx_cache_hits": 59, "fx_cache_misses": 1})
    assert line == ("60 graphs captured, compile 118.4 s (tracing 40.0 s, inductor 61.2 s), "
                    "FX graph cache 59 hit(s) / 1 miss(es)")
    assert compile_stats.describe({}) == "nothing compiled"


def test_identical_blocks_compiled_one_by_one_are_one_graph():
    """What regional compile relies on, and what the per-trial record would show going wrong: three blocks of
    one class, each compiled on its own, share one captured graph; a new input shape adds one more."""
    torch = pytest.importorskip("torch")
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # no worker pool for one small graph

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.gelu(self.linear(x))

    blocks = [Block() for _ in range(3)]
    for block in blocks:
        block.compile()
    before = compile_stats.snapshot()
    with torch.no_grad():
        x = torch.randn(2, 8)
        for block in blocks:
            x = block(x)
    stats = compile_stats.since(before)
    assert stats["graphs"] == 1 and stats["compile_s"] > 0
    assert stats["inductor_s"] <= stats["compile_s"]
    again = compile_stats.snapshot()
    with torch.no_grad():
        for block in blocks:
            block(torch.randn(2, 8))
    assert compile_stats.since(again) == {}  # nothing new to compile


def test_a_dynamo_reset_in_between_counts_from_zero():
    torch = pytest.importorskip("torch")
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    torch.compile(lambda x: x * 3 + 1)(torch.randn(4))
    before = compile_stats.snapshot()
    assert before["graphs"] >= 1
    torch._dynamo.reset()  # what the tuner's pool does when it replaces a compiled transformer
    torch.compile(lambda x: x * 5 - 1)(torch.randn(4))
    stats = compile_stats.since(before)
    assert stats["graphs"] == 1 and all(value >= 0 for value in stats.values())
