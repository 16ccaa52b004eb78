"""What the ranks of a run share: stop signals, the process group, sums over ranks, and DDP.

Used by train.py and train_vision.py. Plain `python train.py` is a world of one: the sums return what they
are given and nothing is wrapped in DDP."""
import inspect
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fusion import FlorenceVL


# ---- signals: finish the step, save, exit --------------------------------------------------------------
STOP = {"signal": 0}


def _on_signal(signum, frame):
    if STOP["signal"]:  # a second signal: stop now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    STOP["signal"] = signum


def install_signal_handlers():
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)


class Interrupted(Exception):
    """A signal stopped training after a checkpoint was written."""


# ---- processes -----------------------------------------------------------------------------------------
def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def all_sum(x: float | list[float], device) -> float | list[float]:
    """The sum over ranks of a number, or of each number in a list (one collective for the whole list: on
    gloo each all-reduce, however small, costs ~1.7 ms)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist() if isinstance(x, list) else t.item()


def replicate(module, device, table=None):
    """Per stage: DDP over the parameters that train in this stage.

    The Florence encoder reads only the three prompts' tokens, so its token table (51,289 rows; 57% of the
    tiny default's gradient bytes, 158 MB with Florence-2-base) gets gradient in those few rows alone, the
    same rows on every rank. DDP is told to leave the table out, and `sync_table_rows` all-reduces just
    those rows after backward. The buffers are constants (the prompt ids, the sinusoidal temporal
    embedding), so DDP does not broadcast them before each forward either."""
    if not dist.is_initialized():
        return module
    if table is not None:
        names = [name for name, p in module.named_parameters() if p is table]
        DDP._set_params_and_buffers_to_ignore_for_model(module, names)
    # the switch for the per-forward buffer broadcast is `broadcast_buffers` before torch 2.13
    switch = "forward_sync_buffers"
    if switch not in inspect.signature(DDP).parameters:
        switch = "broadcast_buffers"
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **{switch: False})


def sync_table_rows(ddp, model: FlorenceVL, world: int):
    """After backward: when `ddp` is a DDP from `replicate`, the all-reduce (the mean over ranks, as DDP's) of
    the rows of the encoder token table that it left out."""
    table = model.vision.encoder.embed_tokens.weight
    if not isinstance(ddp, DDP) or table.grad is None:  # one process / FSDP; frozen (finetune) or no prompts
        return
    rows = model.prompt_ids.unique()
    grad = table.grad[rows]
    dist.all_reduce(grad)
    table.grad[rows] = grad / world
