"""train.py's configuration: the recipe as one TrainConfig, its presets, its command line, and the checks that
reject impossible settings before any work starts.

    cfg = parse_args(["--data", "llava.json", "--lr", "9e-5"])  # the llava preset's values, then every flag given
    check_config(cfg, ctx)                                       # SystemExit listing what cannot work (ctx: Dist)

A TrainConfig's defaults come from a preset (PRESETS): `synthetic` (the embedded task, when no --data is given) or
`llava` (the official recipe's, with --data); a flag overrides either. Each field is a flag (`--micro-batch` for
micro_batch) with its text in HELP and, where the values are few, its CHOICES; `python train.py --help` lists them.
check_config asks the ranks' Dist only for the world size and the device, and the CPU whether it computes bf16 as
a GPU does (cpu_supports_bf16) when --dtype bf16 runs there. Used by train.py, which runs the recipe; nothing here
builds a model or reads data."""
import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from data import PROMPT_STYLES
from lora import TARGETS
from train_dist import Dist


@dataclass
class TrainConfig:
    # what to train
    model: str = "tiny"              # 'tiny' (the embedded default, random init) or a Florence-VL checkpoint
    florence: str | None = None      # build from parts: a Florence-2 checkpoint (with llm) + a fresh projector
    llm: str | None = None
    stage: str = "both"              # pretrain | finetune | both
    # data
    data: str | None = None          # a LLaVA JSON/JSONL file; None: the embedded synthetic task
    images: str = "."
    max_len: int = 2048
    prompt_style: str = "official"
    # optimisation: AdamW, linear warm-up then cosine decay, as the official recipe
    global_batch: int = 32
    micro_batch: int = 16
    lr: float = 2e-3
    tower_lr_scale: float = 0.1      # the tower's lr as a share of lr when it trains (pretrain)
    warmup: float = 0.03
    weight_decay: float = 0.0
    clip: float = 1.0
    epochs: float = 1.0
    steps: int | None = None         # optimiser steps per stage (overrides epochs)
    seed: int = 0
    # system
    out: str = "runs/default"
    resume: str = "auto"
    save_every: int = 100
    keep: int = 2
    dtype: str = "auto"              # autocast: bf16 on CUDA, fp32 on CPU
    threads: int | None = None       # per rank; None: the usable cores shared out over the local ranks
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    log_every: int = 10
    # faults
    strict: bool = False
    skip_nonfinite: int = 0
    # LoRA for --stage finetune (lora.py): the LLM's base weights frozen, low-rank updates and the projector train
    lora: int = 0                    # the rank r; 0: full training
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple = TARGETS
    quantize: str | None = None      # int8: the frozen base LLM held as int8 (with --lora only)
    merge: bool = False              # also write the merged model (official layout) next to the adapter
    # the synthetic task only (train_synthetic.py)
    synthetic_size: tuple = (19200, 57600)
    vision_steps: int = 400
    text_only: bool = False
    eval_samples: int = 300


PRESETS = {
    # the embedded task: the dataclass defaults. A full-lr tower let the untrained LLM's first gradients
    # undo stage 0 (loss 0.26 vs 0.0009), hence 0.1 there
    "synthetic": dict(),
    # the official recipe: from a pretrained Florence-2 the tower trains at the full lr; --data is
    # instruction data unless --stage says otherwise
    "llava": dict(stage="finetune", lr=1e-5, tower_lr_scale=1.0),
}

