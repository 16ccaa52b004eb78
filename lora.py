"""LoRA (Hu et al. 2021) on the LLM's Linears, for stage 2 on one GPU: the base weights frozen (in bf16, or
int8 with --quantize int8: the QLoRA-style path), a low-rank update B @ A learned beside each, the
projector trained fully, the tower frozen.

    y = base(x) + (alpha / r) * B(A(dropout(x)))     A: (r, in) Kaiming-uniform, B: (out, r) zeros

B starts at zero, so at step 0 the model is exactly the base model. Trained, an adapter is small: the A / B
pairs and the projector (`adapter.safetensors` + `adapter_config.json`, which names the base model);
`merge_lora_` folds each B @ A into its weight, giving a plain Florence-VL checkpoint.

    python lora.py merge runs/lora/final --out runs/lora/merged     # an adapter -> the official layout
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_weights, resolve, save_safetensors, write_text_atomic
from fusion import FlorenceVL, FlorenceVLConfig
from quantize import Int8Linear, quantize_llm_

# the Linears of the LLM blocks (Phi-3's fused qkv_proj / gate_up_proj; Llama's are fused the same way here)
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]  # what FlorenceVL.from_pretrained fetches of a hub repo


class LoRALinear(nn.Module):
    """A frozen base Linear (nn.Linear or quantize.Int8Linear) plus its trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.dropout = r, alpha / r, dropout
        # fp32 whatever the base is: these are the weights the optimiser steps (the master copy); the
        # update is computed in the input's dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as LoRA's reference code

    def forward(self, x):
        update = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_A.to(x.dtype)),
                          self.lora_B.to(x.dtype))
        return self.base(x) + update * self.scaling

    def delta(self) -> torch.Tensor:
        """(out, in): what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        if isinstance(self.base, Int8Linear):
            weight, dtype = self.base.weight.float() * self.base.scale.float()[:, None], self.base.scale.dtype
        else:
            weight, dtype = self.base.weight.float(), self.base.weight.dtype
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(weight + self.delta())
        return out


def add_lora_(llm: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=TARGETS) -> list[str]:
    """Wrap every Linear of the LLM blocks whose name ends in one of `targets`; returns their names. The rest
    of the LLM is left as it is (set_trainable_ freezes it)."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")
    names = [name for name, m in llm.layers.named_modules()
             if isinstance(m, (nn.Linear, Int8Linear)) and name.rsplit(".", 1)[-1] in targets]
    for name in names:
        parent, _, attr = name.rpartition(".")
        module = llm.layers.get_submodule(parent)
        setattr(module, attr, LoRALinear(getattr(module, attr), r, alpha, dropout))
    return [f"layers.{n}" for n in names]


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def set_trainable_(model) -> list[nn.Parameter]:
    """Stage 2 with LoRA: the LoRA pairs and the projector train, everything else is frozen. Returns them."""
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    for m in model.llm.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(state_dict: dict) -> dict:
    """The adapter's part of a (FlorenceVL) state dict: LoRA pairs and the projector."""
    return {k: v for k, v in state_dict.items() if ".lora_" in k or k.startswith("mm_projector.")}


def save_adapter(model, folder, base: str, state_dict: dict | None = None):
    """adapter.safetensors (LoRA pairs + projector, fp32 as trained) and adapter_config.json (the base model and
    the LoRA settings), atomically; the tokenizer too, so the folder answers questions on its own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = adapter_state(model.state_dict() if state_dict is None else state_dict)
    layer = next(m for m in model.llm.modules() if isinstance(m, LoRALinear))
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, LoRALinear)})
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in sd.items()}, folder / ADAPTER_FILE)
    if model.tokenizer is not None:
        model.tokenizer.save(folder)
    # how the adapter was trained to see its inputs: a base from stage 1 says plain / square, stage 2 is not
    config = {"base_model": str(base), "r": layer.r, "alpha": layer.scaling * layer.r, "dropout": layer.dropout,
              "targets": targets, "template": model.template, "image_aspect_ratio": model.cfg.image_aspect_ratio}
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def load_adapter_(model, folder) -> dict:
    """Wrap the model's LLM as the adapter says and load its weights (strictly); returns its config."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if not is_lora(model):
        add_lora_(model.llm, config["r"], config["alpha"], config["dropout"], config["targets"])
    sd = read_weights(folder / ADAPTER_FILE)
    expected = adapter_state(model.state_dict())
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder / ADAPTER_FILE} does not fit the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    model.load_state_dict(sd, strict=False)  # only the adapter's keys; checked above
    # the adapter's template and image handling, not its base's (a stage-1 base says plain / square)
    model.template = model.cfg.template = config.get("template") or model.template
    model.cfg.image_aspect_ratio = config.get("image_aspect_ratio", model.cfg.image_aspect_ratio)
    return config


