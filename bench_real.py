"""bench.py's cases 6-7: Florence-VL at its real sizes on one machine (CPU, bf16 and int8), against what a user of
the official code would run instead. bench.py imports this file for them (this file does not import bench.py: the
reference builders both use are in tests/helpers.py); `python bench.py --help` says what each measures, and so do
the docstrings of case_real_bf16 and case_real_int8 below. Case 8 (loading at full size) is bench_loading.py.

The two sides are built from the same random weights: transformers builds its models once (bf16, every
weight drawn away from its init), and ours is given the very tensors (FlorenceVision.from_state_dict and
LLM.load_hf_shards take them as they are: Phi-3's fused qkv_proj / gate_up_proj, the norms, the embeddings
are stored alike; the projector's Linears are handed over), so both fit in memory together: one 3B model's
worth of weights, not two. What is not shared: our tower holds no Florence-2 decoder (transformers' does).

Peak memory is measured in child processes (tests/memory.py: VmHWM of a fresh process), one per side, each
building its side the way it would be built on its own: transformers' models from a random init in bf16, ours
streamed from random tensors one at a time into a model built on the meta device (int8: each LLM Linear
quantized as it arrives, as FlorenceVL.from_pretrained does), then one TTFT.
"""
import gc
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import release_freed_memory
from florence_encoder import FlorenceConfig, FlorenceVision, cosine_table, prompt_ids
from fusion import IGNORE_INDEX, IMAGE_TOKEN_INDEX, FlorenceVL, FlorenceVLConfig
from model import LLM, KVCache, LLMConfig, cache_dtype
from quantize import Int8Linear

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import (FLORENCE_IMAGE_TOKEN, florence2_hf_config, phi3_hf_config, reference_features,  # noqa: E402
                     reference_splice)
from memory import measure  # noqa: E402

GiB = 2**30
BF16 = torch.bfloat16
# The issue's floor for one TTFT at 3B (TFLOP): one Florence-2-large DaViT pass at 768 px, the BART encoder over
# the three (image, prompt) samples, the Phi-3.5-mini prefill of ~620 tokens (2 x parameters x tokens)
ISSUE_TFLOP = {"DaViT (one pass)": 1.4, "encoder (3 prompts)": 0.5, "LLM prefill": 4.6}
PROMPT = (4, 30, 6)  # text tokens before <image>, the question after it, the template's tail (<|end|> ... )


# ----------------------------------------------------------------------------------------------
# Configurations and random weights

def real_configs(preset: str) -> tuple:
    """(FlorenceConfig, LLMConfig): 'florence-vl-3b' (Florence-2-large at 768 px + Phi-3.5-mini, 32 layers) or
    'tiny' (the tiny tower + a 2-layer Phi-3 of Phi-3.5's layout, head_dim 96 for its LongRoPE factors)."""
    if preset == "florence-vl-3b":
        return (FlorenceConfig.from_name("large", vocab_size=FLORENCE_IMAGE_TOKEN + 1, image_size=768),
                LLMConfig.from_name("phi3.5-mini"))
    if preset == "tiny":
        return (FlorenceConfig.from_name("tiny", vocab_size=FLORENCE_IMAGE_TOKEN + 1),
                LLMConfig.from_name("phi3.5-mini", n_layers=2, hidden_size=192, intermediate_size=256, n_heads=2,
                                    n_kv_heads=2, vocab_size=128, pad_token_id=0))
    raise ValueError(f"unknown preset {preset!r}: florence-vl-3b or tiny")


def llm_init(name: str, shape) -> tuple:
    """(mean, std) of a random LLM weight, as bench.hf_phi3 draws them: peaked logits, so that greedy decoding
    keeps moving and does not wander between near-ties."""
    if len(shape) == 1:
        return 1.0, 0.2
    return (0.0, 1.0) if "embed" in name else (0.0, 2 / shape[1] ** 0.5)


def florence_init(name: str, shape) -> tuple:
    """(mean, std) of a random tower / projector weight, as bench.randomize_ draws them."""
    if "norm" in name:
        return (1.0, 0.2) if name.endswith("weight") else (0.0, 0.2)
    if len(shape) == 1:
        return 0.0, 0.1
    if "embed" in name or "shared" in name:
        return 0.0, 0.5
    return 0.0, math.prod(shape[1:]) ** -0.5


def random_(t: torch.Tensor, mean: float, std: float, seed: int) -> torch.Tensor:
    """Fill t in place with N(mean, std^2), drawn in t's own dtype (no fp32 copy of a large tensor)."""
    t.normal_(generator=torch.Generator().manual_seed(seed))
    return t.mul_(std).add_(mean) if mean else t.mul_(std)


@torch.no_grad()
def randomize_module_(module: nn.Module, init, seed: int):
    for i, (name, p) in enumerate(module.named_parameters()):
        random_(p.data, *init(name, p.shape), seed * 1_000_003 + i)


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------
# The two sides

class Reference(nn.Module):
    """The official data flow from transformers parts: Florence2ForConditionalGeneration, a
    Linear-GELU-Linear-GELU-Linear projector, Phi3ForCausalLM."""

    def __init__(self, florence, projector, llm):
        super().__init__()
        self.florence, self.projector, self.llm = florence, projector, llm