HELP = {
    "model": "'tiny' (the embedded default, random init) or a Florence-VL checkpoint folder / hub id",
    "florence": "build from parts: a Florence-2 checkpoint (with --llm) + a fresh projector",
    "llm": "build from parts: a Llama-3.1 / Phi-3.5 checkpoint (with --florence)",
    "stage": "pretrain: everything trains, plain template, images resized to square; finetune: the tower is "
             "frozen, chat template, images padded to square; both: one after the other",
    "data": "a LLaVA JSON/JSONL file (default: the embedded synthetic task)",
    "images": "root folder of the images that --data names",
    "max_len": "max sequence length, visual tokens included",
    "prompt_style": "official: the ids the released models were trained on (data.py); clean: one BOS, <image> "
                    "left where the record has it",
    "global_batch": "samples per optimiser step over all ranks",
    "micro_batch": "samples per forward/backward on one rank",
    "lr": "peak learning rate",
    "tower_lr_scale": "the vision tower's lr as a share of --lr when it trains (pretrain)",
    "warmup": "warm-up share of the steps",
    "weight_decay": "AdamW's weight decay",
    "clip": "gradient-norm clipping",
    "epochs": "passes over the data per stage",
    "seed": "initial weights, data order and the synthetic data",
    "log_every": "optimiser steps between log lines",
    "steps": "optimiser steps per stage (overrides --epochs)",
    "out": "checkpoints, logs and the loss curve go here",
    "resume": "'auto' (the latest checkpoint in --out), 'none', or a folder",
    "save_every": "optimiser steps between checkpoints",
    "keep": "how many step checkpoints to keep",
    "dtype": "compute dtype: auto = bf16 on CUDA, fp32 on CPU. bf16 keeps the weights fp32 (the optimiser's master "
             "copy) and computes under bf16 autocast; with --fsdp the shards are gathered in bf16 and the gradients "
             "reduced in fp32",
    "threads": "intra-op threads per rank (default: the usable cores / the ranks on this machine; "
               "OMP_NUM_THREADS is not used, see the log line)",
    "compile": "torch.compile each LLM block",
    "activation_checkpointing": "recompute each LLM block, DaViT block and encoder layer in backward",
    "fsdp": "shard with FSDP2 (fully_shard per block) instead of DDP",
    "strict": "stop at the first sample that cannot be read (default: skip it and count it in the log)",
    "skip_nonfinite": "skip up to N steps with a non-finite loss or gradient (default 0: stop at the first)",
    "lora": "LoRA rank r for --stage finetune: the LLM's base weights frozen (bf16 on a GPU), a low-rank update "
            "trained beside each Linear, the projector trained fully, the tower frozen (default 0: full training)",
    "lora_alpha": "LoRA scale alpha: the update is alpha / r * B A",
    "lora_targets": "the LLM block Linears that get LoRA (default all: qkv_proj o_proj gate_up_proj down_proj)",
    "quantize": "with --lora: hold the frozen base LLM as int8 (quantize.py; QLoRA-style)",
    "merge": "with --lora: also write the merged model (official layout) to --out/merged",
    "synthetic_size": "synthetic task: training samples, one N for both stages or pretrain and finetune (600 and "
                      "1800 steps by default: the finetune questions take longer to learn)",
    "vision_steps": "synthetic task: steps of stage 0, where the random tiny tower first learns to name what "
                    "each grid cell holds (a stand-in for Florence-2's own pretraining; 0: skip it)",
    "text_only": "synthetic task without the images: the text-only baseline a model must beat",
    "eval_samples": "synthetic task: held-out questions scored at the end",
}
CHOICES = {"stage": ("pretrain", "finetune", "both"), "prompt_style": PROMPT_STYLES, "dtype": ("auto", "fp32", "bf16"),
           "quantize": ("int8",)}


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    """The command line -> TrainConfig: the preset's values (synthetic without --data, llava with it),
    then every flag given. `description` heads --help (train.py passes its own docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic, llava = TrainConfig(**PRESETS["synthetic"]), TrainConfig(**PRESETS["llava"])
    for f in dataclasses.fields(TrainConfig):
        flag, a, b = "--" + f.name.replace("_", "-"), getattr(synthetic, f.name), getattr(llava, f.name)
        default = f"default {a}" if a == b else f"default {a}; with --data {b}"
        text = HELP.get(f.name, "")
        text = text if "default" in text else f"{text} ({default})".strip()
        if isinstance(a, bool):
            p.add_argument(flag, action="store_true", default=None, help=text)
        elif f.name == "synthetic_size":
            p.add_argument(flag, type=int, nargs="+", metavar="N", help=text)
        elif f.name == "lora_targets":
            p.add_argument(flag, nargs="+", choices=TARGETS, help=text)
        else:
            kind = float if isinstance(a, float) else int if f.name in ("steps", "threads") or isinstance(a, int) \
                else str
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for name in ("synthetic_size", "lora_targets"):
        if name in given:
            given[name] = tuple(given[name])
    return TrainConfig(**{**PRESETS["llava" if given.get("data") else "synthetic"], **given})


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 as a GPU does: a bf16 matmul summed in fp32 and rounded once. A matmul of
    1024 products is checked against the exact (float64) one: within 2^-8 of its scale when right (measured
    2.3e-3), far outside when the sums are kept in bf16 (7.4e-2). Without native bf16 instructions (see
    cpu_has_native_bf16) ATen still computes this, through fp32, only slower."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 1024, generator=g).bfloat16(), torch.randn(1024, 64, generator=g).bfloat16()
    exact = a.double() @ b.double()
    return bool((a @ b).double().sub(exact).abs().max() <= 2 ** -8 * exact.abs().max())


def check_config(cfg: TrainConfig, ctx: Dist):
    """Rejects impossible settings before any work starts (SystemExit with the reason)."""
    problems = []
    if min(cfg.global_batch, cfg.micro_batch) < 1 or (cfg.steps is not None and cfg.steps < 1):
        problems.append("--global-batch, --micro-batch and --steps must be positive")
    elif cfg.global_batch % (cfg.micro_batch * ctx.world):
        problems.append(f"--global-batch {cfg.global_batch} is not a multiple of micro-batch x ranks = "
                        f"{cfg.micro_batch} x {ctx.world} = {cfg.micro_batch * ctx.world}")
    if bool(cfg.florence) != bool(cfg.llm):
        problems.append("--florence and --llm go together (a Florence-2 and an LLM checkpoint)")
    if (cfg.florence or cfg.llm) and cfg.stage == "finetune":
        problems.append("--stage finetune from --florence/--llm parts: the projector would be untrained; "
                        "pretrain first (--stage pretrain or both), or give a pretrained --model")
    if cfg.dtype == "bf16" and ctx.device.type == "cpu" and not cpu_supports_bf16():
        problems.append("--dtype bf16: this CPU has no bf16 support; use --dtype fp32")
    if cfg.resume not in ("auto", "none") and not (Path(cfg.resume) / "trainer.json").is_file():
        problems.append(f"--resume {cfg.resume}: no trainer.json there (not a complete checkpoint)")
    if cfg.data and not Path(cfg.data).is_file():
        problems.append(f"--data {cfg.data}: no such file")
    if cfg.data and not Path(cfg.images).is_dir():
        problems.append(f"--images {cfg.images}: no such folder")
    if cfg.tower_lr_scale < 0:
        problems.append("--tower-lr-scale must be >= 0")
    if len(cfg.synthetic_size) > 2 or min(cfg.synthetic_size) < 1:
        problems.append("--synthetic-size takes one or two positive numbers (pretrain, finetune)")
    if cfg.vision_steps < 0:
        problems.append("--vision-steps must be >= 0")
    if cfg.skip_nonfinite < 0 or cfg.save_every < 1:
        problems.append("--skip-nonfinite must be >= 0 and --save-every >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        problems.append("--threads must be >= 1")
    if cfg.lora < 0 or (cfg.lora and cfg.stage != "finetune"):
        problems.append("--lora R (R >= 1) is for --stage finetune (pretraining trains the whole model)")
    if (cfg.quantize or cfg.merge) and not cfg.lora:
        problems.append("--quantize and --merge go with --lora (a frozen base; a full run already writes the model)")
    if problems:
        raise SystemExit("train.py: " + "\n  ".join(["impossible settings:", *problems]))
