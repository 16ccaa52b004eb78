"""bench.py's cases 1-5: ours against the transformers reference at Florence-2-base / Phi-3.5-mini-wide shapes
(vision features, one training step, greedy decoding, data-parallel scaling, and the GPU figures of case 5).
bench.py is the entry point: `python bench.py --help` says what each case measures and what its reference
computes; this file holds the timing (race: alternating, medians), the reference builders and the cases.
"""
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from florence_encoder import FlorenceConfig, FlorenceVision, prompt_ids  # noqa: E402
from fusion import IGNORE_INDEX, IMAGE_TOKEN_INDEX, FlorenceVL, FlorenceVLConfig  # noqa: E402
from generate import compile_decode, generate  # noqa: E402
from model import LLM, LLMConfig  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))  # the reference side is built as in the parity tests
from helpers import (FLORENCE_IMAGE_TOKEN, florence2_hf_config, phi3_hf_config, reference_features,  # noqa: E402
                     reference_splice)

PEAK_BF16_FLOPS = 989e12      # H100 / H200 SXM dense bf16
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM


# ----------------------------------------------------------------------------------------------
# Timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: dict, repeats: int, warmup: int, device, clock: str | None = None) -> dict:
    """Run the callables in turn, the order reversed every round (ours, ref, ref, ours, ...), so that a
    drift in machine load hits both alike. Returns name -> median seconds (warm-up rounds dropped).

    On the CPU the medians are of process CPU time (this process's threads only): on a machine shared
    with other jobs, wall time also counts the time other processes held our core, which is noise (with
    --threads N > 1 it sums the N threads). Wall times are printed too. On CUDA: wall time, synchronised.
    clock="wall" returns the wall-time medians on the CPU too (cases 6-7 with more than one thread)."""
    names = list(fns)
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            if r >= warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    clocks = [("cpu", cpu), ("wall", wall)] if device.type == "cpu" else [("wall", wall)]
    for name in names:
        for clock, times in clocks:
            ts = times[name]
            print(f"    {name:10s} {clock:4s} " + " ".join(f"{t * 1e3:9.1f}" for t in ts)
                  + f"   median {statistics.median(ts) * 1e3:9.1f} ms")
    chosen = wall if clock == "wall" else clocks[0][1]
    return {k: statistics.median(v) for k, v in chosen.items()}


# ----------------------------------------------------------------------------------------------
# Random transformers models and the same weights in ours

@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0):
    """Weights away from any init, so that a wrong copy cannot hide and greedy decoding keeps moving:
    norms ~ 1 + 0.2 N(0,1) (biases 0.2 N), other biases 0.1 N, embeddings N(0, 0.25), matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * r)
        elif p.ndim == 1:
            p.copy_(0.1 * r)
        elif "embed" in name or "shared" in name:
            p.copy_(0.5 * r)
        else:
            p.copy_(r * p[0].numel() ** -0.5)


def hf_florence(cfg: FlorenceConfig):
    """A random transformers Florence2ForConditionalGeneration of our config's shapes (attention: its default)."""
    from transformers import Florence2ForConditionalGeneration
    config = florence2_hf_config(cfg, cfg.vocab_size, FLORENCE_IMAGE_TOKEN)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration._from_config(config)
    randomize_(model)
    return model.eval()


def florence_pair(size: int):
    """(transformers Florence-2-base, our FlorenceVision with the same weights), at size x size images."""
    cfg = FlorenceConfig.from_name("base", vocab_size=FLORENCE_IMAGE_TOKEN + 1, image_size=size)
    hf = hf_florence(cfg)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}  # copies: the two models share no storage
    return hf, FlorenceVision.from_state_dict(cfg, weights, what="random Florence-2-base")