def build_reference(vision_cfg: FlorenceConfig, llm_cfg: LLMConfig, dtype=BF16, seed: int = 0) -> Reference:
    """transformers' models of these shapes, built in dtype, every weight random (florence_init / llm_init)."""
    import transformers
    from transformers import Florence2ForConditionalGeneration, Phi3ForCausalLM
    transformers.logging.set_verbosity_error()
    florence = Florence2ForConditionalGeneration._from_config(
        florence2_hf_config(vision_cfg, vision_cfg.vocab_size, FLORENCE_IMAGE_TOKEN), dtype=dtype)
    randomize_module_(florence, florence_init, seed)
    llm = Phi3ForCausalLM._from_config(phi3_hf_config(llm_cfg), dtype=dtype)
    randomize_module_(llm, llm_init, seed + 1)
    D, H = vision_cfg.d_model, llm_cfg.hidden_size
    with default_dtype(dtype):
        projector = nn.Sequential(nn.Linear(4 * D, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
    randomize_module_(projector, florence_init, seed + 2)
    return Reference(florence.eval(), projector.eval(), llm.eval())


def ours_from_reference(ref: Reference, vision_cfg: FlorenceConfig, dtype=BF16, quantize=None) -> FlorenceVL:
    """Our FlorenceVL holding the reference's tensors themselves: the tower from its Florence-2 state dict
    (transformers' names; the decoder is not taken), the LLM built on the meta device and given Phi-3's state
    dict (quantize='int8': each Linear quantized as it is assigned, a new int8 tensor; the rest still shared),
    the projector's Linears assigned. Nothing is copied where the layout is the same."""
    vision = FlorenceVision.from_state_dict(vision_cfg, ref.florence.state_dict(), dtype=dtype,
                                            what="random Florence-2 (transformers)")
    with torch.device("meta"):
        llm = LLM(LLMConfig.from_hf_config(ref.llm.config.to_dict()))
    llm.load_hf_shards([dict(ref.llm.state_dict())], "random Phi-3 (transformers)", dtype, quantize)
    with default_dtype(dtype):
        ours = FlorenceVL(FlorenceVLConfig(vision=vision.cfg, llm=llm.cfg), vision=vision, llm=llm)
    p = ref.projector  # Linears at 0, 2, 4; ours are encoder_mlp.0, encoder_mlp.1.1, encoder_mlp.2.1
    ours.mm_projector.load_state_dict({f"encoder_mlp.{name}.{kind}": getattr(p[i], kind) for kind in ("weight", "bias")
                                       for name, i in (("0", 0), ("1.1", 2), ("2.1", 4))}, assign=True)
    return ours.to(dtype).eval()


def build_ours(vision_cfg: FlorenceConfig, llm_cfg: LLMConfig, dtype=BF16, quantize=None, seed: int = 0) -> FlorenceVL:
    """Ours on its own, never holding more than the model and one tensor: the tower from random tensors of its
    state dict's shapes, the LLM on the meta device filled one random tensor at a time through load_hf_shards
    (quantize='int8': each Linear quantized as it arrives, as from_pretrained's streaming loader does)."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in FlorenceVision(vision_cfg).state_dict().items()}
    sd = {}
    for i, (k, (shape, dt)) in enumerate(shapes.items()):
        if k == "visual_temporal_embed":  # a constant table, not a weight
            sd[k] = cosine_table(vision_cfg.temporal_embed_size, vision_cfg.vision.dims[-1]).to(dtype)
        else:
            sd[k] = random_(torch.empty(shape, dtype=dtype), *florence_init(k, shape), seed * 1_000_003 + i)
    vision = FlorenceVision.from_state_dict(vision_cfg, sd, dtype=dtype, what="random tower")
    del sd
    with torch.device("meta"):
        llm = LLM(llm_cfg)
    names = {k: tuple(v.shape) for k, v in llm.hf_state_dict().items()}

    def tensors():
        for i, (k, shape) in enumerate(names.items()):
            yield {k: random_(torch.empty(shape, dtype=dtype), *llm_init(k, shape), (seed + 1) * 1_000_003 + i)}

    llm.load_hf_shards(tensors(), "random LLM", dtype, quantize)
    with default_dtype(dtype):
        ours = FlorenceVL(FlorenceVLConfig(vision=vision.cfg, llm=llm.cfg), vision=vision, llm=llm)
    randomize_module_(ours.mm_projector, florence_init, seed + 2)
    return ours.to(dtype).eval()


def tensor_bytes(module: nn.Module, exclude: set | None = None) -> int:
    """Bytes of module's parameters and buffers, each storage counted once (and none whose data_ptr is in exclude)."""
    seen, total = set(exclude or ()), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def storages(module: nn.Module) -> set:
    return {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}


# ----------------------------------------------------------------------------------------------
# One answer: the whole prompt path, then decoding, with a clock reading at every token

def real_prompt(vocab: int, seed: int = 0) -> torch.Tensor:
    """(1, 41) ids: 4 template tokens, <image>, a 30-token question, 6 template tokens (random ids)."""
    before, question, after = PROMPT
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (1, before + 1 + question + after), generator=g)
    ids[0, before] = IMAGE_TOKEN_INDEX
    return ids


def real_pixels(size: int, dtype=BF16, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Marks:
    """(wall, process CPU) clock readings: at the start of a run, then as each new token comes out. Ours calls
    it as generate's stream(sample, token); transformers' generate calls put() as a streamer: first with the
    prompt (no new token: skipped), then with each step's token."""

    def __init__(self):
        self.busy = machine_busy()
        self.times = [(time.perf_counter(), time.process_time())]
        self.prompt_seen = False

    def done(self):
        """Close the run: `others` = CPU seconds other processes used meanwhile (a disturbance, if large)."""
        self.others = machine_busy() - self.busy - (time.process_time() - self.times[0][1])

    def __call__(self, *_):
        self.times.append((time.perf_counter(), time.process_time()))

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self()

    def end(self):
        pass

    def ttft(self, clock: int) -> float:
        return self.times[1][clock] - self.times[0][clock]

    def per_token(self, clock: int) -> float:
        """Mean seconds per decode step: from the first token to the last, over the steps in between."""
        n = len(self.times) - 2
        return (self.times[-1][clock] - self.times[1][clock]) / n if n > 0 else float("nan")


@torch.no_grad()
def answer_ours(model: FlorenceVL, ids, pixels, n: int, marks=None) -> list:
    """Ours: FlorenceVL.generate (vision features, projector, splice, prefill, then n - 1 decode steps)."""
    return model.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=n, stop_ids=(),
                          stream=marks if marks is not None else None)[0]


@torch.no_grad()
def answer_reference(ref: Reference, ids, pixels, n: int, marks=None) -> list:
    """The official path: features with DaViT per (image, prompt) pair, channel concat, projector, the LLaVA
    splice, Phi3ForCausalLM.generate(inputs_embeds=...) (greedy, KV cache, exactly n new tokens)."""
    features = reference_features(ref.florence, pixels, prompt_ids())
    visual = ref.projector(torch.cat(features, dim=-1))
    embeds, mask, _ = reference_splice(ref.llm.get_input_embeddings(), ids, torch.ones_like(ids),
                                       torch.full_like(ids, IGNORE_INDEX), visual)
    out = ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=marks)
    return out[0, -n:].tolist()


