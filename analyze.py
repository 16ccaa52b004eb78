"""The paper's two analyses of Florence-2's feature sets [V, V'_caption, V'_OCR, V'_region] as tools.

    python analyze.py pca   --model runs/default/final --image photo.jpg --out pca.png
    python analyze.py align --model runs/default/final                      # the embedded synthetic captions
    python analyze.py align --model jiuhai/florence-vl-3b-sft --data captions.json --images /data --device cuda

pca (Figure 3): for each feature set, the first three principal components of its grid tokens (the
tokens after the mean token, 24x24 at 768 px), each min-max scaled to 0..255 and shown as R, G, B next
to the input image. --model may also be a plain Florence-2 checkpoint.

align (Section 4): how well a frozen LLM predicts captions from each feature set. A fresh projector
per set (V, each V'_k alone, and the channel-concatenated fused set) is trained on captions in the
plain template (<image> then the caption); only the projector learns. The tower runs once per image
(its outputs are cached), and every set sees the same batches in the same order. Reported: the
held-out caption loss of each set, as a table, a JSON file and a PNG bar chart.
"""
import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from checkpoint import DTYPES, read_config, resolve
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLaVADataset, right_pad, tokenize_conversation, truncate
from florence_encoder import FlorenceVision, expand_to_square, preprocess, prompt_ids
from fusion import FlorenceVL, build_projector
from schedule import lr_at

PROMPT_NAMES = ("caption", "OCR", "region")  # the three task prompts of florence_encoder.TASK_PROMPTS, in order