def hf_phi3(n_layers: int):
    """A random transformers Phi3ForCausalLM: Phi-3.5-mini's shapes and LongRoPE, n_layers layers."""
    from transformers import Phi3ForCausalLM
    config = phi3_hf_config(LLMConfig.from_name("phi3.5-mini", n_layers=n_layers))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():  # peaked logits: greedy decoding does not wander between near-ties
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if p.ndim == 1 else r if "embed" in name else r * 2 / p.shape[1] ** 0.5)
    return model.eval()


def llm_pair(n_layers: int):
    hf = hf_phi3(n_layers)
    ours = LLM(LLMConfig.from_hf_config(hf.config.to_dict())).load_hf_state_dict(hf.state_dict(), "random Phi-3")
    return hf, ours.eval()


# ----------------------------------------------------------------------------------------------
# The reference: Florence-VL's data flow written with transformers parts

def plain_mlp(state: dict) -> nn.Sequential:
    """Our mlp3x_gelu's weights (official names) in a plain Linear-GELU-Linear-GELU-Linear."""
    layers = []
    for i, name in enumerate(["encoder_mlp.0", "encoder_mlp.1.1", "encoder_mlp.2.1"]):
        w, b = state[name + ".weight"], state[name + ".bias"]
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": b})
        layers += [nn.GELU(), linear] if i else [linear]
    return nn.Sequential(*layers)


class ReferenceFlorenceVL(nn.Module):
    """transformers Florence-2 + Linear-GELU-Linear-GELU-Linear + transformers Phi3ForCausalLM."""

    def __init__(self, florence, projector: nn.Module, llm):
        super().__init__()
        self.florence, self.projector, self.llm = florence, projector, llm
        self.shared_davit = False  # True: one DaViT pass per image (see reference_features)

    def forward(self, input_ids, attention_mask, pixel_values, labels):
        features = reference_features(self.florence, pixel_values, prompt_ids(), self.shared_davit)
        visual = self.projector(torch.cat(features, dim=-1))
        embeds, mask, labels = reference_splice(self.llm.get_input_embeddings(), input_ids, attention_mask, labels,
                                                visual)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# The cases. Each returns table rows: (case, what, ours, reference, ratio, target, met)

def row(case, what, ours_s, ref_s, target):
    ratio = ours_s / ref_s
    return (case, what, f"{ours_s * 1e3:.0f} ms", f"{ref_s * 1e3:.0f} ms", f"{ratio:.2f}", f"<= {target}",
            "yes" if ratio <= target else "no")


