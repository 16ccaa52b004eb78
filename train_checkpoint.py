"""Training checkpoints: written atomically, found again, loaded back exactly (DDP, FSDP2 or one process).

Used by train.py; a checkpoint's model part is an ordinary Florence-VL checkpoint (fusion.py's layout)."""
import json
import os
import shutil
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import read_weights, save_safetensors, write_text_atomic
from fusion import FlorenceVL
from lora import ADAPTER_FILE, adapter_state, is_lora, save_adapter
from train_dist import Dist

STAGES = ("pretrain", "finetune")  # the training stages in order; checkpoint names sort by them


# ---- checkpoints ---------------------------------------------------------------------------------------
# out/ckpt-2-finetune-000123/  model (official layout: config.json, model.safetensors, ...; a LoRA run: its
#                   adapter), optimizer.safetensors, rng-rank{r}.safetensors, trainer.json (written last: its
#                   presence marks a complete one)
# out/latest  the name of the newest complete checkpoint
# A checkpoint is written into out/.tmp-<name> and renamed into place, so a crash mid-save leaves
# the previous checkpoint untouched and no half-written one under a real name.

def flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """optimizer.state_dict() -> (tensors for safetensors, the rest as JSON)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, s in state["state"].items():
        meta["state"][str(idx)] = []
        for k, v in s.items():
            tensors[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            meta["state"][str(idx)].append(k)
    return tensors, meta


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    # parameters are numbered in a plain optimizer state, named (FQN) in a gathered FSDP one
    key = lambda idx: int(idx) if idx.isdigit() else idx
    return {"param_groups": meta["param_groups"],
            "state": {key(idx): {k: tensors[f"{idx}.{k}"] for k in keys} for idx, keys in meta["state"].items()}}


def rng_state(device) -> dict:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def save_checkpoint(out: Path, name: str, model, optimizer, trainer: dict, ctx: Dist, keep: int = 2):
    final, tmp = out / name, out / f".tmp-{name}"
    rank = ctx.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that died
        tmp.mkdir(parents=True)
    ctx.barrier()
    model_sd, opt_sd = full_state_dicts(model, optimizer)  # a collective under FSDP: every rank takes part
    save_safetensors(rng_state(ctx.device), tmp / f"rng-rank{rank}.safetensors")
    if rank == 0:
        if is_lora(unwrap(model)):  # the base stays where it is: the adapter (LoRA pairs + projector) is the state
            save_adapter(unwrap(model), tmp, trainer["base_model"], model_sd)
        else:
            unwrap(model).save_pretrained(tmp, state_dict=model_sd)
        tensors, meta = flatten_optimizer(opt_sd)
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "world_size": ctx.world, "optimizer": meta}, indent=1))
    ctx.barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (a resumed run): swap, never leave neither
            os.replace(final, out / f".old-{name}")
        os.replace(tmp, final)
        shutil.rmtree(out / f".old-{name}", ignore_errors=True)
        write_text_atomic(out / "latest", name)
        done = sorted(p for p in out.glob("ckpt-*") if (p / "trainer.json").is_file())
        for old in done[:-keep] if keep > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


def full_state_dicts(model, optimizer):
    """(model, optimizer) state dicts as whole tensors on the CPU. Under FSDP2 the shards are gathered
    (every rank must call this); with DDP or one process they are the local ones (model: None = its own)."""
    if not is_sharded(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model):
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def checkpoint_name(stage: str, step: int) -> str:
    return f"ckpt-{STAGES.index(stage) + 1}-{stage}-{step:06d}"  # sorts in training order


def find_checkpoint(out: Path, resume: str):
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.json").is_file():
            raise SystemExit(f"--resume {resume}: no trainer.json there (not a complete checkpoint)")
        return path
    latest = out / "latest"
    if latest.is_file() and (out / latest.read_text().strip() / "trainer.json").is_file():
        return out / latest.read_text().strip()
    done = sorted(p for p in out.glob("ckpt-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, sampler, ctx: Dist) -> dict:
    trainer = json.loads((path / "trainer.json").read_text())
    if is_lora(unwrap(model)):  # the model holds its base already: the adapter's tensors are the state
        model_sd = adapter_state(read_weights(path / ADAPTER_FILE))
    else:
        model_sd = FlorenceVL.from_pretrained(path).state_dict()
    opt_sd = unflatten_optimizer(read_weights(path / "optimizer.safetensors"), trainer["optimizer"])
    if is_sharded(model):  # every rank reads the whole checkpoint and keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=not is_lora(model))
        set_model_state_dict(model, model_sd, options=options)
        set_optimizer_state_dict(model, optimizer, opt_sd, options=options)
    else:
        if is_lora(unwrap(model)):  # the adapter's keys, all of them: the base is not in the checkpoint
            missing = set(adapter_state(unwrap(model).state_dict())) - set(model_sd)
            if missing:
                raise SystemExit(f"{path / ADAPTER_FILE} lacks {sorted(missing)[:5]}: not this run's adapter")
        unwrap(model).load_state_dict(model_sd, strict=not is_lora(unwrap(model)))
        optimizer.load_state_dict(opt_sd)
    sampler.load_state_dict(trainer["sampler"])
    rng_file = path / f"rng-rank{ctx.rank}.safetensors"
    if rng_file.is_file() and trainer["world_size"] == ctx.world:
        rng = read_weights(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return trainer


def unwrap(model):
    return model.module if isinstance(model, DDP) else model
