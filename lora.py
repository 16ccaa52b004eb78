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

from checkpoint import CheckpointError, read_weights, save_safetensors, write_text_atomic
from quantize import Int8Linear

# the Linears of the LLM blocks (Phi-3's fused qkv_proj / gate_up_proj; Llama's are fused the same way here)
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model: a plain Florence-VL "
                                            "checkpoint in the official layout.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="adapter folder -> merged checkpoint")
    m.add_argument("adapter", help="a folder with adapter.safetensors and adapter_config.json")
    m.add_argument("--out", required=True, help="where to write the merged checkpoint")
    m.add_argument("--base", help="the base model (default: the one adapter_config.json names)")
    args = p.parse_args(argv)
    from fusion import FlorenceVL
    model = FlorenceVL.from_pretrained(args.adapter if args.base is None else args.base)
    if args.base is not None:
        load_adapter_(model, args.adapter)
    print(f"merged {merge_lora_(model)} LoRA layers into {args.out}")
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