@torch.no_grad()
def case_vision(args, device, dtype):
    B = args.vision_batch
    print(f"case 1: vision features, Florence-2-base shapes, batch {B} at 768x768")
    hf, ours = florence_pair(768)
    hf, ours = hf.to(device, dtype), ours.to(device, dtype)
    print(f"    reference attention: {hf.config._attn_implementation}")
    pixels = torch.randn(B, 3, 768, 768, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    got, expected = ours.multi_prompt_features(pixels), reference_features(hf, pixels, prompt_ids())
    print("    max |ours - reference| per feature set: "
          + " ".join(f"{max_diff(a, b):.1e}" for a, b in zip(got, expected)))
    t = race({"ours": lambda: ours.multi_prompt_features(pixels),
              "reference": lambda: reference_features(hf, pixels, prompt_ids()),
              "ref 1 pass": lambda: reference_features(hf, pixels, prompt_ids(), shared_davit=True)},
             args.repeats, args.warmup, device)
    return [row("1", f"vision features V + 3 prompts, B={B}, 768px (ref: official, DaViT per prompt)",
                t["ours"], t["reference"], 0.9),
            row("1b", "  same, ref given one DaViT pass per image (same work)", t["ours"], t["ref 1 pass"], 0.9)[:5]
            + ("-", "-")]


def training_batch(B: int, vocab: int, seed: int = 0):
    """B samples: 24 text tokens, <image>, 64 text tokens; the last 64 supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, 24 + 1 + 64), generator=g)
    ids[:, 24] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 25:] = ids[:, 25:]
    return ids, torch.ones_like(ids), labels


def case_train(args, device, dtype):
    size, B, L = args.train_image_size, args.train_batch, args.llm_layers
    print(f"case 2: training step (forward + backward), Florence-2-base tower at {size}x{size}, mlp3x_gelu, "
          f"Phi-3.5-mini-wide decoder with {L} layers, batch {B}, everything trainable")
    florence, vision = florence_pair(size)
    hf_llm, llm = llm_pair(L)
    cfg = FlorenceVLConfig(vision=vision.cfg, llm=llm.cfg)
    ours = FlorenceVL(cfg, vision=vision, llm=llm)
    projector = plain_mlp(ours.mm_projector.state_dict())
    ref = ReferenceFlorenceVL(florence, projector, hf_llm)
    ours.set_stage("pretrain")
    ours.to(device), ref.to(device)
    ids, mask, labels = (t.to(device) for t in training_batch(B, llm.cfg.vocab_size))
    pixels = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"    sequence: {ids.shape[1] - 1 + vision.num_image_tokens} tokens ({vision.num_image_tokens} visual), "
          f"{labels.ne(IGNORE_INDEX).sum().item()} supervised; reference attention: "
          f"{hf_llm.config._attn_implementation} / {florence.config._attn_implementation}")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), amp:  # the same visual tokens and loss, with dropout and drop path off
        ours.eval(), ref.eval()
        visual = max_diff(ours.encode_images(pixels), projector(torch.cat(reference_features(florence, pixels, prompt_ids()), -1)))
        a, b = ours(ids, mask, pixels, labels).loss, ref(ids, mask, pixels, labels)
        print(f"    eval mode: max |ours - reference| visual tokens {visual:.1e}; loss ours {a.item():.6f} "
              f"reference {b.item():.6f}")
    ours.train(), ref.train()

    def step(model, loss_of):
        with amp:
            loss = loss_of()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def reference_step(shared_davit):
        ref.shared_davit = shared_davit
        step(ref, lambda: ref(ids, mask, pixels, labels))

    t = race({"ours": lambda: step(ours, lambda: ours(ids, mask, pixels, labels).loss),
              "reference": lambda: reference_step(False), "ref 1 pass": lambda: reference_step(True)},
             args.repeats, args.warmup, device)
    return [row("2", f"train step fwd+bwd, B={B}, {size}px, {L}-layer Phi-3.5 width (ref: official, DaViT per prompt)",
                t["ours"], t["reference"], 0.8),
            row("2b", "  same, ref given one DaViT pass per image (same work)", t["ours"], t["ref 1 pass"], 0.8)[:5]
            + ("-", "-")]


@torch.no_grad()
def case_decode(args, device, dtype):
    L, n = args.llm_layers, 64
    print(f"case 3: greedy decoding, {n} new tokens after a 32-token prompt, Phi-3.5-mini-wide decoder with {L} layers")
    hf, ours = llm_pair(L)
    hf, ours = hf.to(device, dtype), ours.to(device, dtype)
    print(f"    reference attention: {hf.config._attn_implementation}")
    rows = []
    for B in (1, 8):
        ids = torch.randint(3, 32000, (B, 32), generator=torch.Generator().manual_seed(B)).to(device)
        run_ours = lambda: generate(ours, ids, max_new_tokens=n, stop_ids=())  # noqa: E731
        run_ref = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: E731
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].tolist()
        a, b = run_ours(), run_ref()
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        print(f"    batch {B}: {same}/{B * n} generated tokens identical")
        fns = {"ours": run_ours, "reference": run_ref}
        if B == 1:  # what a decode step cannot avoid: reading every weight matrix once
            matrices = [m.weight for m in ours.modules() if isinstance(m, nn.Linear)]
            x = {w.shape[1]: torch.randn(1, w.shape[1], device=device, dtype=dtype) for w in matrices}
            fns["prefill"] = lambda: generate(ours, ids, max_new_tokens=1, stop_ids=())
            fns["weights"] = lambda: [F.linear(x[w.shape[1]], w) for w in matrices]
        t = race(fns, args.repeats, args.warmup, device)
        if B == 1:
            step = lambda s: (s - t["prefill"]) / (n - 1) * 1e3  # noqa: E731
            size = sum(w.numel() * w.element_size() for w in matrices)
            print(f"    per decode step (minus prefill): ours {step(t['ours']):.2f} ms, reference "
                  f"{step(t['reference']):.2f} ms; one matrix-vector product per weight matrix alone (the floor at "
                  f"batch 1): {t['weights'] * 1e3:.2f} ms = {size / 1e9:.2f} GB at "
                  f"{size / t['weights'] / 1e9:.1f} GB/s")
        r = row("3", f"greedy decode {n} tokens, batch {B}, {L}-layer Phi-3.5 width ({same}/{B * n} tokens equal)",
                t["ours"], t["reference"], 0.5)
        rows.append(r if B == 1 else r[:5] + ("-", "-"))
    return rows


def case_ddp(args):
    steps = args.ddp_steps
    print(f"case 4: train.py default under torchrun, 1 vs 2 processes ({args.threads} thread(s) each), "
          f"{steps} steps per stage; tokens/s over steps 2..{steps} (train.py's log)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    torchrun = Path(sys.executable).with_name("torchrun")
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.ddp_repeats):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = Path(tmp) / f"run{r}-{nproc}"
                cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "train.py", "--steps", str(steps),
                       "--eval-samples", "0", "--vision-steps", "0", "--out", str(out), "--resume", "none",
                       "--log-every", str(steps), "--threads", str(args.threads)]  # stage 0 (no tokens) is left out
                load = os.getloadavg()[0]
                cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                cpu1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
                cores = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
                if run.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
                records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                # per stage, the record that closes the run covers steps 2..steps (step 1 is logged alone)
                last = {rec["stage"]: rec for rec in records if "tokens_per_s" in rec and rec["step"] == steps}
                tps = {stage: rec["tokens_per_s"] for stage, rec in last.items()}
                print(f"    {nproc} process(es): " + ", ".join(f"{s} {v:,.0f} tok/s" for s, v in tps.items())
                      + f" | cores busy with it {cores:.2f} of {os.cpu_count()} (CPU time / wall, whole run); "
                      f"load average before {load:.2f}")
                results[nproc].append(tps)
    rows = []
    for stage in results[1][0]:
        one = statistics.median(r[stage] for r in results[1])
        two = statistics.median(r[stage] for r in results[2])
        rows.append(("4", f"DDP scaling, train.py default, {stage} stage (median of {args.ddp_repeats})",
                     f"2 procs {two:,.0f} tok/s", f"1 proc {one:,.0f} tok/s", f"{two / one:.2f}x", ">= 1.7x",
                     "yes" if two / one >= 1.7 else "no"))
    return rows


def measure_training(cfg: LLMConfig, B: int, T: int, args, device):
    """(FLOPs of one step, median seconds per step) of bf16 training as train.py does it on a GPU: autocast
    over fp32 weights, AdamW (fused on CUDA), next-token loss on every position."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    with device:  # initialised where it runs: a 3.8B model is slow to initialise on a CPU
        model = LLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # allocates the optimiser state: an out-of-memory error shows here
    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    return counter.get_total_flops(), race({"train step": train_step}, args.repeats, args.warmup, device)["train step"]


@torch.no_grad()
def measure_decode(cfg: LLMConfig, prompt: int, n: int, args, device, compiled: bool = False):
    """(seconds per decode step at batch 1, bytes it must read: every weight but the embedding table, and
    the KV cache at the mean context) for our LLM in bf16. compiled: the steps through generate.compile_decode
    (on CUDA as CUDA graphs, mode reduce-overhead), compiled in the warm-up round (at least one)."""
    torch.manual_seed(0)
    with device:
        llm = LLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)
    decode = compile_decode(llm, "reduce-overhead" if device.type == "cuda" else None) if compiled else None
    t = race({"prefill+1": lambda: generate(llm, ids, max_new_tokens=1, stop_ids=(), decode=decode),
              f"prefill+{n + 1}": lambda: generate(llm, ids, max_new_tokens=n + 1, stop_ids=(), decode=decode)},
             args.repeats, max(args.warmup, int(compiled)), device)
    per_token = (t[f"prefill+{n + 1}"] - t["prefill+1"]) / n
    weights = sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if name != "embed_tokens.weight")
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * (prompt + 1 + n / 2)  # k and v in bf16
    return per_token, weights, kv