# ---- PCA pictures --------------------------------------------------------------------------------------
def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(N, D) tokens -> (N, 3) uint8: their projections on the first three principal components, each
    min-max scaled to 0..255. A component's sign is arbitrary; it is fixed so that the largest loading
    is positive (as sklearn's svd_flip), so the same features always give the same colours. Components
    that do not exist or carry no variance (rank < 3) stay black rather than showing rounding noise."""
    x = tokens.astype(np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)                       # rows of vt: components, by variance
    k = int(np.sum(s[:3] > 1e-9 * max(s[0], 1e-300))) if len(s) else 0
    vt = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    proj = np.pad(x @ vt.T, ((0, 0), (0, 3 - k)))                          # (N, 3)
    lo, hi = proj.min(0), proj.max(0)
    scaled = (proj - lo) / np.where(hi > lo, hi - lo, 1.0) * 255
    return np.round(scaled).astype(np.uint8)


def grid_tokens(features: torch.Tensor) -> np.ndarray:
    """(1+h*w, D) features of one image -> (h, w, D) grid (the mean token dropped)."""
    n = features.shape[0] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} grid tokens do not form a square grid")
    return features[1:].float().cpu().numpy().reshape(side, side, -1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def tile_size(grid: int, at_least: int = 256) -> int:
    """The smallest multiple of the grid side >= at_least: every token becomes a whole square of pixels."""
    return grid * math.ceil(at_least / grid)


def picture(image: Image.Image, grids: list, labels: list, tile: int, margin: int = 8, band: int = 24) -> Image.Image:
    """The image, then one PCA tile per (h, w, 3) uint8 grid, left to right, each labelled above.
    Tile i's top left corner is at (margin + i * (tile + margin), band): see tile_origin."""
    n = 1 + len(grids)
    canvas = Image.new("RGB", (margin + n * (tile + margin), band + tile + margin), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    tiles = [image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)]
    tiles += [Image.fromarray(g).resize((tile, tile), Image.Resampling.NEAREST) for g in grids]
    for i, (t, label) in enumerate(zip(tiles, ["image"] + list(labels))):
        x, y = tile_origin(i, tile, margin, band)
        canvas.paste(t, (x, y))
        draw.text((x, 4), label, fill="black", font=font)
    return canvas


def tile_origin(i: int, tile: int, margin: int = 8, band: int = 24) -> tuple:
    return margin + i * (tile + margin), band


def load_tower(name: str, dtype=torch.float32):
    """(tower, (K, L) prompt ids, masked, labels, pad_to_square) from a Florence-VL or a Florence-2 checkpoint."""
    folder = resolve(name, allow_patterns=["*.json"])
    hf = read_config(folder)
    if "mm_projector_type" in hf:
        model = FlorenceVL.from_pretrained(name, dtype=dtype)
        prompts = model.cfg.prompts if model.prompt_ids.shape[0] else (0, 1, 2)
        return (model.vision, prompt_ids()[list(prompts)], model.cfg.masked_prompts,
                ["V"] + [PROMPT_NAMES[k] for k in prompts], model.cfg.image_aspect_ratio == "pad")
    tower = FlorenceVision.from_pretrained(name, dtype=dtype).eval()
    pre = folder / "preprocessor_config.json"  # the input size lives there (768 for the released models)
    if pre.is_file():
        tower.cfg.image_size = json.loads(pre.read_text()).get("size", {}).get("height", tower.cfg.image_size)
    return tower, prompt_ids(), False, ["V", *PROMPT_NAMES], False  # Florence-2's own processor resizes


@torch.no_grad()
def run_pca(args):
    dtype = DTYPES[args.dtype]
    tower, ids, masked, labels, pad = load_tower(args.model, dtype)
    tower = tower.to(args.device)
    image = Image.open(args.image).convert("RGB")
    square = expand_to_square(image) if pad else image
    pixels = preprocess([image], pad_to_square=pad, size=tower.cfg.image_size).to(args.device, dtype)
    features = tower.multi_prompt_features(pixels, prompt_ids=ids, masked=masked)  # [V, V'_1, ...] (1, 1+N, D)
    grids = []
    for f in features:
        g = grid_tokens(f[0])                                                         # (h, w, D)
        grids.append(pca_rgb(g.reshape(-1, g.shape[-1])).reshape(*g.shape[:2], 3))   # (h, w, 3)
    tile = tile_size(grids[0].shape[0], args.tile)
    picture(square, grids, labels, tile).save(args.out)
    print(f"{args.out}: the image and the top-3 principal components of {', '.join(labels)} "
          f"({grids[0].shape[0]}x{grids[0].shape[1]} grid tokens, {features[0].shape[-1]} channels each)")


# ---- the alignment probe -------------------------------------------------------------------------------
def caption_records(args, model):
    """(train, held-out) lists of (image, caption); an image is a PIL image or a function that loads one
    (files are opened only when their features are computed)."""
    if args.data is None:
        from synthetic import SyntheticDataset
        out = []
        for split, n in (("train", args.n_train), ("heldout", args.n_heldout)):
            ds = SyntheticDataset(split, n, seed=args.seed, flavour="pretrain", image_size=model.cfg.vision.image_size)
            out.append([(ds.image(i), ds.sample(i).conversations[1]["value"]) for i in range(n)])
        return out
    ds = LLaVADataset(args.data, model.tokenizer, "plain", image_root=args.images)
    pairs = []
    for i in range(min(len(ds), args.n_train + args.n_heldout)):
        r = ds.record(i)
        caption = r.get("caption") or next((t["value"] for t in r.get("conversations", []) if t["from"] == "gpt"), None)
        if caption and r.get("image"):
            pairs.append((functools.partial(ds.load_image, i, r), caption))
    n_held = max(1, round(len(pairs) * args.n_heldout / (args.n_train + args.n_heldout)))
    if len(pairs) < 2:
        raise SystemExit(f"{args.data}: fewer than 2 records with an image and a caption")
    return pairs[:-n_held], pairs[-n_held:]  # the file's last records are held out


def tokenize_captions(model, pairs, max_len):
    """Plain template: [BOS] <image> caption \\n, the caption and \\n supervised. Pairs that cannot fit are dropped."""
    kept_pairs, tokens = [], []
    for image, caption in pairs:
        conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
        kept = truncate(*tokenize_conversation(conv, model.tokenizer, "plain", True), max_len,
                        model.vision.num_image_tokens)
        if kept is not None:
            kept_pairs.append((image, caption))
            tokens.append(kept)
    return kept_pairs, tokens


@torch.no_grad()
def cache_features(model, pairs, ids, masked, batch, device, dtype) -> list:
    """The tower once per image: [V, V'_1, ...], each (n, 1+N, D). Images are resized to a square, as in
    pretraining (the plain template's stage)."""
    chunks = []
    for s in range(0, len(pairs), batch):
        images = [(im() if callable(im) else im).convert("RGB") for im, _ in pairs[s:s + batch]]
        pixels = preprocess(images, size=model.cfg.vision.image_size)
        chunks.append(model.vision.multi_prompt_features(pixels.to(device, dtype), prompt_ids=ids.to(device),
                                                         masked=masked))
    return [torch.cat(c) for c in zip(*chunks)]


def pad_batch(tokens: list, idx, pad_id: int, device):
    """Right-padded (input_ids, attention_mask, labels) of the captions idx."""
    ids, mask = right_pad([tokens[i][0] for i in idx], pad_id)
    labels, _ = right_pad([tokens[i][1] for i in idx], IGNORE_INDEX)
    return ids.to(device), mask.to(device), labels.to(device)


def caption_loss(model, visual, ids, mask, labels):
    """(sum of the caption tokens' cross-entropy, their number) under the frozen LLM; visual (B, N, H) or
    None (text only). As FlorenceVL.forward, with the visual tokens given instead of computed."""
    return model.supervised_loss(*model.splice(ids, mask, labels, visual))


@torch.no_grad()
def heldout_loss(model, project, cache, tokens, pad_id, device, batch=64) -> float:
    """Mean cross-entropy per caption token over the held-out set; project(idx) -> visual tokens or None."""
    total, n = 0.0, 0
    for s in range(0, len(tokens), batch):
        idx = list(range(s, min(len(tokens), s + batch)))
        loss_sum, k = caption_loss(model, project(idx), *pad_batch(tokens, idx, pad_id, device))
        total, n = total + loss_sum.item(), n + k
    return total / max(n, 1)


def train_probe(model, which, train, held, args, order, pad_id, device) -> dict:
    """A fresh projector on the feature sets `which` (indices into the cache, channel-concatenated), trained
    on `order`'s batches with AdamW and a warm-up + cosine schedule. Returns its held-out loss history."""
    (train_cache, train_tok), (held_cache, held_tok) = train, held
    in_dim = sum(train_cache[j].shape[-1] for j in which)
    torch.manual_seed(args.seed)  # the same initial weights for sets of the same width
    projector = build_projector(model.cfg.projector, in_dim, model.cfg.llm.hidden_size).to(device)
    dtype = next(model.llm.parameters()).dtype
    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)

    def project(cache):
        return lambda idx: projector(torch.cat([cache[j][idx] for j in which], -1).float()).to(dtype)

    history = [(0, heldout_loss(model, project(held_cache), held_cache, held_tok, pad_id, device))]
    running = None
    for step, idx in enumerate(order):
        lr = lr_at(step, len(order), args.lr, 0.03)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum, n = caption_loss(model, project(train_cache)(idx), *pad_batch(train_tok, idx, pad_id, device))
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss_sum.item() / n if running is None else 0.9 * running + 0.1 * loss_sum.item() / n
        if (step + 1) % args.eval_every == 0 or step + 1 == len(order):
            history.append((step + 1, heldout_loss(model, project(held_cache), held_cache, held_tok, pad_id, device)))
    return {"in_dim": in_dim, "train_loss": running, "heldout": history, "final": history[-1][1]}


