"""train.py in real processes, for the tests of the training side: `run` starts it (torchrun for nproc > 1) inside
a small wrapper that observes it from the inside without changing train.py (it dumps the gradients, dies or
fails at a chosen moment, records the threads), `logged` / `log_records` read its log.jsonl."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from checkpoint import read_weights

REPO = Path(__file__).resolve().parents[1]
PY, ENV = sys.executable, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# --threads 1: these runs (and the in-process ones, which would set pytest's own threads) use one thread, as the
# rest of the suite (conftest.py); test_threads_per_rank_... checks the default choice
TINY = ["--synthetic-size", "64", "--global-batch", "8", "--micro-batch", "4", "--eval-samples", "0",
        "--vision-steps", "0", "--log-every", "1", "--stage", "pretrain", "--resume", "auto", "--threads", "1"]


# Runs train.main inside a wrapper. DUMP_GRADS=path saves the gradients of the first optimiser step
# (they are final when clip_grad_norm_ is called; DDP has already averaged them over the ranks).
# DIE_AFTER=name makes the process exit hard right after that checkpoint is complete (a crash).
# FAIL_AT=rank:step makes that rank raise at that step. THREADS=folder: each rank writes there how many
# intra-op threads its steps run with.
WRAPPER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    import torch, train
    from checkpoint import save_safetensors
    clip = torch.nn.utils.clip_grad_norm_
    def dumping_clip(params, max_norm, *a, **k):
        path = os.environ.get("DUMP_GRADS")
        if path and not os.path.exists(path) and int(os.environ.get("RANK", "0")) == 0:
            save_safetensors({{str(i): p.grad.detach().clone() for i, p in enumerate(params)}}, path)
        return clip(params, max_norm, *a, **k)
    train.torch.nn.utils.clip_grad_norm_ = dumping_clip
    save = train.save_checkpoint
    def dying_save(out, name, *a, **k):
        save(out, name, *a, **k)
        if name == os.environ.get("DIE_AFTER"):
            os._exit(17)
    train.save_checkpoint = dying_save
    step = train.train_step
    def observed_step(cfg, st, model, ctx, i):
        if os.environ.get("FAIL_AT") == f"{{ctx.rank}}:{{i + 1}}":
            raise RuntimeError(f"forced failure on rank {{ctx.rank}} at step {{i + 1}}")
        if os.environ.get("THREADS"):
            with open(os.path.join(os.environ["THREADS"], f"rank{{ctx.rank}}"), "w") as f:
                f.write(str(torch.get_num_threads()))
        return step(cfg, st, model, ctx, i)
    train.train_step = observed_step
    train.main(sys.argv[1:])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, args, nproc=1, env=None, check=True, threads="1"):
    """train.py in a fresh process (torchrun for nproc > 1), observed by WRAPPER; one thread per rank unless
    the args say otherwise or threads=None (then train.py chooses)."""
    if threads and "--threads" not in args:
        args = [*args, "--threads", threads]
    script = tmp_path / "wrapped_train.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(script)] + args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def logged(out: Path) -> list:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def log_records(out: Path) -> list:
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def run_train(out: Path, *extra, timeout=120):
    return subprocess.run([PY, str(REPO / "train.py"), *TINY, "--out", str(out), *extra],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def assert_same_run(ref: Path, run: Path, steps: int):
    """The interrupted-and-resumed run in `run` ended with the uninterrupted one's weights and losses, bit for bit."""
    a = read_weights(ref / "final" / "model.safetensors")
    b = read_weights(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_loss = [r["loss"] for r in log_records(ref) if "loss" in r]
    run_loss = {r["step"]: r["loss"] for r in log_records(run) if "loss" in r}
    assert [run_loss[s] for s in range(1, steps + 1)] == ref_loss


def torchrun(out: Path, *extra) -> list:
    # --standalone: a free port for the rendezvous, so parallel runs on this machine do not collide
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5",
            str(REPO / "train.py"), *TINY, "--out", str(out), *extra]


def worker_pids(parent: int) -> dict:
    """rank -> pid of the children of `parent` (torchrun) that are training workers (RANK in their environment)."""
    ranks = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{parent}\n" not in status.read_text():
                continue
            env = dict(v.split(b"=", 1) for v in (status.parent / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:  # gone meanwhile
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(status.parent.name)
    return ranks