def undisturbed(run, name: str, max_others: float = 0.1, retries: int = 3):
    """run(marks) once, again (after a pause) while other processes used more than max_others CPU seconds per
    wall second of it (another job's burst on this 2-core machine), at most `retries` times. (result, Marks)."""
    for attempt in range(retries + 1):
        marks = Marks()
        out = run(marks)
        marks.done()
        wall = time.perf_counter() - marks.times[0][0]
        if marks.others <= max_others * wall + 0.05 or attempt == retries:  # /proc/stat counts in 10 ms ticks
            return out, marks
        print(f"    ({name}: other processes used {marks.others:.1f} CPU s during its {wall:.1f} s: run again)")
        time.sleep(10)


def race_answers(fns: dict, repeats: int, warmup: int, clock: int, max_others: float = 0.1) -> dict:
    """bench.race for answers: the callables in turn, the order reversed every round, warm-up rounds dropped;
    each run gives a TTFT and a mean decode step; a run disturbed by other processes is run again (undisturbed).
    Returns name -> {'ttft', 'decode' (median seconds of the chosen clock: 0 wall, 1 process CPU), 'tokens'
    (of the last run), 'runs'}."""
    names = list(fns)
    runs, tokens = {k: [] for k in names}, {}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            tokens[name], marks = undisturbed(fns[name], name, max_others)
            if r >= warmup:
                runs[name].append(marks)
    out = {}
    for name in names:
        for c, label in ((0, "wall"), (1, "cpu")):
            ttft = [m.ttft(c) for m in runs[name]]
            step = [m.per_token(c) for m in runs[name]]
            print(f"    {name:14s} {label:4s} TTFT " + " ".join(f"{t:7.2f}" for t in ttft)
                  + f"  median {statistics.median(ttft):7.2f} s | decode " + " ".join(f"{t * 1e3:6.1f}" for t in step)
                  + f"  median {statistics.median(step) * 1e3:6.1f} ms/token")
        print(f"    {name:14s} other processes' CPU seconds during each run: "
              + " ".join(f"{m.others:.1f}" for m in runs[name]))
        ms = runs[name]
        out[name] = {"ttft": statistics.median(m.ttft(clock) for m in ms),
                     "decode": statistics.median(m.per_token(clock) for m in ms), "tokens": tokens[name], "runs": ms}
    return out


def agreement(a: list, b: list) -> tuple:
    """('k/n' tokens equal position by position, a note naming the first difference)."""
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"{same}/{len(a)}", "" if first is None else f" (the first difference at token {first + 1})"


# ----------------------------------------------------------------------------------------------
# Where the time and the FLOPs of one TTFT go

def sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU SDPA kernel (it counts the CUDA ones): the same as theirs,
    2 * B * heads * Sq * Sk * (d_qk + d_v), the full score matrix even when causal."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def flop_counter():
    """FlopCounterMode counting matmuls, convolutions and (with sdpa_cpu_flop) CPU SDPA; elementwise work
    (norms, GELU / SiLU, softmax outside SDPA, adds), embedding lookups and copies are not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop})


def sdpa_flops(counter) -> int:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return sum(v for k, v in counter.get_flop_counts().get("Global", {}).items() if k in (op, op.default))


class Stages:
    """Wall time and (under a FlopCounterMode) FLOPs of named stages, each a list of modules whose forward calls
    are summed (a call inside another of the same stage counts once); each stage's last output kept."""

    def __init__(self, stages: dict, counter=None):
        self.stages, self.counter = stages, counter
        self.seconds = {k: 0.0 for k in stages}
        self.flops = {k: 0 for k in stages}
        self.outputs, self.depth, self.start, self.handles = {}, {k: 0 for k in stages}, {}, []

    def _total(self):
        return self.counter.get_total_flops() if self.counter is not None else 0

    def __enter__(self):
        for name, modules in self.stages.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: self._pre(name)))
                self.handles.append(m.register_forward_hook(lambda mod, args, out, name=name: self._post(name, out)))
        return self

    def _pre(self, name):
        if self.depth[name] == 0:
            self.start[name] = (time.perf_counter(), self._total())
        self.depth[name] += 1

    def _post(self, name, out):
        self.depth[name] -= 1
        if self.depth[name] == 0:
            t, f = self.start[name]
            self.seconds[name] += time.perf_counter() - t
            self.flops[name] += self._total() - f
            self.outputs[name] = out  # the last: ours' prefill ends with lm_head on the last position

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def ours_stages(model: FlorenceVL) -> dict:
    return {"DaViT": [model.vision.vision_tower], "encoder": [model.vision.encoder], "projector": [model.mm_projector],
            "LLM prefill": [model.llm, model.llm.lm_head]}