def run_align(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = FlorenceVL.from_pretrained(args.model, dtype=dtype).to(device).eval().requires_grad_(False)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json")
    pad_id = model.cfg.llm.pad_token_id if model.cfg.llm.pad_token_id is not None else 0
    prompts = model.cfg.prompts if model.prompt_ids.shape[0] else (0, 1, 2)
    names = ["V"] + [PROMPT_NAMES[k] for k in prompts]
    t0 = time.time()
    train_pairs, held_pairs = caption_records(args, model)
    splits = []
    for pairs in (train_pairs, held_pairs):
        pairs, tokens = tokenize_captions(model, pairs, args.max_len)
        cache = cache_features(model, pairs, prompt_ids()[list(prompts)], model.cfg.masked_prompts, args.batch_size,
                               device, dtype)
        splits.append((cache, tokens))
    print(f"features of {len(splits[0][1])} training and {len(splits[1][1])} held-out images cached "
          f"({', '.join(names)}: {tuple(splits[0][0][0].shape[1:])} each) in {time.time() - t0:.0f} s")
    g = torch.Generator().manual_seed(args.seed)
    n_train, order = len(splits[0][1]), []
    while len(order) < args.steps:  # epochs of shuffled batches, the same for every feature set
        perm = torch.randperm(n_train, generator=g).tolist()
        order += [perm[i:i + args.batch_size] for i in range(0, n_train - args.batch_size + 1, args.batch_size)] \
            or [perm]
    order = order[:args.steps]

    held_cache, held_tok = splits[1]
    text_only = [tuple(list(x) for x in zip(*[(t, l) for t, l in zip(ids, labels) if t != IMAGE_TOKEN_INDEX]))
                 for ids, labels in held_tok]  # the same captions with no image in front
    refs = {"text only (no image)": heldout_loss(model, lambda idx: None, None, text_only, pad_id, device)}
    if model.fusion.num_sets == len(held_cache) or model.fusion.mode == "low":
        own = lambda idx: model.mm_projector(model.fusion([c[idx] for c in held_cache][:model.fusion.num_sets]))
        refs[f"the model's own projector ({model.fusion.mode} fusion, not retrained)"] = heldout_loss(
            model, own, held_cache, held_tok, pad_id, device)
    sets = {name: [j] for j, name in enumerate(names)}
    sets[f"fused ({' + '.join(names)})"] = list(range(len(names)))
    results = {}
    for name, which in sets.items():
        t = time.time()
        results[name] = train_probe(model, which, splits[0], splits[1], args, order, pad_id, device)
        r = results[name]
        print(f"  {name:<32} held-out loss {r['heldout'][0][1]:.4f} -> {r['final']:.4f}  ({time.time() - t:.0f} s)")
    return {"model": str(args.model), "data": args.data or "synthetic", "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "n_train": n_train, "n_heldout": len(held_tok), "sets": results,
            "references": refs, "seconds": time.time() - t0}


def table(report: dict) -> str:
    lines = [f"{'feature set':<34} {'dim':>5} {'held-out loss':>14} {'(at step 0)':>12} {'train loss':>11}"]
    for name, r in report["sets"].items():
        lines.append(f"{name:<34} {r['in_dim']:>5} {r['final']:>14.4f} {r['heldout'][0][1]:>12.4f} "
                     f"{r['train_loss']:>11.4f}")
    for name, loss in report["references"].items():
        lines.append(f"reference: {name}: {loss:.4f}")
    return "\n".join(lines)


def bar_chart(report: dict, path, width=720, height=420):
    """Held-out caption loss per feature set (bars) and the references (dashed lines), Pillow only."""
    sets, refs = report["sets"], report["references"]
    values = [r["final"] for r in sets.values()]
    top = max(values + list(refs.values())) * 1.1
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, left, bottom, right, head = _font(12), 60, height - 60, width - 20, 40
    d.text((left, 10), f"held-out caption loss, frozen LLM, {report['steps']} probe steps ({report['data']})",
           fill="black", font=font)
    d.line([left, head, left, bottom, right, bottom], fill="black")
    y = lambda v: bottom - (bottom - head) * v / top
    for k in range(5):  # axis ticks
        v = top * k / 4
        d.text((5, y(v) - 6), f"{v:.2f}", fill="black", font=font)
    slot = (right - left) / len(values)
    colours = [(90, 90, 90), (30, 90, 200), (220, 120, 30), (40, 160, 80), (150, 50, 170)]
    for i, (name, v) in enumerate(zip(sets, values)):
        x0 = left + i * slot + slot * 0.15
        d.rectangle([x0, y(v), x0 + slot * 0.7, bottom], fill=colours[i % len(colours)])
        d.text((x0, y(v) - 16), f"{v:.3f}", fill="black", font=font)
        d.text((x0, bottom + 6), name.split(" (")[0], fill="black", font=font)
    for j, (name, v) in enumerate(refs.items()):
        for x in range(left, right, 12):
            d.line([x, y(v), x + 6, y(v)], fill=(200, 30, 30))
        d.text((left + 6 + 260 * j, y(v) + 2), f"{name}: {v:.3f}", fill=(200, 30, 30), font=font)
    img.save(path)


# ---- command line --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("pca", "align"):
        s = sub.add_parser(name, help={"pca": "PCA pictures of each feature set (Figure 3)",
                                       "align": "the alignment probe: caption loss per feature set (Section 4)"}[name])
        s.add_argument("--model", required=True, help="a Florence-VL checkpoint folder or hub id"
                                                      + (" (or a Florence-2 one)" if name == "pca" else ""))
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        s.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        if name == "pca":
            s.add_argument("--image", required=True)
            s.add_argument("--out", default="pca.png")
            s.add_argument("--tile", type=int, default=256, help="minimum tile side in pixels (grids are upscaled "
                                                                 "by a whole factor, nearest neighbour)")
        else:
            s.add_argument("--data", help="captions: LLaVA JSON/JSONL (the first gpt turn is the caption) or records "
                                          "with 'image' and 'caption'; default: the embedded synthetic captions")
            s.add_argument("--images", help="root folder of the images that --data names (default: its folder)")
            s.add_argument("--n-train", type=int, default=2000, help="training captions (the first of --data); the "
                           "cache holds (n-train + n-heldout) x 4 x 577 x 1024 values at full size")
            s.add_argument("--n-heldout", type=int, default=200, help="held-out captions (the last of --data)")
            s.add_argument("--steps", type=int, default=300, help="optimiser steps per feature set")
            s.add_argument("--batch-size", type=int, default=32)
            s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LLaVA's stage-1 projector lr)")
            s.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
            s.add_argument("--max-len", type=int, default=2048)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--out", default="align.png", help="the bar chart; the numbers go next to it as .json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "pca":
        return run_pca(args)
    report = run_align(args)
    print(table(report))
    bar_chart(report, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"chart: {args.out}  numbers: {Path(args.out).with_suffix('.json')}  ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
