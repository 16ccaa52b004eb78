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

The recipe is one TrainConfig. Its defaults come from a preset: `synthetic` (the embedded task, when no
--data is given) or `llava` (the official recipe's, with --data); a flag overrides either. What is
particular to the synthetic task (its tiny model, stage 0, the held-out score) is its task object
(train_synthetic.py); with --data the task is LLaVATask below, which adds nothing to the stages.

Faults: a sample that cannot be read (DataError: bad record, bad image) is skipped and counted in the
log (`--strict`: the run stops naming it). A step with a non-finite loss or gradient norm is not
applied: the run stops naming the step and the sample ids (`--skip-nonfinite N`: up to N such steps
are skipped). SIGINT/SIGTERM: the current step finishes, a checkpoint is written, and the process exits
with 128 + the signal number (130 / 143); all ranks agree on stopping; `--resume auto` continues
exactly. A second signal stops at once. Impossible settings are rejected before any work starts.
"""
import contextlib
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import cpu_has_native_bf16
from data import DataError, LLaVADataset, collate
from fusion import IGNORE_INDEX, TEMPLATE_OF, FlorenceVL
from lora import add_lora_, is_lora, merge_lora_, save_adapter, set_trainable_, trainable_summary
from lora import from_pretrained as load_checkpoint_or_adapter
from schedule import lr_at
from synthetic import PAD_TOKEN
from train_checkpoint import (STAGES, checkpoint_name, find_checkpoint, full_model_state, is_sharded,
                              load_checkpoint, save_checkpoint, unwrap)
from train_config import TrainConfig, check_config, parse_args
from train_dist import (STOP, Dist, Interrupted, ResumableSampler, choose_threads, install_signal_handlers,
                        replicate, setup_distributed, sync_table_rows)
from train_synthetic import SyntheticTask, tiny_model


# DaViT's depthwise conv weights are (C, 1, 3, 3): their grads come back with stride 1 on the size-1 dim
# where DDP's bucket has 9. Same memory layout, no copy is made; the warning is noise.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


# ---- the run's log --------------------------------------------------------------------------------------
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
class LLaVATask:
    """The recipe on LLaVA data (--data): its dataset, and nothing before or after the stages."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def dataset(self, model, stage: str, **common):
        return LLaVADataset(self.cfg.data, image_root=self.cfg.images, **common)

    def before_stages(self, model, ctx, log):
        pass

    def after_training(self, model, ctx, log):
        pass


def build_model(cfg: TrainConfig) -> FlorenceVL:
    """fp32 weights (the optimiser's master copy; autocast computes in bf16 on a GPU). With --lora the frozen
    base may be smaller: bf16 where the forward runs in bf16, or int8 (--quantize)."""
    if cfg.florence:
        return FlorenceVL.from_parts(cfg.florence, cfg.llm)
    if cfg.model == "tiny":
        return tiny_model()
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if cfg.lora and bf16 else torch.float32
    return FlorenceVL.from_pretrained(cfg.model, dtype=dtype, quantize=cfg.quantize)


def base_model(cfg: TrainConfig) -> str:
    """The base model an adapter names: an absolute path for a local folder (it must load from anywhere)."""
    return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model


def stage_template(model: FlorenceVL, stage: str) -> str:
    """Pretraining speaks the plain template; instruction tuning the model's chat template, also when it starts
    from a pretrain checkpoint, whose config says plain (the official recipe's --version phi3 / llama3)."""
    if stage == "pretrain":
        return "plain"
    return model.template if model.template != "plain" else TEMPLATE_OF[model.cfg.llm.family]


def stage_dataset(cfg: TrainConfig, task, model: FlorenceVL, stage: str):
    """The stage's data as the recipe sees it: plain template and images resized to a square for pretraining,
    the model's chat template and padded images for finetuning."""
    template = stage_template(model, stage)
    return task.dataset(model, stage, tokenizer=model.tokenizer, template=template, max_len=cfg.max_len,
                        size=model.cfg.vision.image_size, num_image_tokens=model.num_visual_tokens,
                        pad_to_square=stage == "finetune", style=cfg.prompt_style)


def prepare(model: FlorenceVL, cfg: TrainConfig, ctx: Dist) -> FlorenceVL:
    """Once per run, before any optimiser exists: activation checkpointing, compile per LLM block, and under
    --fsdp the FSDP2 sharding (fully_shard per block, then the rest), which replaces the parameters."""
    if cfg.lora:
        add_lora_(model.llm, cfg.lora, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        model.mm_projector.float()  # it trains fully: fp32, whatever the base is held in
    if cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    if cfg.compile:
        for b in model.llm.layers:
            b.compile()
    if cfg.fsdp and ctx.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16: the shards all-gathered and computed in bf16, the gradients reduced in fp32 onto the fp32 shards
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute(cfg, ctx) \
            else MixedPrecisionPolicy()
        for b in model.llm.layers:
            fully_shard(b, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def bf16_compute(cfg: TrainConfig, ctx: Dist) -> bool:
    """--dtype: bf16 compute over fp32 weights (auto: on CUDA), else fp32."""
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and ctx.device.type == "cuda")


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


# ---- one stage: set up, then one step at a time, logged and saved --------------------------------------
@dataclass
class Stage:
    """Everything one stage carries from step to step."""
    name: str
    dataset: object
    sampler: ResumableSampler
    ddp: object              # the model as it is run: DDP-wrapped, or the model itself (one process, FSDP2)
    params: list
    optimizer: torch.optim.Optimizer
    steps: int
    accum: int
    start: int
    faults: dict
    stream: object           # micro-batches (batches())
    bad: list                # this rank's bad samples since the last log line
    amp: object              # the autocast context of a forward
    t_last: float = 0.0
    tokens_since: int = 0


def setup_stage(cfg: TrainConfig, name: str, model: FlorenceVL, task, ctx: Dist, log, history: list):
    """The stage's data, wrapper, optimiser and position (resumed from the latest checkpoint if it is of this
    stage). None when a checkpoint shows the stage is already done."""
    raw = unwrap(model)
    raw.set_stage(name)
    lora = is_lora(raw)
    if lora:
        set_trainable_(raw)
    dataset = stage_dataset(cfg, task, raw, name)
    accum = cfg.global_batch // (cfg.micro_batch * ctx.world)  # divisible: check_config
    steps = cfg.steps or max(1, int(cfg.epochs * len(dataset) // cfg.global_batch))
    table = raw.vision.encoder.embed_tokens.weight
    ddp = raw if cfg.fsdp else replicate(raw, ctx.device, table)  # FSDP2 needs no wrapper
    params = [p for p in raw.parameters() if p.requires_grad]
    tower = {id(p) for p in raw.vision.parameters()}
    groups = [{"params": [p for p in params if id(p) not in tower], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in tower], "lr_scale": cfg.tower_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, fused=True)  # one kernel per group, CUDA and CPU
    sampler = ResumableSampler(len(dataset), ctx.world, ctx.rank, seed=cfg.seed)
    start, faults = 0, {"bad_samples": 0, "nonfinite_steps": 0}
    ckpt = find_checkpoint(Path(cfg.out), cfg.resume)
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer.json").read_text())
        if saved["stage"] == name:
            trainer = load_checkpoint(ckpt, ddp, optimizer, sampler, ctx)
            start = trainer["step"]
            faults.update(trainer.get("faults", {}))
            history[:] = trainer.get("history", [])
            log(f"resumed {name} from {ckpt} at step {start}/{steps}")
        elif STAGES.index(saved["stage"]) > STAGES.index(name):
            log(f"skipping {name}: {ckpt} is already in stage {saved['stage']}")
            return None
    log(f"{name}: {len(dataset)} samples, {steps} steps of {cfg.global_batch} (micro-batch {cfg.micro_batch} x "
        f"{ctx.world} ranks x {accum} accumulation), peak lr {cfg.lr:g}, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")
    if lora:
        log(trainable_summary(raw, params))
    amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16_compute(cfg, ctx) else contextlib.nullcontext()
    bad = []
    stream = batches(dataset, sampler, cfg.micro_batch, raw.tokenizer.token_to_id(PAD_TOKEN) or 0, bad, cfg.strict)
    return Stage(name, dataset, sampler, ddp, params, optimizer, steps, accum, start, faults, stream, bad, amp,
                 t_last=time.time())


def train_step(cfg: TrainConfig, st: Stage, model: FlorenceVL, ctx: Dist, step: int) -> dict:
    """One optimiser step: the micro-steps, one small all-reduce of the step's totals, the gradient scaled
    to the whole step's token count, the update (or, for a non-finite loss or gradient, none)."""
    raw = unwrap(model)
    micro = [next(st.stream) for _ in range(st.accum)]
    loss_sum, n_local, tokens = 0.0, 0, 0
    for i, b in enumerate(micro):
        last = i == st.accum - 1  # gradients are reduced over ranks once, after the last micro-step
        if hasattr(st.ddp, "set_requires_gradient_sync"):  # FSDP2: no reduce-scatter until then
            st.ddp.set_requires_gradient_sync(last)
        with (contextlib.nullcontext() if last or not isinstance(st.ddp, DDP) else st.ddp.no_sync()), st.amp:
            out = st.ddp(b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device),
                         None if b["pixel_values"] is None else b["pixel_values"].to(ctx.device),
                         b["labels"].to(ctx.device))
            out.loss_sum.backward()  # DDP averages the gradients over ranks
        loss_sum += out.loss_sum.item()
        n_local += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        tokens += int(b["attention_mask"].sum()) + int(b["has_image"].sum()) * (raw.num_visual_tokens - 1)
    sync_table_rows(st.ddp, raw, ctx.world)
    # the step's one collective besides the gradients: every rank gets the same totals and stop decision
    loss_sum, n_global, n_bad, tokens, stop = ctx.sum(
        [loss_sum, n_local, len(st.bad), tokens, float(STOP["signal"] > 0)])
    # the step's loss is sum(token losses) / (supervised tokens of the whole step on all ranks); the
    # gradients hold the ranks' mean of sum(token losses): scale them to match
    torch._foreach_mul_([p.grad for p in st.params if p.grad is not None], ctx.world / max(n_global, 1))
    lr = lr_at(step, st.steps, cfg.lr, cfg.warmup)
    for group in st.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    grad_norm = torch.nn.utils.clip_grad_norm_(st.params, cfg.clip).item()
    loss = loss_sum / max(n_global, 1)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)  # both all-reduced: every rank agrees
    if finite:
        st.optimizer.step()
    else:
        st.faults["nonfinite_steps"] += 1
        what = (f"{st.name} step {step + 1}: non-finite loss {loss} / grad norm {grad_norm} on samples "
                f"{gather_ids(micro)}; the step was not applied")
        if st.faults["nonfinite_steps"] > cfg.skip_nonfinite:
            raise SystemExit(f"{what}; stopping ({st.faults['nonfinite_steps']} such step(s), --skip-nonfinite "
                             f"{cfg.skip_nonfinite}); the last good checkpoint is in {cfg.out}")
        log_line = (f"{what}; skipped ({st.faults['nonfinite_steps']} of --skip-nonfinite {cfg.skip_nonfinite})",
                    dict(stage=st.name, step=step + 1, nonfinite_skipped=st.faults["nonfinite_steps"],
                         ids=gather_ids(micro)))
    st.optimizer.zero_grad(set_to_none=True)
    st.sampler.advance(cfg.micro_batch * st.accum)
    return dict(loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, n_bad=n_bad, stop=stop > 0, finite=finite,
                skipped=None if finite else log_line)


def log_and_save(cfg: TrainConfig, st: Stage, step: int, r: dict, ctx: Dist, log, history: list):
    """The step's log line (every --log-every steps), checkpoint (every --save-every steps, at the end, and
    when a signal asked to stop: then Interrupted)."""
    if r["skipped"]:
        log(r["skipped"][0], **r["skipped"][1])
    st.tokens_since += r["tokens"]
    if r["finite"]:
        history.append({"stage": st.name, "step": step + 1, "loss": r["loss"]})
    st.faults["bad_samples"] += int(r["n_bad"])
    st.bad.clear()
    if r["finite"] and ((step + 1) % cfg.log_every == 0 or step + 1 == st.steps or step == st.start):
        dt = time.time() - st.t_last
        tps = st.tokens_since / dt
        eta = dt / max(1, (step + 1 - st.start) if step == st.start else cfg.log_every) * (st.steps - step - 1)
        log(f"{st.name} step {step + 1:5d}/{st.steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm "
            f"{r['grad_norm']:.3f} | {tps:,.0f} tok/s | ETA {eta / 60:.1f} min | bad samples skipped "
            f"{st.faults['bad_samples']}",
            stage=st.name, step=step + 1, loss=r["loss"], lr=r["lr"], grad_norm=r["grad_norm"], tokens_per_s=tps,
            bad_samples=st.faults["bad_samples"])
        st.t_last, st.tokens_since = time.time(), 0
    if (step + 1) % cfg.save_every == 0 or step + 1 == st.steps or r["stop"]:
        save_checkpoint(Path(cfg.out), checkpoint_name(st.name, step + 1), st.ddp, st.optimizer,
                        {"stage": st.name, "step": step + 1, "sampler": st.sampler.state_dict(), "history": history,
                         "faults": st.faults, "base_model": base_model(cfg)}, ctx, cfg.keep)
    if r["stop"]:
        log(f"stopped by a signal after {st.name} step {step + 1}: checkpoint {checkpoint_name(st.name, step + 1)} "
            f"written in {cfg.out}; continue with --resume auto")
        raise Interrupted()


def train_stage(cfg: TrainConfig, name: str, model: FlorenceVL, task, ctx: Dist, log, history: list):
    st = setup_stage(cfg, name, model, task, ctx, log, history)
    if st is None:
        return
    for step in range(st.start, st.steps):
        log_and_save(cfg, st, step, train_step(cfg, st, model, ctx, step), ctx, log, history)


# ---- the end of a run ----------------------------------------------------------------------------------
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


def finish(cfg: TrainConfig, model: FlorenceVL, task, stages: list, history: list, ctx: Dist, log):
    """The final model in the official layout (its config saying how the last stage saw its data, so that
    sample.py / eval.py do the same), the loss curve, and the task's last word (the synthetic held-out score)."""
    out = Path(cfg.out)
    model_sd = full_model_state(model)  # a collective under FSDP
    if ctx.rank == 0:
        finetuned = stages[-1] == "finetune"
        model.cfg.image_aspect_ratio = "pad" if finetuned else "square"
        model.cfg.template = None if finetuned else "plain"
        model.template = stage_template(model, stages[-1])  # what the held-out score below asks in
        if is_lora(model):  # the adapter; --merge: also the merged model, read back from base + adapter
            save_adapter(model, out / "final", base_model(cfg), model_sd)
            if cfg.merge:
                merged = load_checkpoint_or_adapter(out / "final", dtype=torch.float32)
                log(f"merged {merge_lora_(merged)} LoRA layers: {out / 'merged'}")
                merged.save_pretrained(out / "merged")
        else:
            model.save_pretrained(out / "final", state_dict=model_sd)
        draw_loss_curve(history, out / "loss.png")
        log(f"final model: {out / 'final'} (python sample.py --model {out / 'final'} --image ...) | "
            f"loss curve: {out / 'loss.png'}")
        if is_sharded(model):  # a sharded model generates only with every rank: use a whole copy
            model = load_checkpoint_or_adapter(out / "final").to(ctx.device)
    task.after_training(model, ctx, log)


def main(argv=None):
    cfg = parse_args(argv, description=__doc__)
    install_signal_handlers()
    ctx = setup_distributed()
    check_config(cfg, ctx)
    _, threads_note = choose_threads(cfg.threads, ctx)
    out = Path(cfg.out)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    log = Log(out, ctx.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg).to(ctx.device)
    if model.tokenizer is None:
        raise SystemExit("the model has no tokenizer: put its tokenizer.json, or tokenizer.model with "
                         "tokenizer_config.json, in the checkpoint folder")
    task = LLaVATask(cfg) if cfg.data else SyntheticTask(cfg)
    stages = list(STAGES) if cfg.stage == "both" else [cfg.stage]
    log(f"Florence-VL training on {ctx.world} x {ctx.device.type} | model {cfg.model} | stages {' -> '.join(stages)} | "
        f"{model.num_visual_tokens} visual tokens | out {out} | {threads_note}")
    if bf16_compute(cfg, ctx) and ctx.device.type == "cpu" and not cpu_has_native_bf16():
        log("--dtype bf16 on a CPU without native bf16 (oneDNN finds no AVX512-BF16 / AMX): computed through fp32, "
            "the numbers bf16 gives, several times slower than --dtype fp32")
    t0, history = time.time(), []
    try:
        task.before_stages(model, ctx, log)
        model = prepare(model, cfg, ctx)  # after stage 0: FSDP replaces the parameters
        for stage in stages:
            train_stage(cfg, stage, model, task, ctx, log, history)
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
    finish(cfg, model, task, stages, history, ctx, log)
    ctx.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
