"""Train Florence-VL end to end.

    python train.py                                  # the embedded default: a tiny model learns the synthetic
    torchrun --nproc_per_node=2 train.py             #   task: stage 0 (the tower names each scene cell, a
                                                     #   stand-in for Florence-2's pretraining), stage 1
                                                     #   (pretrain) then stage 2 (finetune)
    torchrun --nproc_per_node=8 train.py --model jiuhai/florence-vl-3b-pretrain --data llava.json \\
        --images /data/images --stage finetune --global-batch 1024 --lr 9e-5

One process per GPU (NCCL) or per CPU worker (gloo); multi-node through torchrun's usual variables.
The loss of a step is normalised by the supervised tokens of the whole step (all micro-steps, all
ranks), so N GPUs x 1 micro-step and 1 GPU x N micro-steps give the same gradient. Checkpoints are
written atomically (model in the official layout + optimiser, data position and RNG states);
`--resume auto` continues from the latest one, exactly.

Faults: a sample that cannot be read (DataError: bad record, bad image) is skipped and counted in the
log (`--strict`: the run stops naming it). A step with a non-finite loss or gradient norm is not
applied: the run stops naming the step and the sample ids (`--skip-nonfinite N`: up to N such steps
are skipped). SIGINT/SIGTERM: the current step finishes, a checkpoint is written, and the process exits
with 128 + the signal number (130 / 143); all ranks agree on stopping; `--resume auto` continues
exactly. A second signal stops at once. Impossible settings are rejected before any work starts.
"""
import argparse
import contextlib
import json
import math
import sys
import os
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, LLaVADataset, ResumableSampler, collate
from synthetic import PAD_TOKEN, SyntheticDataset, exact_match, synthetic_tokenizer
from fusion import IGNORE_INDEX, FlorenceVL, FlorenceVLConfig
from train_checkpoint import (STAGES, barrier, checkpoint_name, find_checkpoint, full_model_state, is_sharded,
                              load_checkpoint, save_checkpoint, unwrap)
from train_dist import (STOP, Interrupted, all_sum, install_signal_handlers, replicate, setup_distributed,
                        sync_table_rows)
from train_vision import train_vision_stage