@torch.no_grad()
def measure_ttft(preset: str, args, device) -> tuple[float, int]:
    """(median seconds, prompt tokens) to the first token of one answer: one image at the preset's size and a
    30-token question through the whole prompt path (vision features for the three prompts, projector, splice,
    LLM prefill, first token), random weights in bf16."""
    import bench_real  # its prompt and pixels, as in case 6
    cfg = FlorenceVLConfig.from_name(preset)
    torch.manual_seed(0)
    with device:  # initialised where it runs
        model = FlorenceVL(cfg).to(torch.bfloat16).eval()
    ids = bench_real.real_prompt(cfg.llm.vocab_size).to(device)
    pixels = bench_real.real_pixels(cfg.vision.image_size).to(device)
    t = race({"first token": lambda: model.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=1, stop_ids=())},
             args.repeats, args.warmup, device)["first token"]
    return t, ids.shape[1] - 1 + model.num_visual_tokens


def case5_plan(args) -> dict:
    """Case 5's sizes: the real ones on CUDA; with --dry-run (device_check.py --device cpu) tiny ones, to run
    the same code on the CPU in seconds."""
    if args.dry_run:
        return dict(llm="tiny-phi3", layers=[2], batch=2, seq=64, prompt=16, tokens=8, ttft="tiny")
    return dict(llm="phi3.5-mini", layers=args.mfu_layers, batch=args.mfu_batch, seq=args.mfu_seq, prompt=128,
                tokens=args.decode_tokens, ttft="florence-vl-3b")


def free_memory(device):
    gc.collect()  # a failed attempt's model, once its traceback is gone
    if device.type == "cuda":
        torch.cuda.empty_cache()


def assumed_bandwidth(device) -> tuple[str, float]:
    """(the machine's name, the memory bandwidth assumed for it: an H100's unless it is an H200)."""
    name = machine(device)
    return name, next((v for k, v in PEAK_BANDWIDTH.items() if k in name), PEAK_BANDWIDTH["H100"])


def case5_figures(args, device) -> dict:
    """The numbers behind case 5's rows (and device_check.py's JSON): training MFU, decode (eager and compiled)
    against the bandwidth roofline, time to first token."""
    plan = case5_plan(args)
    name, bandwidth = assumed_bandwidth(device)
    fig = dict(device=name, plan=plan, assumed_peak_flops=PEAK_BF16_FLOPS, assumed_bandwidth=bandwidth)
    B, T = plan["batch"], plan["seq"]
    for L in plan["layers"]:  # the deepest Phi-3.5-mini-wide decoder that fits
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            flops, t = measure_training(LLMConfig.from_name(plan["llm"], n_layers=L), B, T, args, device)
        except torch.cuda.OutOfMemoryError:
            flops = None
        free_memory(device)
        if flops is None:
            print(f"    training: {L} layers do not fit")
            continue
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        fig["training"] = dict(layers=L, batch=B, seq=T, flops_per_step=flops, step_s=t, tflops=flops / t / 1e12,
                               mfu=flops / t / PEAK_BF16_FLOPS, peak_memory=peak)
        break
    from torch._dynamo.utils import counters
    for kind in ("eager", "compiled"):
        counters.clear()
        per_token, weights, kv = measure_decode(LLMConfig.from_name(plan["llm"]), plan["prompt"], plan["tokens"],
                                                args, device, compiled=kind == "compiled")
        free_memory(device)
        fig[f"decode_{kind}"] = dict(ms_per_token=per_token * 1e3, tokens_per_s=1 / per_token,
                                     bytes_per_token=weights + kv, roofline_ms=(weights + kv) / bandwidth * 1e3,
                                     roofline_share=(weights + kv) / bandwidth / per_token,
                                     cudagraph_skips=counters["inductor"].get("cudagraph_skips", 0))
    seconds, tokens = measure_ttft(plan["ttft"], args, device)
    free_memory(device)
    fig["ttft"] = dict(preset=plan["ttft"], prompt_tokens=tokens, seconds=seconds)
    return fig