def reference_stages(ref: Reference) -> dict:
    m = ref.florence.model
    return {"DaViT": [m.vision_tower], "encoder": [m.language_model.encoder], "projector": [ref.projector],
            "LLM prefill": [ref.llm]}


def breakdown(answer, stages: dict, counted: bool, max_others: float = 0.1):
    """One TTFT (n = 1) with its stages timed (counted: under a FlopCounterMode), run again if disturbed.
    Returns (Stages, total seconds, total FLOPs, SDPA FLOPs)."""
    def run(marks):
        counter = flop_counter() if counted else None
        with Stages(stages, counter) as s:
            if counter is not None:
                with counter:
                    answer()
            else:
                answer()
        marks()
        return s, counter

    (s, counter), marks = undisturbed(run, "stages", max_others)
    flops = counter.get_total_flops() if counter is not None else 0
    return s, marks.ttft(0), flops, sdpa_flops(counter) if counter is not None else 0


def print_breakdown(name: str, timed, counted, matmul_rate: float):
    s, total, _, _ = timed
    c, _, flops, sdpa = counted
    print(f"    {name}: TTFT {total:.2f} s (wall, one run, stages by forward hooks); "
          f"{flops / 1e12:.2f} TFLOP counted ({sdpa / 1e12:.3f} of them SDPA, by our CPU formula)")
    rest_t, rest_f = total - sum(s.seconds.values()), flops - sum(c.flops.values())
    for stage in [*s.seconds, "other"]:
        sec = s.seconds[stage] if stage != "other" else rest_t
        f = c.flops[stage] if stage != "other" else rest_f
        rate = f / sec / 1e9 if sec > 0 else 0
        print(f"      {stage:12s} {sec:7.2f} s {100 * sec / total:5.1f}%  {f / 1e12:6.3f} TFLOP  {rate:6.0f} GFLOP/s"
              f" ({rate * 1e9 / matmul_rate:4.0%} of a bare bf16 matmul)")


def matmul_rate(threads: int) -> float:
    """FLOP/s of a bare bf16 F.linear of prefill's shape (617 x 3072 @ 3072 x 16384), this machine and threads."""
    x, w = torch.randn(617, 3072, dtype=BF16), torch.randn(16384, 3072, dtype=BF16)
    F.linear(x, w)
    t = time.perf_counter()
    for _ in range(3):
        F.linear(x, w)
    return 3 * 2 * 617 * 3072 * 16384 / (time.perf_counter() - t)


def profile_top(name: str, answer, rows: int = 14):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        answer()
    print(f"    torch.profiler, one TTFT of {name}, ops by self CPU time (the calling thread's; intra-op threads "
          f"run inside):")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)
    print("\n".join("      " + line for line in table.splitlines()))


