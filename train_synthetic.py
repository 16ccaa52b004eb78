"""The embedded synthetic task as train.py runs it: the tiny model, its data, stage 0 and the held-out score.

train.py's recipe does not know it is running a demo: it asks its task (this, or LLaVATask in train.py) for
the model, the dataset of each stage, and what comes before and after the stages:
    before_stages: stage 0, where the random tiny tower first learns to name what each scene cell holds
                   (a stand-in for Florence-2's own pretraining; real runs start from a pretrained Florence-2)
    after_training: the held-out exact match of greedy answers (eval.py's) and the text-only baseline
"""
import time
from pathlib import Path

import torch

from checkpoint import read_weights, save_safetensors
from data import florence_preprocess
from eval import answer_all, exact_match, synthetic_records
from florence_encoder import FlorenceConfig
from fusion import FlorenceVL, FlorenceVLConfig
from model import LLMConfig
from schedule import lr_at
from synthetic import CELL_CLASSES, PAD_TOKEN, SyntheticDataset, cell_labels, synthetic_tokenizer
from train_checkpoint import STAGES, find_checkpoint
from train_dist import STOP, Interrupted, replicate, sync_table_rows

VISION_STAGE_FILE = "vision-stage0.safetensors"


def tiny_config(tokenizer) -> FlorenceVLConfig:
    """The demo's model: the tiny tower at 96 px (its last DaViT grid is then 3x3: one token per cell of the
    synthetic scenes) and a 4-layer, 128-wide Phi-3-style LLM over the synthetic tokenizer."""
    llm = LLMConfig.from_name("tiny", family="phi3", vocab_size=tokenizer.vocab_size, n_layers=4, hidden_size=128,
                              intermediate_size=384, n_heads=4, n_kv_heads=2,
                              eos_token_ids=(tokenizer.token_to_id("<|end|>"),),
                              pad_token_id=tokenizer.token_to_id(PAD_TOKEN))
    return FlorenceVLConfig(vision=FlorenceConfig.from_name("tiny", image_size=96), llm=llm)


def tiny_model() -> FlorenceVL:
    """--model tiny: the demo's model, randomly initialised (from torch's current seed)."""
    tokenizer = synthetic_tokenizer()
    return FlorenceVL(tiny_config(tokenizer), tokenizer)


class SyntheticTask:
    """The synthetic data of each stage, stage 0 before them, the held-out score after them."""

    def __init__(self, cfg):
        self.cfg = cfg

    def size(self, stage: str) -> int:
        sizes = self.cfg.synthetic_size
        return sizes[min(STAGES.index(stage), len(sizes) - 1)]

    def dataset(self, model, stage: str, split: str = "train", n: int | None = None, **common):
        return SyntheticDataset(split, n or self.size(stage), seed=self.cfg.seed, flavour=stage,
                                text_only=self.cfg.text_only, **common)

    def before_stages(self, model, ctx, log):
        """Stage 0, unless it is switched off, or a checkpoint of stage 1 or 2 (which holds the tower) exists."""
        cfg = self.cfg
        if cfg.model == "tiny" and not (cfg.florence or cfg.text_only) and cfg.vision_steps and \
                find_checkpoint(Path(cfg.out), cfg.resume) is None:
            train_vision_stage(cfg, model, ctx, log, self.size("pretrain"))

    def after_training(self, model, ctx, log):
        if ctx.rank == 0 and self.cfg.eval_samples:
            acc, base = self.evaluate(model, self.cfg.eval_samples)
            log(f"held-out exact match: {acc:.1%} on {self.cfg.eval_samples} questions | text-only baseline "
                f"(most frequent training answer to the same question): {base:.1%}",
                heldout_exact_match=acc, text_only_baseline=base)

    @torch.no_grad()
    def evaluate(self, model, n: int) -> tuple[float, float]:
        """Held-out exact match of greedy answers to single questions (eval.py's answer_all), and the
        text-only baseline: the training set's most frequent answer to the same question (the best a model
        can do without the image)."""
        model.eval()
        records = synthetic_records(model, n, self.cfg.seed)
        if self.cfg.text_only:
            records = [{**r, "image": None} for r in records]
        predictions = answer_all(model, records, batch_size=32, max_new_tokens=32, style=self.cfg.prompt_style)
        train = SyntheticDataset("train", min(self.size("finetune"), 5000), seed=self.cfg.seed)
        counts = {}
        for i in range(len(train)):
            s = train.sample(i)
            for turn, answer in zip(s.conversations[::2], s.answers):
                q = counts.setdefault(turn["value"].replace("<image>\n", ""), {})
                q[answer] = q.get(answer, 0) + 1
        hits = sum(exact_match(p, r["answers"]) for p, r in zip(predictions, records))
        baseline = 0
        for r in records:
            guess = counts.get(r["question"], {})
            baseline += bool(guess) and max(guess, key=guess.get) == r["answers"][0]
        model.train()
        return hits / n, baseline / n


