"""Stage 0 of the embedded synthetic task: the tiny tower learns to name what each scene cell holds.

Used by train.py before stages 1 and 2; real runs (a pretrained Florence-2) skip it."""
import time
from pathlib import Path

import torch

from checkpoint import read_weights, save_safetensors
from data import florence_preprocess
from fusion import FlorenceVL
from synthetic import CELL_CLASSES, SyntheticDataset, cell_labels
from train_checkpoint import barrier
from train_dist import STOP, Interrupted, all_sum, replicate, sync_table_rows

# Real runs start from a pretrained Florence-2 whose tower already names what is where. The tiny default's
# tower is random, and trained only through the LLM it first learns where things are and takes ~1300 steps
# to start reading colours, shapes and words (the default run stayed at ~15% held-out). So first, like
# Florence-2's dense region pretraining, the tower and encoder learn to name the content of each of the
# 9 cells: a linear head shared by the cells on the fused features (the last grid pooled to 3x3). The
# head is then dropped; stages 1 and 2 follow the recipe unchanged.
VISION_STAGE_FILE = "vision-stage0.safetensors"


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


def train_vision_stage(args, model, device, rank, world, log, n_images: int):
    out = Path(args.out)
    if args.resume != "none" and (out / VISION_STAGE_FILE).is_file():
        model.vision.load_state_dict(read_weights(out / VISION_STAGE_FILE))
        log(f"vision stage: loaded {out / VISION_STAGE_FILE}")
        return
    S, per_rank = model.cfg.vision.image_size, args.global_batch // world
    # drawn as in stage 1 (at the dataset's size, resized to S by preprocess)
    data = SyntheticDataset("train", n_images, seed=args.seed, flavour="pretrain")
    net = CellNamer(model).to(device)
    ddp = replicate(net, device, model.vision.encoder.embed_tokens.weight)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr or 2e-3, weight_decay=args.weight_decay, fused=True)
    log(f"vision stage: {args.vision_steps} steps of {args.global_batch} images, a head naming the 9 cells "
        f"({len(CELL_CLASSES)} classes) on the fused features")
    t_last, hits, seen = time.time(), 0.0, 0.0
    for step in range(args.vision_steps):
        # each rank takes its own stride of the step's images; the data wraps around after an epoch
        idx = [(step * args.global_batch + rank + k * world) % len(data) for k in range(per_rank)]
        pixels = florence_preprocess([data.image(i) for i in idx], pad_to_square=False, size=S).to(device)
        labels = torch.tensor([cell_labels(data.sample(i).scene) for i in idx], device=device)
        logits = ddp(pixels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()  # DDP averages over ranks: every rank has the same number of cells
        sync_table_rows(ddp, model, world)
        for group in optimizer.param_groups:  # warm-up, then constant (the head is thrown away at the end)
            group["lr"] = (args.lr or 2e-3) * min(1.0, (step + 1) / max(1, args.warmup * args.vision_steps))
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits, seen = hits + (logits.argmax(-1) == labels).sum().item(), seen + labels.numel()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_steps:
            loss_sum, hits, seen = all_sum([loss.item(), hits, seen], device)
            loss_avg, acc = loss_sum / world, hits / seen
            dt = time.time() - t_last
            log(f"vision step {step + 1:5d}/{args.vision_steps} | loss {loss_avg:.4f} | cells named right {acc:.1%} | "
                f"{args.global_batch * args.log_every / dt:,.0f} images/s",
                stage="vision", step=step + 1, loss=loss_avg, cell_accuracy=acc)
            t_last, hits, seen = time.time(), 0.0, 0.0
        if all_sum(float(STOP["signal"] > 0), device) > 0:  # stage 0 is short: it is redone on resume
            log(f"stopped by a signal in the vision stage at step {step + 1}; --resume auto starts it again")
            raise Interrupted()
    if rank == 0:  # atomic: a crash leaves no half-written file
        save_safetensors({k: v.cpu() for k, v in model.vision.state_dict().items()}, out / VISION_STAGE_FILE)
    barrier()
