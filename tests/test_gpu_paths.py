"""What a GPU run uses, checked on the CPU: torch.compile of the LLM blocks (train.py --compile; inductor's C++
backend here, Triton there).

Compiling is the slow part (inductor writes and builds C++ for each graph: ~30 s for this file's graphs with an
empty cache, a few seconds once /tmp/torchinductor_* holds them), so one compiled model serves the tests."""
import copy
import json

import pytest
import torch

import train
from generate import generate
from model import LLM, KVCache, Block, LLMConfig


# ----------------------------------------------------------------------------------------------
# torch.compile of an LLM block (train.prepare compiles each one under --compile)

def block_inputs(llm: LLM, T: int = 16):
    """(x, cos, sin) of a (2, T) batch entering the first block."""
    x = llm.embed_tokens(torch.randint(0, llm.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0)))
    cos, sin = llm.rotary(torch.arange(T)[None], x.dtype)
    return x, cos, sin


class BreakingBlock(Block):
    """A block with a graph break in the middle: what the count must see (the negative control)."""

    def forward(self, x, *args):
        x = x * 1.0
        torch._dynamo.graph_break()
        return super().forward(x, *args)


@torch.no_grad()
def test_an_llm_block_compiles_without_graph_breaks():
    """torch._dynamo.explain on one block as each caller calls it: training (no cache), prefill (writes its keys
    to the cache from slot 0) and LLM.decode_step (one token, the slot a tensor). One graph each, no breaks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    llm = LLM(LLMConfig.from_name("tiny", n_layers=2)).eval()
    x, cos, sin = block_inputs(llm)
    cache = KVCache(llm.cfg, 2, 32)
    calls = {"training": (x, cos, sin, None, True),
             "prefill": (x, cos, sin, None, True, cache, 1, 0),
             "decode step": (x[:, :1], cos[:, :1], sin[:, :1], cache.valid[:, None, None, :], False, cache, 1,
                             cache.slot)}
    for name, args in calls.items():
        found = torch._dynamo.explain(llm.layers[1])(*args)
        print(f"\n{name}: {found.graph_count} graph(s), {found.graph_break_count} graph break(s)")
        assert (found.graph_count, found.graph_break_count) == (1, 0), found.break_reasons
    breaking = BreakingBlock(llm.cfg).eval()
    assert torch._dynamo.explain(breaking)(*calls["training"]).graph_break_count == 1  # the count sees breaks
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compiled_pair():
    """(eager LLM, the same weights with each block compiled as train.prepare compiles them)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LLM(LLMConfig.from_name("tiny", n_layers=2)).eval()
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile()
    yield eager, compiled
    torch._dynamo.reset()


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_compiled_blocks_give_the_eager_logits_within_fp32_rounding(compiled_pair):
    """Inductor fuses and reorders the sums, so the logits differ by rounding only: measured 2.5e-7 of their
    scale (about 2 fp32 ulps at the largest logit); asserted <= 1e-5. Negative control: a weight of the compiled
    model changed by 1e-3 moves them past that."""
    eager, compiled = compiled_pair
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    err = relative(compiled(ids), eager(ids))
    print(f"\ncompiled vs eager logits: {err:.1e} of their scale")
    assert err <= 1e-5
    w = compiled.layers[0].mlp.down_proj.weight
    w[0, 0] += 1e-3
    try:
        assert relative(compiled(ids), eager(ids)) > 1e-5
    finally:
        w[0, 0] -= 1e-3


def test_compiled_blocks_generate_the_eager_greedy_tokens(compiled_pair):
    """Greedy generation through the compiled blocks (prefill, then LLM.decode_step: the block compiles once per
    layer for each, as the layer index picks the cache row): the same 24 tokens as eager, both samples."""
    eager, compiled = compiled_pair
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    theirs = generate(eager, ids, max_new_tokens=24, stop_ids=())
    assert generate(compiled, ids, max_new_tokens=24, stop_ids=()) == theirs and len(theirs[0]) == 24


def test_train_with_compile_runs_and_follows_eager(tmp_path, monkeypatch):
    """train.py --compile (each LLM block compiled, forward and backward) for 3 steps of the tiny synthetic task:
    the blocks do run compiled (one graph serves all four), with no graph break, and the losses are eager's within
    fp32 rounding (measured: step 1 equal, then 5e-8 relative; asserted 1e-5)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(train, "install_signal_handlers", lambda: None)
    torch._dynamo.reset()
    counters.clear()
    args = ["--synthetic-size", "64", "--global-batch", "8", "--micro-batch", "4", "--eval-samples", "0",
            "--vision-steps", "0", "--log-every", "1", "--stage", "pretrain", "--resume", "none", "--threads", "1",
            "--steps", "3"]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        train.main(args + ["--out", str(tmp_path / name), *extra])
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    print(f"\nlosses eager {losses['eager']}\n     compiled {losses['compiled']}; "
          f"graphs {dict(counters['stats'])}, breaks {dict(counters['graph_break'])}")
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert len(losses["compiled"]) == 3
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(losses["eager"], losses["compiled"]))
    torch._dynamo.reset()