# ---- stage 0 --------------------------------------------------------------------------------------------
# Trained only through the LLM, the random tiny tower first learns where things are and takes ~1300 steps to
# start reading colours, shapes and words (the default run stayed at ~15% held-out). So first, like
# Florence-2's dense region pretraining, the tower and encoder learn to name the content of each of the
# 9 cells: a linear head shared by the cells on the fused features (the last grid pooled to 3x3). The
# head is then dropped; stages 1 and 2 follow the recipe unchanged.

class CellNamer(torch.nn.Module):
    def __init__(self, model: FlorenceVL):
        super().__init__()
        self.vision = model.vision  # registered here so that DDP syncs it (and not the idle LLM)
        self.fused_features = model.fused_features
        self.grid = model.cfg.vision.vision.grid(model.cfg.vision.image_size)
        self.head = torch.nn.Linear(model.fusion.out_dim(model.cfg.vision.d_model), len(CELL_CLASSES))

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, 9, classes)
        features = self.fused_features(pixel_values)
        (h, w), B, C = self.grid, features.shape[0], features.shape[-1]
        grid = features[:, 1:1 + h * w].transpose(1, 2).reshape(B, C, h, w)  # without the mean token
        cells = torch.nn.functional.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, C)
        return self.head(cells)


def train_vision_stage(cfg, model, ctx, log, n_images: int):
    out = Path(cfg.out)
    if cfg.resume != "none" and (out / VISION_STAGE_FILE).is_file():
        model.vision.load_state_dict(read_weights(out / VISION_STAGE_FILE))
        log(f"vision stage: loaded {out / VISION_STAGE_FILE}")
        return
    S, per_rank, peak = model.cfg.vision.image_size, cfg.global_batch // ctx.world, cfg.lr
    # drawn as in stage 1 (at the dataset's size, resized to S by preprocess)
    data = SyntheticDataset("train", n_images, seed=cfg.seed, flavour="pretrain")
    net = CellNamer(model).to(ctx.device)
    ddp = replicate(net, ctx.device, model.vision.encoder.embed_tokens.weight)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay, fused=True)
    log(f"vision stage: {cfg.vision_steps} steps of {cfg.global_batch} images, a head naming the 9 cells "
        f"({len(CELL_CLASSES)} classes) on the fused features")
    t_last, hits, seen = time.time(), 0.0, 0.0
    for step in range(cfg.vision_steps):
        # each rank takes its own stride of the step's images; the data wraps around after an epoch
        idx = [(step * cfg.global_batch + ctx.rank + k * ctx.world) % len(data) for k in range(per_rank)]
        pixels = florence_preprocess([data.image(i) for i in idx], pad_to_square=False, size=S).to(ctx.device)
        labels = torch.tensor([cell_labels(data.sample(i).scene) for i in idx], device=ctx.device)
        logits = ddp(pixels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()  # DDP averages over ranks: every rank has the same number of cells
        sync_table_rows(ddp, model, ctx.world)
        for group in optimizer.param_groups:  # warm-up, then constant (the head is thrown away at the end)
            group["lr"] = lr_at(step, cfg.vision_steps, peak, cfg.warmup, decay="constant")
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits, seen = hits + (logits.argmax(-1) == labels).sum().item(), seen + labels.numel()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vision_steps:
            loss_sum, hits, seen = ctx.sum([loss.item(), hits, seen])
            loss_avg, acc = loss_sum / ctx.world, hits / seen
            dt = time.time() - t_last
            log(f"vision step {step + 1:5d}/{cfg.vision_steps} | loss {loss_avg:.4f} | cells named right {acc:.1%} | "
                f"{cfg.global_batch * cfg.log_every / dt:,.0f} images/s",
                stage="vision", step=step + 1, loss=loss_avg, cell_accuracy=acc)
            t_last, hits, seen = time.time(), 0.0, 0.0
        if ctx.sum(float(STOP["signal"] > 0)) > 0:  # stage 0 is short: it is redone on resume
            log(f"stopped by a signal in the vision stage at step {step + 1}; --resume auto starts it again")
            raise Interrupted()
    if ctx.rank == 0:  # atomic: a crash leaves no half-written file
        save_safetensors({k: v.cpu() for k, v in model.vision.state_dict().items()}, out / VISION_STAGE_FILE)
    ctx.barrier()