# DaViT's depthwise conv weights are (C, 1, 3, 3): their grads come back with stride 1 on the size-1 dim
# where DDP's bucket has 9. Same memory layout, no copy is made; the warning is noise.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default="tiny", help="'tiny' (the embedded default, random init) or a Florence-VL "
                                                   "checkpoint folder / hub id")
    g.add_argument("--florence", help="build from parts: a Florence-2 checkpoint (with --llm) + a fresh projector")
    g.add_argument("--llm", help="build from parts: a Llama-3.1 / Phi-3.5 checkpoint (with --florence)")
    g.add_argument("--stage", choices=["pretrain", "finetune", "both"],
                   help="pretrain: everything trains, plain template, images resized to square; finetune: the "
                        "tower is frozen, chat template, images padded to square. Default: both on the "
                        "synthetic task, finetune on --data")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a LLaVA JSON/JSONL file (default: the embedded synthetic task)")
    g.add_argument("--images", default=".", help="root folder of the images that --data names")
    g.add_argument("--max-len", type=int, default=2048, help="max sequence length, visual tokens included")
    g.add_argument("--prompt-style", choices=["official", "clean"], default="official",
                   help="official: the ids the released models were trained on (data.py); clean: one BOS, <image> "
                        "left where the record has it")
    g.add_argument("--synthetic-size", type=int, nargs="+", default=[19200, 57600], metavar="N",
                   help="training samples of the synthetic task: one N for both stages, or pretrain and finetune "
                        "(default 19200 57600: 600 and 1800 steps; the finetune questions take longer to learn)")
    g.add_argument("--vision-steps", type=int, default=400,
                   help="synthetic task only: steps of stage 0, where the random tiny tower first learns to name "
                        "what each grid cell holds (a stand-in for Florence-2's own pretraining; 0: skip it)")
    g.add_argument("--text-only", action="store_true", help="synthetic task without the images: the text-only "
                                                             "baseline a model must beat")
    g = p.add_argument_group("optimisation (AdamW, cosine with warm-up, as the official recipe)")
    g.add_argument("--global-batch", type=int, default=32, help="samples per optimiser step over all ranks")
    g.add_argument("--micro-batch", type=int, default=16, help="samples per forward/backward on one rank")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-5, or 2e-3 on the synthetic task)")
    g.add_argument("--tower-lr-scale", type=float, help="the vision tower's lr as a share of --lr when it trains "
                   "(pretrain). Default: 1 with --data (the official recipe); 0.1 on the synthetic task, where a "
                   "full-lr tower let the untrained LLM's first gradients undo stage 0 (loss 0.26 vs 0.0009)")
    g.add_argument("--warmup", type=float, default=0.03, help="warm-up share of the steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--steps", type=int, help="optimiser steps per stage (overrides --epochs)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--out", default="runs/default", help="checkpoints, logs and the loss curve go here")
    g.add_argument("--resume", default="auto", help="'auto' (the latest checkpoint in --out), 'none', or a folder")
    g.add_argument("--save-every", type=int, default=100, help="optimiser steps between checkpoints")
    g.add_argument("--keep", type=int, default=2, help="how many step checkpoints to keep")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype: bf16 on CUDA, fp32 on CPU by default")
    g.add_argument("--compile", action="store_true", help="torch.compile each LLM block")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each LLM block in backward")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per block) instead of DDP")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-samples", type=int, default=300, help="held-out questions scored at the end (synthetic)")
    g = p.add_argument_group("faults")
    g.add_argument("--strict", action="store_true", help="stop at the first sample that cannot be read "
                                                         "(default: skip it and count it in the log)")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N steps with a non-finite loss or gradient (default 0: stop at the first)")
    return p.parse_args(argv)


def cpu_supports_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_args(args, world: int, device):
    """Rejects impossible settings before any work starts (SystemExit with the reason)."""
    problems = []
    if min(args.global_batch, args.micro_batch) < 1 or (args.steps is not None and args.steps < 1):
        problems.append("--global-batch, --micro-batch and --steps must be positive")
    elif args.global_batch % (args.micro_batch * world):
        problems.append(f"--global-batch {args.global_batch} is not a multiple of micro-batch x ranks = "
                        f"{args.micro_batch} x {world} = {args.micro_batch * world}")
    if bool(args.florence) != bool(args.llm):
        problems.append("--florence and --llm go together (a Florence-2 and an LLM checkpoint)")
    if (args.florence or args.llm) and args.stage == "finetune":
        problems.append("--stage finetune from --florence/--llm parts: the projector would be untrained; "
                        "pretrain first (--stage pretrain or both), or give a pretrained --model")
    if args.dtype == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        problems.append("--dtype bf16: this CPU has no bf16 support; use --dtype fp32")
    if args.resume not in ("auto", "none") and not (Path(args.resume) / "trainer.json").is_file():
        problems.append(f"--resume {args.resume}: no trainer.json there (not a complete checkpoint)")
    if args.data and not Path(args.data).is_file():
        problems.append(f"--data {args.data}: no such file")
    if args.data and not Path(args.images).is_dir():
        problems.append(f"--images {args.images}: no such folder")
    if args.tower_lr_scale is not None and args.tower_lr_scale < 0:
        problems.append("--tower-lr-scale must be >= 0")
    if len(args.synthetic_size) > 2 or min(args.synthetic_size) < 1:
        problems.append("--synthetic-size takes one or two positive numbers (pretrain, finetune)")
    if args.vision_steps < 0:
        problems.append("--vision-steps must be >= 0")
    if args.skip_nonfinite < 0 or args.save_every < 1:
        problems.append("--skip-nonfinite must be >= 0 and --save-every >= 1")
    if problems:
        raise SystemExit("train.py: " + "\n  ".join(["impossible settings:", *problems]))