# the kernels a decode step's time is sorted into (torch.profiler names; self time, so nothing is counted twice)
DECODE_KERNELS = {"matmuls": ("aten::_weight_int8pack_mm", "aten::mm", "aten::addmm", "aten::bmm"),
                  "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                "aten::_scaled_dot_product_attention_math")}


def filled_cache(llm: LLM, context: int, extra: int) -> KVCache:
    """Ours' cache, as a prefill of `context` tokens would leave it (room for `extra` more), holding random keys and
    values rounded to the model's dtype instead, in the dtype generate() would pick (model.cache_dtype)."""
    cfg, dtype = llm.cfg, llm.embed_tokens.weight.dtype
    cache = KVCache(cfg, 1, context + extra, dtype=cache_dtype(dtype, "cpu"))
    llm(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache, return_hidden=True)
    g = torch.Generator().manual_seed(0)
    for layer in range(cfg.n_layers):
        for buffer in (cache.k, cache.v):
            buffer[layer, :, :, :context] = torch.randn(1, cfg.n_kv_heads, context, cfg.head_dim, generator=g).to(dtype)
    cache.valid[:, :context] = True
    cache.slot.fill_(context)
    cache.next_pos.fill_(context)
    cache.length = context
    return cache


@torch.no_grad()
def decode_profile(llm: LLM, context: int, steps: int = 4) -> dict:
    """Where ours' decode step spends its time at a given context, batch 1: milliseconds per step in the matmuls
    (int8 or float), in attention, and the rest (norms, RoPE, cache writes, residuals, the Python between them),
    from torch.profiler over `steps` steps after one untimed. The cache is filled with random keys and values
    instead of a prefill (the step reads every slot under the valid mask, so its work is the same), in the dtype
    generate() would pick (model.cache_dtype). 'step' is the wall time per step under the profiler."""
    from torch.profiler import ProfilerActivity, profile
    cache = filled_cache(llm, context, steps + 1)
    token = torch.zeros(1, dtype=torch.long)
    llm.decode_step(token, cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.decode_step(token, cache)
        step = (time.perf_counter() - t0) / steps
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    out = {k: sum(self_us.get(n, 0) for n in names) / 1e6 / steps for k, names in DECODE_KERNELS.items()}
    out["step"] = step
    out["rest"] = step - out["matmuls"] - out["attention"]
    out["cache"] = f"{cache.k.dtype}".removeprefix("torch.")
    return out


@torch.no_grad()
def decode_race(ours_llm: LLM, ref_llm: nn.Module, context: int, steps: int = 4, rounds: int = 7) -> dict:
    """Decode alone, both sides interleaved: each side's cache holds `context` tokens of random keys and values (the
    same values; ours in model.cache_dtype, the reference's a transformers DynamicCache in its dtype), then `rounds`
    rounds of `steps` decode steps per side, the order reversed every round, so that a machine whose speed drifts over
    minutes (this VM's did by 40% within an hour) slows both alike. Returns the median seconds per step of each side
    and every round's figures, and each side's logits of the first (untimed) step. Ours' cache is sized for all the steps and read whole each step (its fixed-shape
    step), the reference's grows by one token per step, as in generate."""
    from transformers import DynamicCache
    cfg = ours_llm.cfg
    dtype = ours_llm.embed_tokens.weight.dtype
    total = steps * rounds + 1  # + the untimed first step of each side
    ours_cache = filled_cache(ours_llm, context, total + 1)
    ref_cache = DynamicCache(config=ref_llm.config)
    for layer in range(cfg.n_layers):  # the same values, exactly (ours' fp32 cache holds them as the model rounded)
        ref_cache.update(*(b[layer, :, :, :context].to(dtype) for b in (ours_cache.k, ours_cache.v)), layer)
    token = torch.zeros(1, dtype=torch.long)
    steppers = {"ours": lambda: ours_llm.decode_step(token, ours_cache),
                "reference": lambda: ref_llm(input_ids=token[None], past_key_values=ref_cache, use_cache=True).logits}
    first = {k: f().float()[0, -1] if k == "reference" else f().float()[0] for k, f in steppers.items()}
    times = {k: [] for k in steppers}
    for r in range(rounds):
        for name in (list(steppers) if r % 2 == 0 else list(steppers)[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            times[name].append((time.perf_counter() - t0) / steps)
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "rounds": times, "first": first}


# ----------------------------------------------------------------------------------------------
# Peak memory of one side, in a child process

SIDE_SETUP = """import torch
torch.set_num_threads({threads})
import bench_real
{extra}
from fusion import FlorenceVL, FlorenceVLConfig
with torch.device("meta"):  # torch's meta kernels load once per process: before the baseline
    FlorenceVL(FlorenceVLConfig.from_name("tiny"))
"""
SIDE_CODE = """
side = bench_real.build_side({which!r}, {preset!r}, {quantize!r})
out["bytes"] = bench_real.tensor_bytes(side)
out["build_s"] = time.perf_counter() - t0
bench_real.ttft_once(side, {which!r}, {preset!r})
"""


def build_side(which: str, preset: str, quantize=None):
    vision_cfg, llm_cfg = real_configs(preset)
    if which == "reference":
        return build_reference(vision_cfg, llm_cfg)
    return build_ours(vision_cfg, llm_cfg, quantize=quantize)


def ttft_once(side, which: str, preset: str):
    vision_cfg, llm_cfg = real_configs(preset)
    ids, pixels = real_prompt(llm_cfg.vocab_size), real_pixels(vision_cfg.image_size)
    (answer_reference if which == "reference" else answer_ours)(side, ids, pixels, 1)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def side_memory(which: str, preset: str, quantize=None, threads: int = 1, need: int = 0) -> dict | None:
    """{'peak', 'added', 'bytes', 'seconds', 'build_s'} of a child that builds one side and runs one TTFT;
    None (with the reason printed) when `need` bytes are not available."""
    if need and mem_available() < need:
        print(f"    peak RSS of {which}{' int8' if quantize else ''}: skipped, {need / GiB:.1f} GiB needed, "
              f"{mem_available() / GiB:.1f} GiB available")
        return None
    extra = "import transformers" if which == "reference" else ""  # imports before the baseline
    got = measure(SIDE_CODE.format(which=which, preset=preset, quantize=quantize),
                  setup=SIDE_SETUP.format(threads=threads, extra=extra), timeout=3600)
    got.update(bytes=got["out"]["bytes"], build_s=got["out"]["build_s"])
    print(f"    peak RSS of {which}{' int8' if quantize else ''} (child: build + one TTFT): "
          f"{got['peak'] / GiB:.2f} GiB (added over imports {got['added'] / GiB:.2f} GiB; its tensors "
          f"{got['bytes'] / GiB:.2f} GiB; "
          f"build {got['build_s']:.0f} s, all {got['seconds']:.0f} s)")
    return got


# ----------------------------------------------------------------------------------------------
# Cases 6 and 7

STATE = {}  # the built pair, kept from case 6 to case 7, dropped before case 8


def clock_of(args) -> tuple:
    """(index into Marks readings, name): wall time with more than one thread, process CPU time with one."""
    return (0, "wall time") if args.threads > 1 else (1, "process CPU time")


def real_pair(args):
    if "ref" not in STATE:
        vision_cfg, llm_cfg = real_configs(args.real_preset)
        t = time.perf_counter()
        ref = build_reference(vision_cfg, llm_cfg)
        ours = ours_from_reference(ref, vision_cfg)
        theirs = storages(ref)
        own = tensor_bytes(ours, exclude=theirs)
        print(f"    built in {time.perf_counter() - t:.0f} s: reference {tensor_bytes(ref) / GiB:.2f} GiB (with "
              f"Florence-2's decoder), ours {tensor_bytes(ours) / GiB:.2f} GiB of which {own / 2**20:.1f} MiB not "
              f"shared with the reference; process RSS peak so far {vm_hwm() / GiB:.2f} GiB")
        print(f"    reference attention: {ref.llm.config._attn_implementation} (Phi-3) / "
              f"{ref.florence.config._attn_implementation} (Florence-2)")
        STATE.update(ref=ref, ours=ours, vision_cfg=vision_cfg, llm_cfg=llm_cfg,
                     ids=real_prompt(llm_cfg.vocab_size), pixels=real_pixels(vision_cfg.image_size))
    return STATE


def drop_pair():
    STATE.clear()
    gc.collect()
    release_freed_memory()


@torch.no_grad()
def llm_control(ours: FlorenceVL, ref: Reference, ids, pixels, n: int):
    """Where token disagreement in bf16 comes from: both LLMs decode from the very same inputs_embeds (ours'),
    and, as a control, the reference's first-token logits with its inputs_embeds perturbed by a relative
    2^-9 (the size of a bf16 rounding): a random 32-layer model amplifies differences that small."""
    from generate import generate
    embeds, mask = ours.prompt_inputs(ids, torch.ones_like(ids), pixels)
    a = generate(ours.llm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, stop_ids=())[0]
    b = ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)[0, -n:].tolist()
    same, note = agreement(a, b)
    la = ours.llm.lm_head(ours.llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)[:, -1]).float()[0]
    lb = ref.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].float()
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1))
    lp = ref.llm(inputs_embeds=(embeds.float() * (1 + 2**-9 * noise)).to(embeds.dtype),
                 attention_mask=mask).logits[0, -1].float()
    top = lb.topk(2).values.tolist()
    print(f"    the two LLMs from the same inputs_embeds: {same} tokens identical{note}; first-token logits max |diff| "
          f"{(la - lb).abs().max().item():.3g}. Control: the reference's own first-token logits move by up to "
          f"{(lp - lb).abs().max().item():.3g} (argmax {'kept' if lp.argmax() == lb.argmax() else 'changed'}) when "
          f"its inputs_embeds are perturbed by a relative 2^-9 (bf16 rounding); its top two logits "
          f"{top[0]:.3f}, {top[1]:.3f}")


