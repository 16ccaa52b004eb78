"""What the ranks of a run share: stop signals, the process group (Dist: rank, world, device, sums over
ranks), threads per rank, DDP, and the data order (ResumableSampler: each rank's share, resumable mid-epoch).

Used by train.py and train_synthetic.py. Plain `python train.py` is a world of one: the sums return what they
are given and nothing is wrapped in DDP."""
import inspect
import os
import signal
from dataclasses import dataclass, field
from typing import Iterator

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
@dataclass
class Dist:
    """Where this process stands in the run: plain `python train.py` is a world of one."""
    rank: int = 0
    world: int = 1
    local_world: int = 1  # processes of the run on this machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def sum(self, x: float | list[float]) -> float | list[float]:
        """The sum over ranks of a number, or of each number in a list (one collective for the whole list:
        on gloo each all-reduce, however small, costs ~1.7 ms)."""
        if not dist.is_initialized():
            return x
        t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist() if isinstance(x, list) else t.item()

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                torch.device(f"cuda:{local}" if cuda else "cpu"))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(requested: int | None, ctx: Dist) -> tuple[int, str]:
    """Intra-op threads for this rank: `requested`, else the usable cores shared out over the ranks on this
    machine. Returns (threads, what to log). OMP_NUM_THREADS is not trusted: torchrun sets it to 1 only when
    it is unset, and a value from the environment (clusters, CI images) that gives each of two ranks both
    cores of two made stage 0 run 10-40x slower (threads spinning against each other)."""
    cores = usable_cores()
    threads = requested or max(1, cores // ctx.local_world)
    torch.set_num_threads(threads)
    why = "--threads" if requested else f"{cores} usable cores / {ctx.local_world} rank(s) on this machine"
    note = f"threads: {threads} per rank ({why})"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) != threads and int(env) * ctx.local_world > cores:
        note += (f"; OMP_NUM_THREADS={env} asks for {int(env) * ctx.local_world} threads on {cores} cores, "
                 f"which oversubscribes them: {threads} used instead")
    return threads, note


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


# ---- sampling ------------------------------------------------------------------------------------------
class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic distributed sampler that can restart in the middle of an epoch.

    Epoch e uses randperm(n) from seed + e (as torch's DistributedSampler), padded with its own first
    indices (or trimmed, drop_last) to a multiple of num_replicas; rank r takes every
    num_replicas-th index starting at r. `position` counts samples consumed in this epoch over all
    ranks: iteration starts there, so a run restored from state_dict() continues with exactly the
    indices it would have seen.

    The sampler cannot count consumption itself (DataLoader workers prefetch ahead of the training
    step): the training loop calls advance(samples_per_rank) after each step it completes."""

    def __init__(self, dataset_or_len, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.n = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (
            torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f'rank {self.rank} outside [0, {self.num_replicas})')
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.position = 0, 0
        if drop_last and self.n < self.num_replicas:
            raise ValueError(f'{self.n} samples cannot fill {self.num_replicas} ranks with drop_last')

    def epoch_indices(self) -> list[int]:
        """All ranks' indices of this epoch, interleaved: rank r takes [r::num_replicas]."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        else:
            indices = list(range(self.n))
        if self.drop_last:
            return indices[:self.n - self.n % self.num_replicas]
        pad = -self.n % self.num_replicas
        return indices + (indices * (pad // max(self.n, 1) + 1))[:pad]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.position + self.rank::self.num_replicas])

    def __len__(self) -> int:
        R = self.num_replicas
        total = self.n - self.n % R if self.drop_last else -(-self.n // R) * R  # = len(epoch_indices())
        return len(range(self.position + self.rank, total, R))

    def set_epoch(self, epoch: int) -> None:
        # A new epoch starts at its beginning; setting the current epoch again (right after
        # load_state_dict) keeps the restored position.
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, samples_per_rank: int) -> None:
        """Marks samples_per_rank more samples as consumed on every rank."""
        self.position += samples_per_rank * self.num_replicas

    def state_dict(self) -> dict:
        return {'seed': self.seed, 'epoch': self.epoch, 'position': self.position,
                'num_replicas': self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        # position is global, so a run may resume on a different number of ranks and still see
        # each remaining sample of this epoch; only the same number continues bit for bit.
        self.seed, self.epoch, self.position = state['seed'], state['epoch'], state['position']