def weights_folder(path_or_repo_id) -> Path:
    """The folder whose weights from_pretrained reads: the checkpoint's, or for an adapter its base model's."""
    folder = resolve(path_or_repo_id, allow_patterns=PATTERNS)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        return weights_folder(json.loads((folder / ADAPTER_CONFIG).read_text())["base_model"])
    return folder


def from_pretrained(path_or_repo_id, dtype=None, tower=None, quantize: str | None = None) -> FlorenceVL:
    """A Florence-VL checkpoint (FlorenceVL.from_pretrained), or a LoRA run's adapter folder: its base model (the
    one adapter_config.json names), wrapped and filled as the adapter says."""
    folder = resolve(path_or_repo_id, allow_patterns=PATTERNS)
    if not (folder / ADAPTER_CONFIG).is_file() or (folder / "config.json").is_file():
        return FlorenceVL.from_pretrained(folder, dtype=dtype, tower=tower, quantize=quantize)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    model = FlorenceVL.from_pretrained(config["base_model"], dtype=dtype, tower=tower, quantize=quantize)
    load_adapter_(model, folder)
    model.tower_note = f"{model.tower_note}; LoRA adapter {folder}"
    return model.eval()


def merge_lora_(model) -> int:
    """Fold every LoRA update into its weight (an int8 base comes back in its compute dtype); returns how many."""
    names = [n for n, m in model.llm.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        module = model.llm.get_submodule(parent)
        setattr(module, attr, getattr(module, attr).merged())
    return len(names)


def trainable_summary(model, params: list) -> str:
    """What a LoRA stage trains and what its optimiser holds (AdamW: two fp32 moments per parameter)."""
    n = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    state = sum(2 * p.numel() * 4 for p in params)
    return (f"LoRA: {n / 1e6:.2f}M trainable parameters ({n / total:.2%} of {total / 1e6:.1f}M), AdamW state "
            f"{state / 2**20:.1f} MiB")


# ---- how much memory a LoRA step needs on one GPU, from the shapes ---------------------------------------
def saved_bytes(fn, exclude: set) -> tuple[int, object]:
    """(bytes of the tensors autograd saves for backward while fn() runs, fn's result): each storage once
    (views share theirs), storages in `exclude` (the weights, resident anyway) left out."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            seen[storage._cdata] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def block_bytes_per_token(llm_cfg, r: int, targets=TARGETS, dtype=torch.bfloat16, tokens=(16, 32)) -> float:
    """Activation bytes one LLM block saves for backward per token, with LoRA (base frozen, in dtype), measured on
    a real block of the real width on the CPU (uninitialised weights: only sizes matter) at two lengths, as the
    slope (the constant part, LoRA's casts of A and B, drops out). The CPU's SDPA kernel, like CUDA's flash and
    memory-efficient ones, saves the output and a log-sum-exp per query: linear in the tokens. The rotary tables,
    computed once for all blocks, are left out (2 x head_dim values per token)."""
    from model import LLM
    cfg = type(llm_cfg)(**{**llm_cfg.__dict__, "n_layers": 1})
    with torch.device("meta"):
        llm = LLM(cfg)
    llm = llm.to_empty(device="cpu").to(dtype)
    llm.rotary = type(llm.rotary)(cfg)  # its tables are computed, not loaded: build them for real
    add_lora_(llm, r, 2.0 * r, 0.05, targets)
    llm.requires_grad_(False)
    for m in llm.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    llm.train()
    weights = {t.untyped_storage()._cdata for t in [*llm.parameters(), *llm.buffers()]}
    sizes = []
    for T in tokens:
        x = torch.zeros(1, T, cfg.hidden_size, dtype=dtype, requires_grad=True)
        cos, sin = llm.rotary(torch.arange(T)[None], dtype, False)  # shared by the blocks: not counted here
        shared = {cos.untyped_storage()._cdata, sin.untyped_storage()._cdata}
        sizes.append(saved_bytes(lambda: llm.layers[0](x, cos, sin, None, True), weights | shared)[0])
    return (sizes[1] - sizes[0]) / (tokens[1] - tokens[0])


def memory_plan(cfg, r: int = 16, targets=TARGETS, quantize: str | None = None, micro_batch: int = 1,
                tokens: int = 2048, supervised: int = 512, checkpointing: bool = True) -> list[tuple[str, int]]:
    """(what, bytes) of one stage-2 LoRA step as train.py runs it on a GPU (--lora r, bf16): the model built on
    the meta device for the weights and the trainable state, a real block measured for the activations
    (block_bytes_per_token), the loss by formula. micro_batch samples of `tokens` tokens (visual ones included),
    `supervised` of them supervised. Not counted: the frozen tower's forward (it saves nothing; its transient
    intermediates are tens of MB per image), the CUDA context and the allocator's slack (~1 GB together)."""
    with torch.device("meta"):
        model = FlorenceVL(cfg)
    model.to(torch.bfloat16)
    if quantize:
        quantize_llm_(model.llm, torch.bfloat16)
    add_lora_(model.llm, r, 2.0 * r, 0.0, targets)
    model.mm_projector.float()
    trainable = set_trainable_(model)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    frozen_llm = [t for n, t in [*model.llm.named_parameters(), *model.llm.named_buffers()] if ".lora_" not in n]
    n_train, n_lora = sum(p.numel() for p in trainable), sum(p.numel() for n, p in model.named_parameters()
                                                              if ".lora_" in n)
    llm, T = cfg.llm, micro_batch * tokens
    block = block_bytes_per_token(llm, r, targets)
    if checkpointing:  # each block keeps its input; one block at a time is recomputed in backward
        activations = llm.n_layers * T * llm.hidden_size * 2 + block * T
    else:
        activations = llm.n_layers * block * T
    # the loss over the supervised positions: bf16 logits, their fp32 copy and log-softmax in the forward, then
    # the saved log-softmax with its fp32 and bf16 gradients in the backward: ~10 bytes per logit at the peak
    loss = micro_batch * supervised * llm.vocab_size * 10
    rows = []
    if quantize:  # each int8 Linear is dequantized to bf16 for its matmul, one at a time (quantize.DequantizedLinear)
        largest = max(m.weight.numel() for m in model.llm.modules() if isinstance(m, Int8Linear))
        rows.append(("the largest int8 weight dequantized for its matmul (bf16, transient)", 2 * largest))
    return [(f"LLM base weights, frozen ({quantize or 'bf16'})", nbytes(frozen_llm)),
            ("vision tower, frozen (bf16)", nbytes([*model.vision.parameters(), *model.vision.buffers()])),
            (f"trainable: {n_lora / 1e6:.1f}M LoRA (r={r}) + {(n_train - n_lora) / 1e6:.1f}M projector, fp32",
             4 * n_train),
            ("their gradients (fp32)", 4 * n_train),
            ("AdamW moments (2 x fp32)", 8 * n_train),
            (f"activations, {micro_batch} x {tokens} tokens ({'with' if checkpointing else 'without'} activation "
             f"checkpointing; {block / 2**10:.0f} KiB per token per block)", int(activations)),
            (f"loss over {micro_batch} x {supervised} supervised tokens (vocabulary {llm.vocab_size:,})", loss),
            *rows]


def print_plan(rows: list, title: str):
    print(title)
    for what, b in rows:
        print(f"  {b / 2**30:7.2f} GiB  {what}")
    print(f"  {sum(b for _, b in rows) / 2**30:7.2f} GiB  in all (+ ~1 GiB of CUDA context and allocator slack)")


def main(argv=None):
    p = argparse.ArgumentParser(description="LoRA adapters: merge one into its base model (a plain Florence-VL "
                                            "checkpoint in the official layout), or plan the memory of a LoRA run.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="adapter folder -> merged checkpoint")
    m.add_argument("adapter", help="a folder with adapter.safetensors and adapter_config.json")
    m.add_argument("--out", required=True, help="where to write the merged checkpoint")
    m.add_argument("--base", help="the base model (default: the one adapter_config.json names)")
    q = sub.add_parser("plan", help="GPU memory of one stage-2 LoRA step (train.py --lora R), from the shapes")
    q.add_argument("--model", default="florence-vl-8b", choices=["florence-vl-3b", "florence-vl-8b"])
    q.add_argument("--lora", type=int, default=16, help="the rank r")
    q.add_argument("--quantize", choices=["int8"], help="the frozen base LLM held as int8")
    q.add_argument("--micro-batch", type=int, default=1)
    q.add_argument("--tokens", type=int, default=2048, help="tokens per sample, the 577 visual ones included")
    q.add_argument("--supervised", type=int, default=512, help="supervised (answer) tokens per sample")
    q.add_argument("--no-checkpointing", action="store_true", help="without --activation-checkpointing")
    args = p.parse_args(argv)
    if args.command == "plan":
        rows = memory_plan(FlorenceVLConfig.from_name(args.model), args.lora, quantize=args.quantize,
                           micro_batch=args.micro_batch, tokens=args.tokens, supervised=args.supervised,
                           checkpointing=not args.no_checkpointing)
        print_plan(rows, f"{args.model}, train.py --lora {args.lora}" + (" --quantize int8" if args.quantize else "")
                   + f" --micro-batch {args.micro_batch}: one step on one GPU")
        return
    if args.base is None:
        model = from_pretrained(args.adapter)
    else:
        model = FlorenceVL.from_pretrained(args.base)
        load_adapter_(model, args.adapter)
    print(f"merged {merge_lora_(model)} LoRA layers into {args.out}")
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