def ttft_row(case, what, ours, ref, target):
    ratio = ours / ref
    return (case, what, f"{ours:.2f} s", f"{ref:.2f} s", f"{ratio:.2f}", f"<= {target}" if target else "-",
            ("yes" if ratio <= target else "no") if target else "-")


def decode_row(case, what, ours, ref, target):
    ratio = ours / ref
    return (case, what, f"{ours * 1e3:.0f} ms", f"{ref * 1e3:.0f} ms", f"{ratio:.2f}", f"<= {target}",
            "yes" if ratio <= target else "no")


def case_real_bf16(args) -> list:
    """Case 6: Florence-VL-3B shapes in bf16 on the CPU, ours vs the official path from transformers parts."""
    n = args.real_tokens
    clock, clock_name = clock_of(args)
    print(f"case 6: Florence-VL-3B shapes (Florence-2-large tower at 768 px, Phi-3.5-mini, 32 layers), random weights, "
          f"bf16, batch 1, one image + a {PROMPT[1]}-token question, {n} new tokens; medians of {clock_name}")
    rows = []
    mem = {}
    if args.memory:  # first, while this process holds nothing large
        for which in ("ours", "reference"):
            mem[which] = side_memory(which, args.real_preset, threads=args.threads, need=int(11 * GiB))
    s = real_pair(args)
    ours, ref, ids, pixels = s["ours"], s["ref"], s["ids"], s["pixels"]
    print(f"    prompt: {ids.shape[1] - 1} text tokens + {ours.num_visual_tokens} visual = "
          f"{ids.shape[1] - 1 + ours.num_visual_tokens} tokens")
    t = race_answers({"ours": lambda m: answer_ours(ours, ids, pixels, n, m),
                      "reference": lambda m: answer_reference(ref, ids, pixels, n, m)},
                     args.repeats, args.warmup, clock, args.max_others)
    same, note = agreement(t["ours"]["tokens"], t["reference"]["tokens"])
    print(f"    generated tokens identical: {same}{note}")
    s["bf16_decode"] = {k: t[k]["decode"] for k in t}

    to, tr = t["ours"], t["reference"]
    size = "3B shapes" if args.real_preset == "florence-vl-3b" else f"{args.real_preset} shapes"
    rows.append(ttft_row("6", f"TTFT bf16, {size}, 1 image {s['vision_cfg'].image_size}px + {PROMPT[1]}-token question "
                              f"(ref: official, DaViT per prompt)", to["ttft"], tr["ttft"], 0.75))
    rows.append(decode_row("6", f"decode ms/token bf16, batch 1, {n} tokens ({same} tokens identical)",
                           to["decode"], tr["decode"], 1.0))
    if mem.get("ours") and mem.get("reference"):
        mo, mr = mem["ours"]["peak"], mem["reference"]["peak"]
        rows.append(("6", "  peak RSS, one side built + one TTFT (child process)", f"{mo / GiB:.2f} GiB",
                     f"{mr / GiB:.2f} GiB", f"{mo / mr:.2f}", "-", "-"))
    if not args.breakdown:
        return rows

    rate = matmul_rate(args.threads)
    print(f"    bare bf16 matmul (617x3072 @ 3072x16384) on this machine: {rate / 1e9:.0f} GFLOP/s")
    fl = {}
    for name, answer, stages in (("ours", lambda: answer_ours(ours, ids, pixels, 1), ours_stages(ours)),
                                 ("reference", lambda: answer_reference(ref, ids, pixels, 1), reference_stages(ref))):
        timed, counted = breakdown(answer, stages, False, args.max_others), breakdown(answer, stages, True, math.inf)
        print_breakdown(name, timed, counted, rate)
        fl[name] = counted
        if args.profile:
            profile_top(name, answer)
    a, b = fl["ours"][0].outputs, fl["reference"][0].outputs
    vis = (a["projector"].float() - b["projector"].float()).abs()
    la, lb = a["LLM prefill"].float()[0], b["LLM prefill"].logits.float()[0, -1]
    print(f"    ours vs reference in bf16: visual tokens max |diff| {vis.max().item():.3g} (their max |value| "
          f"{b['projector'].float().abs().max().item():.3g}); first-token logits max |diff| "
          f"{(la - lb).abs().max().item():.3g} (max |logit| {lb.abs().max().item():.3g}), argmax "
          f"{'equal' if la.argmax() == lb.argmax() else 'different'}")
    llm_control(ours, ref, ids, pixels, n)
    fo, fr = fl["ours"][2], fl["reference"][2]
    floor = sum(ISSUE_TFLOP.values())
    print(f"    TTFT FLOPs counted: ours {fo / 1e12:.2f} TFLOP, reference {fr / 1e12:.2f} TFLOP, ratio {fo / fr:.2f}; "
          f"the issue's floor: ours {floor:.1f} ({', '.join(f'{k} {v}' for k, v in ISSUE_TFLOP.items())}), "
          f"official {floor + 2 * ISSUE_TFLOP['DaViT (one pass)']:.1f} (DaViT 3 times), ratio "
          f"{floor / (floor + 2 * ISSUE_TFLOP['DaViT (one pass)']):.2f}. Not counted: elementwise ops, embedding "
          f"lookups, copies; SDPA is counted only through our formula for the CPU kernel")
    print(f"    this process (both sides, shared weights): RSS peak {vm_hwm() / GiB:.2f} GiB")
    rows.insert(2, ("6", "  TTFT FLOPs counted (matmul + conv + SDPA)", f"{fo / 1e12:.2f} TFLOP",
                    f"{fr / 1e12:.2f} TFLOP", f"{fo / fr:.2f}", "~0.70 (issue)", "-"))
    return rows