class Log:
    """One line per step on rank 0: the console, and the same as JSONL in --out."""

    def __init__(self, out: Path, rank: int):
        self.rank, self.path = rank, out / "log.jsonl"

    def __call__(self, msg: str = "", **record):
        if self.rank:
            return
        print(msg, flush=True)
        if record:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---- model and data ------------------------------------------------------------------------------------
def build_model(args):
    if args.florence or args.llm:
        if not (args.florence and args.llm):
            raise SystemExit("--florence and --llm go together (a Florence-2 and an LLM checkpoint)")
        return FlorenceVL.from_parts(args.florence, args.llm)
    if args.model != "tiny":
        return FlorenceVL.from_pretrained(args.model)
    tok = synthetic_tokenizer()
    end = tok.token_to_id("<|end|>")
    cfg = FlorenceVLConfig.from_name("tiny")
    cfg.vision.image_size = 96  # the last DaViT grid is then 3x3: one token per cell of the synthetic scenes
    cfg.llm = type(cfg.llm)(**{**cfg.llm.__dict__, "vocab_size": tok.vocab_size, "n_layers": 4, "hidden_size": 128,
                               "intermediate_size": 384, "n_heads": 4, "n_kv_heads": 2, "head_dim": None,
                               "eos_token_ids": (end,), "pad_token_id": tok.token_to_id(PAD_TOKEN)})
    return FlorenceVL(cfg, tok)


def synthetic_size(args, stage: str) -> int:
    return args.synthetic_size[min(STAGES.index(stage), len(args.synthetic_size) - 1)]


def build_dataset(args, model, stage, split="train", n=None):
    template = "plain" if stage == "pretrain" else model.template
    common = dict(tokenizer=model.tokenizer, template=template, max_len=args.max_len, size=model.cfg.vision.image_size,
                  num_image_tokens=model.num_visual_tokens, pad_to_square=stage == "finetune", style=args.prompt_style)
    if args.data:
        return LLaVADataset(args.data, image_root=args.images, **common)
    return SyntheticDataset(split, n or synthetic_size(args, stage), seed=args.seed, flavour=stage,
                            text_only=args.text_only, **common)


def prepare(model, args):
    """Once per run, before any optimiser exists: activation checkpointing and compile per LLM block, and
    under --fsdp the FSDP2 sharding (fully_shard per block, then the rest), which replaces the parameters."""
    llm = model.llm
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        llm.layers = torch.nn.ModuleList(checkpoint_wrapper(b) for b in llm.layers)
    if args.compile:
        for b in llm.layers:
            b.compile()
    if args.fsdp and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard
        for b in llm.layers:
            fully_shard(b)
        fully_shard(model)
    return model