def case_gpu(args, device):
    """MFU of bf16 training, decode against the bandwidth roofline, time to first token (CUDA; the CPU with
    --dry-run). Puts its figures in args.figures[5] for --json."""
    name, bandwidth = assumed_bandwidth(device)
    print(f"case 5: {name}; assumed peaks: {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16, "
          f"{bandwidth / 1e12:.2f} TB/s memory bandwidth (SXM figures)"
          + (" | dry run at tiny sizes: the figures mean nothing" if args.dry_run else ""), flush=True)
    fig = case5_figures(args, device)
    args.figures[5] = fig
    rows, llm = [], fig["plan"]["llm"]
    if "training" in fig:
        tr = fig["training"]
        peak = f", peak memory {tr['peak_memory'] / 2**30:.1f} GiB" if tr["peak_memory"] is not None else ""
        print(f"    training: {tr['layers']} layers, {tr['batch']}x{tr['seq']} tokens, {tr['flops_per_step'] / 1e12:.1f} "
              f"TFLOP per step (fwd + bwd), {tr['tflops']:.0f} TFLOP/s{peak}")
        rows.append(("5", f"bf16 training MFU, {tr['layers']}-layer {llm} width, {tr['batch']}x{tr['seq']} tokens, "
                     f"step incl. AdamW", f"{tr['mfu']:.1%} ({tr['tflops']:.0f} TFLOP/s)", "-", "-", ">= 50%",
                     "yes" if tr["mfu"] >= 0.5 else "no"))
    for kind in ("eager", "compiled"):
        d = fig[f"decode_{kind}"]
        print(f"    decode {kind}: {d['ms_per_token']:.2f} ms/token, {d['tokens_per_s']:.0f} tok/s; reads "
              f"{d['bytes_per_token'] / 1e9:.2f} GB per token; roofline {d['roofline_ms']:.2f} ms"
              + (f"; CUDA graphs skipped {d['cudagraph_skips']} time(s)" if d["cudagraph_skips"] else ""))
        rows.append(("5", f"bf16 decode batch 1 ({kind}), {llm}, {fig['plan']['prompt']}-token prompt + "
                     f"{fig['plan']['tokens']} tokens", f"{d['tokens_per_s']:.0f} tok/s = {d['roofline_share']:.0%} of "
                     f"roofline", "-", "-", ">= 70%", "yes" if d["roofline_share"] >= 0.7 else "no"))
    tt = fig["ttft"]
    print(f"    time to first token: {tt['seconds'] * 1e3:.0f} ms ({tt['preset']}, {tt['prompt_tokens']} prompt tokens)")
    rows.append(("5", f"bf16 time to first token, {tt['preset']}, one image + 30-token question "
                 f"({tt['prompt_tokens']} tokens)", f"{tt['seconds'] * 1e3:.0f} ms", "-", "-", "-", "-"))
    return rows


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{model}, {os.cpu_count()} logical CPUs"