def roofline(matrices_bf16: list, matrices_int8: list, args, rounds: int = 5) -> dict:
    """Median seconds of one bare matrix-vector pass over every LLM weight matrix, batch 1: F.linear over the
    bf16 ones, torch._weight_int8pack_mm over the int8 ones (with their scales); alternating, one warm-up,
    disturbed passes run again; wall time with > 1 thread, else process CPU time."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=BF16) for w in matrices_bf16}

    def bf16_pass(marks):
        for w in matrices_bf16:
            F.linear(xs[w.shape[1]], w)
        marks()

    def int8_pass(marks):
        for q, scale in matrices_int8:
            torch._weight_int8pack_mm(xs[q.shape[1]], q, scale)
        marks()

    fns = {"bf16 weights": bf16_pass, "int8 weights": int8_pass}
    clock = clock_of(args)[0]
    times = {k: [] for k in fns}
    for r in range(1 + rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            _, marks = undisturbed(fns[name], name, args.max_others)
            if r:
                times[name].append(marks.ttft(clock))
    for name, ts in times.items():
        print(f"    {name}: " + " ".join(f"{t * 1e3:.1f}" for t in ts)
              + f"  median {statistics.median(ts) * 1e3:.1f} ms")
    return {k: statistics.median(v) for k, v in times.items()}


def case_real_int8(args) -> list:
    """Case 7: ours with the LLM's Linears in int8 (quantize='int8'), the reference still bf16."""
    n = args.real_tokens
    clock, clock_name = clock_of(args)
    print(f"case 7: the same with ours quantize='int8' (the LLM's Linears int8, one scale per row; the rest bf16), the "
          f"reference bf16; medians of {clock_name}")
    mem = None
    if args.memory:
        mem = side_memory("ours", args.real_preset, quantize="int8", threads=args.threads, need=int(7 * GiB))
    s = real_pair(args)
    ref, ids, pixels = s["ref"], s["ids"], s["pixels"]
    if "ours_int8" not in s:  # the same weights, each LLM Linear quantized as load_hf_shards assigns it
        t0 = time.perf_counter()
        s["ours_int8"] = ours_from_reference(ref, s["vision_cfg"], quantize="int8")
        new = tensor_bytes(s["ours_int8"], exclude=storages(ref))
        print(f"    quantized in {time.perf_counter() - t0:.0f} s; ours int8: {tensor_bytes(s['ours_int8']) / GiB:.2f} "
              f"GiB ({new / GiB:.2f} GiB of it new: the int8 Linears)")
    ours = s["ours_int8"]
    t = None
    if args.ttft:
        t = race_answers({"ours int8": lambda m: answer_ours(ours, ids, pixels, n, m),
                          "reference": lambda m: answer_reference(ref, ids, pixels, n, m)},
                         args.repeats, args.warmup, clock, args.max_others)
        same, note = agreement(t["ours int8"]["tokens"], t["reference"]["tokens"])
        print(f"    generated tokens identical (int8 vs bf16): {same}{note}")

    bf16 = [m.weight for m in ref.llm.modules() if isinstance(m, nn.Linear)]
    int8 = [(m.weight, m.scale) for m in ours.llm.modules() if isinstance(m, Int8Linear)]
    r = roofline(bf16, int8, args)
    b16 = sum(w.numel() * w.element_size() for w in bf16)
    b8 = sum(q.numel() + sc.numel() * sc.element_size() for q, sc in int8)
    cfg = ours.llm.cfg
    T = ids.shape[1] - 1 + ours.num_visual_tokens
    kv_dtype = cache_dtype(BF16, "cpu")  # fp32 on a CPU without native bf16
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_dtype.itemsize * (T + n / 2)  # k and v, mean context
    print(f"    roofline: one matrix-vector pass over the LLM's weight matrices, batch 1: bf16 {b16 / 1e9:.2f} GB in "
          f"{r['bf16 weights'] * 1e3:.0f} ms ({b16 / r['bf16 weights'] / 1e9:.1f} GB/s), int8 {b8 / 1e9:.2f} GB in "
          f"{r['int8 weights'] * 1e3:.0f} ms ({b8 / r['int8 weights'] / 1e9:.1f} GB/s); a decode step also reads the "
          f"KV cache, {kv / 1e9:.2f} GB in {str(kv_dtype).removeprefix('torch.')} at the mean context ({T + n / 2:.0f} "
          f"tokens)")
    context = round(T + n / 2)
    race = decode_race(ours.llm, ref.llm, context)
    for name, ts in race["rounds"].items():
        print(f"    interleaved decode at {context} tokens, {name}: " + " ".join(f"{x * 1e3:.0f}" for x in ts)
              + f"  median {race['median'][name] * 1e3:.0f} ms/step")
    i8, iref = race["median"]["ours"], race["median"]["reference"]
    ratios = sorted(a / b for a, b in zip(race["rounds"]["ours"], race["rounds"]["reference"]))
    print("    interleaved decode, ours / reference per round: " + " ".join(f"{x:.2f}" for x in ratios)
          + f" (median {statistics.median(ratios):.2f}); first-step logits int8 vs bf16, max |diff| "
          f"{(race['first']['ours'] - race['first']['reference']).abs().max().item():.3g}")
    d8, dref = (t["ours int8"]["decode"], t["reference"]["decode"]) if t else (i8, iref)
    shares = [f"ours int8 {d8 * 1e3:.0f} ms = {r['int8 weights'] / d8:.0%} of the int8 pass",
              f"reference bf16 {dref * 1e3:.0f} ms = {r['bf16 weights'] / dref:.0%} of the bf16 pass"]
    if "bf16_decode" in s:
        d16 = s["bf16_decode"]["ours"]
        shares.insert(1, f"ours bf16 (case 6) {d16 * 1e3:.0f} ms = {r['bf16 weights'] / d16:.0%} of the bf16 pass")
    print("    decode step as a share of its roofline: " + "; ".join(shares))
    p = decode_profile(ours.llm, context)
    print(f"    ours int8 decode step at {context} tokens under torch.profiler: {p['step'] * 1e3:.0f} ms = int8 "
          f"matmuls {p['matmuls'] * 1e3:.0f} ms + attention over the {p['cache']} cache {p['attention'] * 1e3:.0f} ms"
          f" + the rest (norms, RoPE, cache writes, residuals, Python) {p['rest'] * 1e3:.0f} ms")
    if args.profile:
        profile_top("ours int8", lambda: answer_ours(ours, ids, pixels, 1))
    print(f"    this process (both sides + ours' int8 Linears): RSS peak {vm_hwm() / GiB:.2f} GiB")
    rows = []
    if t:
        rows += [ttft_row("7", "TTFT, ours int8 vs reference bf16 (same prompt)", t["ours int8"]["ttft"],
                          t["reference"]["ttft"], None),
                 decode_row("7", f"decode ms/token, ours int8 vs reference bf16, in the answers ({same} tokens "
                                 f"identical)", d8, dref, 0.6)]
    rows += [decode_row("7", f"decode ms/token, ours int8 vs reference bf16, interleaved at {context} tokens", i8, iref,
                        0.6),
             ("7", "  bare mat-vec pass over the weights, int8 / bf16",
              f"{r['int8 weights'] * 1e3:.0f} ms", f"{r['bf16 weights'] * 1e3:.0f} ms",
              f"{r['int8 weights'] / r['bf16 weights']:.2f}", "-", "-"),
             ("7", "  decode step / bare mat-vec pass over its weights", f"{r['int8 weights'] / d8:.0%} (int8)",
              f"{r['bf16 weights'] / dref:.0%} (bf16)", "-", "-", "-")]
    if mem:
        rows.append(("7", "  peak RSS, ours int8 built + one TTFT (child process)", f"{mem['peak'] / GiB:.2f} GiB", "-",
                     "-", "-", "-"))
    return rows