# ---- the loop ------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of the steps, then cosine decay to zero."""
    w = max(1, math.ceil(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    return 0.5 * peak * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def batches(dataset, sampler, micro_batch: int, pad_id: int, bad: list | None = None, strict: bool = False):
    """Endless micro-batches of this rank's shard, epoch after epoch (the sampler knows where it is).
    A sample that raises DataError is left out and its message appended to `bad` (strict: stop)."""
    bad = [] if bad is None else bad
    while True:
        indices = list(iter(sampler))
        for i in range(0, len(indices) - micro_batch + 1, micro_batch):
            items = []
            for j in indices[i:i + micro_batch]:
                try:
                    items.append(dataset[j])
                except DataError as e:
                    if strict:
                        raise SystemExit(f"bad sample (--strict): {e}") from e
                    bad.append(str(e))
                    if len(bad) <= 10:
                        print(f"skipped bad sample: {e}" + (" (further ones are only counted)" if len(bad) == 10
                                                            else ""), file=sys.stderr, flush=True)
            yield collate(items, pad_id)
        sampler.set_epoch(sampler.epoch + 1)


def gather_ids(micro: list) -> list:
    ids = [i for b in micro for i in b["ids"]]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, ids)
        ids = [i for rank_ids in every for i in rank_ids]
    return ids


def train_stage(args, stage, model, device, rank, world, log, history):
    raw = unwrap(model)
    raw.set_stage(stage)
    dataset = build_dataset(args, raw, stage)
    accum = args.global_batch // (args.micro_batch * world)  # divisible: check_args
    steps = args.steps or max(1, int(args.epochs * len(dataset) // args.global_batch))
    peak = args.lr or (2e-3 if not args.data else 1e-5)
    table = raw.vision.encoder.embed_tokens.weight
    ddp = raw if args.fsdp else replicate(raw, device, table)  # FSDP2 needs no wrapper
    params = [p for p in raw.parameters() if p.requires_grad]
    tower = {id(p) for p in raw.vision.parameters()}
    tower_scale = args.tower_lr_scale if args.tower_lr_scale is not None else 1.0 if args.data else 0.1
    groups = [{"params": [p for p in params if id(p) not in tower], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in tower], "lr_scale": tower_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=peak, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay, fused=True)  # one kernel per group, CUDA and CPU
    sampler = ResumableSampler(len(dataset), world, rank, seed=args.seed)
    start, faults = 0, {"bad_samples": 0, "nonfinite_steps": 0}
    ckpt = find_checkpoint(Path(args.out), args.resume)
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer.json").read_text())
        if saved["stage"] == stage:
            trainer = load_checkpoint(ckpt, ddp, optimizer, sampler, rank, device)
            start = trainer["step"]
            faults.update(trainer.get("faults", {}))
            history[:] = trainer.get("history", [])
            log(f"resumed {stage} from {ckpt} at step {start}/{steps}")
        elif STAGES.index(saved["stage"]) > STAGES.index(stage):
            log(f"skipping {stage}: {ckpt} is already in stage {saved['stage']}")
            return
    log(f"{stage}: {len(dataset)} samples, {steps} steps of {args.global_batch} (micro-batch {args.micro_batch} x "
        f"{world} ranks x {accum} accumulation), peak lr {peak:g}, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" or (
        args.dtype == "auto" and device.type == "cuda") else contextlib.nullcontext()
    bad = []  # this rank's bad samples since the last log line
    stream = batches(dataset, sampler, args.micro_batch, raw.tokenizer.token_to_id(PAD_TOKEN) or 0, bad, args.strict)
    fail_at = os.environ.get("TRAIN_FAIL_AT")  # test hook "rank:step": that rank raises at that step
    t_last, tokens_since = time.time(), 0
    for step in range(start, steps):
        if fail_at and fail_at == f"{rank}:{step + 1}":
            raise RuntimeError(f"forced failure (TRAIN_FAIL_AT={fail_at}) on rank {rank} at step {step + 1}")
        micro = [next(stream) for _ in range(accum)]
        loss_sum, n_local, tokens = 0.0, 0, 0
        for i, b in enumerate(micro):
            sync = i == accum - 1 or not isinstance(ddp, DDP)
            with (contextlib.nullcontext() if sync else ddp.no_sync()), amp:
                out = ddp(b["input_ids"].to(device), b["attention_mask"].to(device),
                          None if b["pixel_values"] is None else b["pixel_values"].to(device), b["labels"].to(device))
                out.loss_sum.backward()  # DDP averages the gradients over ranks
            loss_sum += out.loss_sum.item()
            n_local += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            tokens += int(b["attention_mask"].sum()) + int(b["has_image"].sum()) * (raw.num_visual_tokens - 1)
        sync_table_rows(ddp, raw, world)
        # the step's one collective besides the gradients: every rank gets the same totals and stop decision
        loss_sum, n_global, n_bad, tokens, stop = all_sum(
            [loss_sum, n_local, len(bad), tokens, float(STOP["signal"] > 0)], device)
        # the step's loss is sum(token losses) / (supervised tokens of the whole step on all ranks); the
        # gradients hold the ranks' mean of sum(token losses): scale them to match
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], world / max(n_global, 1))
        lr = lr_at(step, steps, peak, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
        loss = loss_sum / max(n_global, 1)
        tokens_since += tokens
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # both all-reduced: every rank agrees
        if finite:
            optimizer.step()
        else:
            faults["nonfinite_steps"] += 1
            what = (f"{stage} step {step + 1}: non-finite loss {loss} / grad norm {grad_norm} on samples "
                    f"{gather_ids(micro)}; the step was not applied")
            if faults["nonfinite_steps"] > args.skip_nonfinite:
                raise SystemExit(f"{what}; stopping ({faults['nonfinite_steps']} such step(s), --skip-nonfinite "
                                 f"{args.skip_nonfinite}); the last good checkpoint is in {args.out}")
            log(f"{what}; skipped ({faults['nonfinite_steps']} of --skip-nonfinite {args.skip_nonfinite})",
                stage=stage, step=step + 1, nonfinite_skipped=faults["nonfinite_steps"], ids=gather_ids(micro))
        optimizer.zero_grad(set_to_none=True)
        sampler.advance(args.micro_batch * accum)
        if finite:
            history.append({"stage": stage, "step": step + 1, "loss": loss})
        faults["bad_samples"] += int(n_bad)
        bad.clear()
        if finite and ((step + 1) % args.log_every == 0 or step + 1 == steps or step == start):
            dt = time.time() - t_last
            tps = tokens_since / dt
            eta = dt / max(1, (step + 1 - start) if step == start else args.log_every) * (steps - step - 1)
            log(f"{stage} step {step + 1:5d}/{steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tps:,.0f} tok/s | ETA {eta / 60:.1f} min | bad samples skipped {faults['bad_samples']}",
                stage=stage, step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                bad_samples=faults["bad_samples"])
            t_last, tokens_since = time.time(), 0
        stop = stop > 0  # summed over ranks above: every rank agrees
        if (step + 1) % args.save_every == 0 or step + 1 == steps or stop:
            save_checkpoint(Path(args.out), checkpoint_name(stage, step + 1), ddp, optimizer,
                            {"stage": stage, "step": step + 1, "sampler": sampler.state_dict(), "history": history,
                             "faults": faults}, rank, world, device, args.keep)
        if stop:
            log(f"stopped by a signal after {stage} step {step + 1}: checkpoint {checkpoint_name(stage, step + 1)} "
                f"written in {args.out}; continue with --resume auto")
            raise Interrupted()


# ---- evaluation and the end of a run -------------------------------------------------------------------
@torch.no_grad()
def evaluate_synthetic(args, model, device, n: int, batch: int = 32) -> tuple[float, float]:
    """Held-out exact match of greedy answers to single questions, and the text-only baseline: the
    training set's most frequent answer to the same question (the best a model can do without the image)."""
    from data import tokenize_prompt
    model.eval()
    held = build_dataset(args, model, "finetune", split="heldout", n=n)
    held.multi_turn = 0.0
    train = build_dataset(args, model, "finetune", n=min(synthetic_size(args, "finetune"), 5000))
    counts = {}
    for i in range(len(train)):
        s = train.sample(i)
        for turn, answer in zip(s.conversations[::2], s.answers):
            q = turn["value"].replace("<image>\n", "")
            counts.setdefault(q, {}).setdefault(answer, 0)
            counts[q][answer] += 1
    hits = baseline = 0
    for start in range(0, n, batch):
        samples = [held.sample(i) for i in range(start, min(n, start + batch))]
        prompts = [tokenize_prompt(s.conversations[:1], model.tokenizer, model.template, not args.text_only,
                                   style=args.prompt_style) for s in samples]
        T = max(map(len, prompts))
        ids = torch.full((len(prompts), T), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, :len(p)], mask[r, :len(p)] = torch.tensor(p), 1
        pixels = None if args.text_only else torch.stack(
            [held[i]["pixel_values"] for i in range(start, start + len(samples))])
        out = model.generate(ids.to(device), mask.to(device), None if pixels is None else pixels.to(device),
                             max_new_tokens=32)
        for s, tokens in zip(samples, out):
            hits += exact_match(model.tokenizer.decode(tokens), s.answers[0])
            guess = counts.get(s.conversations[0]["value"].replace("<image>\n", ""), {})
            baseline += bool(guess) and max(guess, key=guess.get) == s.answers[0]
    model.train()
    return hits / n, baseline / n


def draw_loss_curve(history: list, path: Path):
    """A plain PNG of loss per step, one colour per stage, drawn with Pillow."""
    from PIL import Image, ImageDraw
    if not history:
        return
    W, H, m = 800, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    losses = [h["loss"] for h in history]
    lo, hi = min(losses), max(losses)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    x = lambda i: m + (W - 1.5 * m) * i / max(1, len(history) - 1)
    y = lambda v: H - m - (H - 1.5 * m) * (v - lo) / max(hi - lo, 1e-9)
    colours = {"pretrain": (30, 90, 200), "finetune": (220, 90, 30)}
    for i in range(1, len(history)):
        d.line([x(i - 1), y(losses[i - 1]), x(i), y(losses[i])], fill=colours.get(history[i]["stage"], "black"),
               width=2)
    d.text((m, H - m + 8), f"step 1 .. {len(history)}   (blue: pretrain, orange: finetune)", fill="black")
    d.text((4, m // 2), f"{hi:.3f}", fill="black")
    d.text((4, H - m - 10), f"{lo:.3f}", fill="black")
    d.text((W // 2 - 40, 6), "training loss", fill="black")
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    install_signal_handlers()
    rank, world, device = setup_distributed()
    check_args(args, world, device)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    log = Log(out, rank)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args).to(device)
    if model.tokenizer is None:
        raise SystemExit("the model has no tokenizer.json; put one in the checkpoint folder")
    stages = [args.stage] if args.stage in STAGES else list(STAGES) if args.stage == "both" or not args.data \
        else ["finetune"]
    log(f"Florence-VL training on {world} x {device.type} | model {args.model} | stages {' -> '.join(stages)} | "
        f"{model.num_visual_tokens} visual tokens | out {out}")
    t0, history = time.time(), []
    try:
        if (args.model == "tiny" and not (args.florence or args.data or args.text_only) and args.vision_steps
                and find_checkpoint(out, args.resume) is None):  # a checkpoint of stage 1 or 2 holds the tower
            train_vision_stage(args, model, device, rank, world, log, synthetic_size(args, "pretrain"))
        model = prepare(model, args)  # after stage 0: FSDP replaces the parameters
        for stage in stages:
            train_stage(args, stage, model, device, rank, world, log, history)
    except Interrupted:
        # The checkpoint is written. When one worker exits, torchrun sends SIGTERM to the others; one that is
        # already shutting down (where Python restores the default handlers) would die of it instead of
        # exiting 143 like the rest, so from here on the stop signals are ignored.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(128 + (STOP["signal"] or signal.SIGTERM))
    log(f"trained in {(time.time() - t0) / 60:.1f} min")
    model_sd = full_model_state(model)  # a collective under FSDP
    if rank == 0:
        # the saved config says how the last stage saw its data, so that sample.py / eval.py do the same
        finetuned = stages[-1] == "finetune"
        model.cfg.image_aspect_ratio = "pad" if finetuned else "square"
        model.cfg.template = None if finetuned else "plain"
        model.save_pretrained(out / "final", state_dict=model_sd)
        draw_loss_curve(history, out / "loss.png")
        log(f"final model: {out / 'final'} (python sample.py --model {out / 'final'} --image ...) | "
            f"loss curve: {out / 'loss.png'}")
        if not args.data and args.eval_samples:
            if is_sharded(model):  # a sharded model generates only with every rank: score a whole copy
                model = FlorenceVL.from_pretrained(out / "final").to(device)
            acc, base = evaluate_synthetic(args, model, device, args.eval_samples)
            log(f"held-out exact match: {acc:.1%} on {args.eval_samples} questions | text-only baseline "
                f"(most frequent training answer to the same question): {base:.1%}",
                heldout_exact_match=acc, text_only_baseline=base)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
