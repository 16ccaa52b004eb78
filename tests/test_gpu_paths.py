"""What a GPU run uses, checked on the CPU: torch.compile of the LLM blocks (train.py --compile; inductor's C++
backend here, Triton there), the memory that activation checkpointing of the tower saves, and device_check.py
(its dry run at tiny sizes).

Compiling is the slow part (inductor writes and builds C++ for each graph: the compile tests took 130 s with an
empty cache on a busy 2-core machine, 20 s once /tmp/torchinductor_* holds the graphs), so one compiled model
serves them. The dry run of device_check.py takes about a minute (four subprocesses, a torchrun launch among them);
its JSON serves two tests."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from generate import generate
from model import LLM, KVCache, Block, LLMConfig

REPO = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------------------------
# device_check.py: its dry run (every step at tiny sizes on the CPU), and the tower's checkpointing memory

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "device_check.json"
    done = subprocess.run([sys.executable, "device_check.py", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout[done.stdout.index("device_check on"):])
    return json.loads(out.read_text())


def test_device_check_dry_run_fills_every_figure(dry_run):
    """The keys a GPU run fills, with sane values: the plumbing of each step (pytest's report, torchrun and
    train.py's log, bench.py's JSON, the memory children) works before a GPU is spent on it."""
    r = dry_run
    assert r["ok"] and r["dry_run"] and r["kind"] == "cpu" and 0 < r["seconds"] < 300
    assert set(r["steps"]) == {"parity", "two_ranks", "bench", "memory"}
    assert all(s["status"] == "passed" and s["seconds"] > 0 for s in r["steps"].values())
    parity = r["steps"]["parity"]
    assert (parity["passed"], parity["failed"]) == (1, 0)  # the vision test: the plumbing (the suite runs the rest)
    assert all(t["outcome"] == "passed" and any("of their scale" in line for line in t["printed"])
               for t in parity["tests"])
    fsdp = r["steps"]["two_ranks"]["runs"]["fsdp"]
    assert fsdp["backend"] == "gloo" and len(fsdp["losses"]) == 2 and fsdp["losses"][1] < fsdp["losses"][0]
    assert fsdp["tokens_per_s"] > 0
    b = r["steps"]["bench"]
    assert b["plan"]["llm"] == "tiny-phi3" and b["training"]["flops_per_step"] > 0 and 0 < b["training"]["mfu"] < 1
    for kind in ("eager", "compiled"):
        d = b[f"decode_{kind}"]
        assert d["ms_per_token"] > 0 and d["bytes_per_token"] > 0 and 0 < d["roofline_share"] < 1
    assert b["ttft"]["seconds"] > 0 and b["ttft"]["prompt_tokens"] == 40 + 5  # 41 ids, <image> -> 5 tokens (64 px)
    m = r["steps"]["memory"]
    assert (m["tower"], m["image_size"]) == ("tiny", 768)
    assert m["without_checkpointing_bytes"] > 0 and m["with_checkpointing_bytes"] > 0


def saved_bytes(forward) -> tuple[int, object]:
    """(bytes of the tensors autograd keeps for backward in forward(), each storage once; what it returned)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def test_activation_checkpointing_of_the_whole_model_gives_the_same_gradients(monkeypatch):
    """FlorenceVL.set_activation_checkpointing recomputes every DaViT block, encoder layer and LLM block (counted
    where each module calls torch.utils.checkpoint; test_davit.py covers DaViT's gradients alone): one step of the
    tiny model on synthetic data gives every parameter the gradient it gets without (measured: identical;
    asserted 1e-6), and autograd keeps less for backward (measured 22.5 -> 2.7 MiB)."""
    import davit
    import florence_encoder
    import model as llm_module
    calls = {}
    for module in (davit, florence_encoder, llm_module):
        def counted(fn, *args, name=module.__name__, checkpoint=module.checkpoint, **kw):
            calls[name] = calls.get(name, 0) + 1
            return checkpoint(fn, *args, **kw)
        monkeypatch.setattr(module, "checkpoint", counted)
    torch.manual_seed(0)
    cfg = train.parse_args(["--synthetic-size", "8"])
    model = train.build_model(cfg).set_stage("pretrain").train()
    data = train.stage_dataset(cfg, train.SyntheticTask(cfg), model, "pretrain")
    b = train.collate([data[i] for i in range(4)], model.tokenizer.token_to_id(train.PAD_TOKEN))
    grads, kept = {}, {}
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.zero_grad(set_to_none=True)
        kept[on], out = saved_bytes(lambda: model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]))
        out.loss_sum.backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {"davit": sum(model.cfg.vision.vision.depths), "florence_encoder": model.cfg.vision.encoder_layers,
                     "model": model.cfg.llm.n_layers}, calls
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) == len(list(model.parameters()))
    worst = max((grads[False][n] - grads[True][n]).abs().max().item() for n in grads[True])
    print(f"\ncheckpointed vs not: largest gradient difference {worst:.1e}; saved for backward "
          f"{kept[False] / 2**20:.1f} -> {kept[True] / 2**20:.1f} MiB; checkpointed calls {calls}")
    assert worst <= 1e-6 and kept[True] < kept[False] / 2


def test_tower_checkpointing_lowers_what_a_training_step_holds(dry_run):
    """The tiny tower at 768 px. Autograd keeps 8x less for backward with the DaViT blocks and encoder layers
    checkpointed (measured 192 -> 23 MiB; asserted <= 1/4). The peak of the whole step falls less (the dry run's
    children: measured 244 -> 217 MiB, 0.89x; asserted <= 0.95x): backward recomputes one block at a time, and
    the first stage's single block, on the 192 x 192 grid, holds most of the activations."""
    from florence_encoder import FlorenceConfig, FlorenceVision
    torch.manual_seed(0)
    tower = FlorenceVision(FlorenceConfig.from_name("tiny", image_size=768, max_position_embeddings=1024)).train()
    pixels = torch.randn(1, 3, 768, 768)
    kept = {}
    for on in (False, True):
        tower.vision_tower.grad_checkpointing = tower.encoder.grad_checkpointing = on
        kept[on], _ = saved_bytes(lambda: torch.cat(tower.multi_prompt_features(pixels), dim=-1).square().mean())
    m = dry_run["steps"]["memory"]
    print(f"\nsaved for backward {kept[False] / 2**20:.0f} -> {kept[True] / 2**20:.0f} MiB; peak of the step "
          f"{m['without_checkpointing_bytes'] / 2**20:.0f} -> {m['with_checkpointing_bytes'] / 2**20:.0f} MiB")
    assert kept[True] <= kept[False] / 4
    assert m["with_checkpointing_bytes"] <= 0.95 * m["without_checkpointing_bytes"]