def add_arguments(p):
    p.add_argument("--real-tokens", type=int, default=16,
                   help="cases 6-7: new tokens per answer (TTFT = the first; decode ms/token over the other n - 1)")
    p.add_argument("--real-preset", default="florence-vl-3b", choices=["florence-vl-3b", "tiny"],
                   help="cases 6-7: the shapes (tiny: a seconds-long run of the same code, for checking it)")
    p.add_argument("--memory", action=argparse_bool(), default=True,
                   help="cases 6-7: also measure each side's peak RSS in a child process (default on)")
    p.add_argument("--max-others", type=float, default=0.1,
                   help="cases 6-7: a timed run during which other processes used more than this many CPU seconds "
                        "per second is run again (up to 3 times; each run's figure is printed)")
    p.add_argument("--ttft", action=argparse_bool(), default=True,
                   help="case 7: also time whole answers (TTFT, and decode inside them); off: only the interleaved "
                        "decode steps, the roofline and the profile (minutes instead of half an hour on a CPU without "
                        "native bf16)")
    p.add_argument("--breakdown", action=argparse_bool(), default=True,
                   help="case 6: also split one TTFT per side into stages with their FLOPs, and the same-inputs control "
                        "of the two LLMs (default on; off saves ~4 TTFTs, over an hour on a CPU without native bf16)")
    p.add_argument("--profile", action="store_true", help="cases 6-7: torch.profiler's top ops of one TTFT per side")


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction
