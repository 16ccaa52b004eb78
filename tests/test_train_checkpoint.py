"""train_checkpoint.py: a resumed run continues bit for bit; a checkpoint write that dies, or is SIGKILLed at any
moment, leaves the latest complete checkpoint usable."""
import os
import signal
import subprocess
import time

import pytest
import torch

import train
import train_checkpoint
from checkpoint import read_weights
from train_dist import Dist, ResumableSampler
from trainrun import ENV, PY, REPO, TINY, logged, run


def test_resume_continues_bit_for_bit(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run(tmp_path, TINY + ["--steps", "6", "--save-every", "3", "--out", str(straight)])
    name = train.checkpoint_name("pretrain", 3)
    died = run(tmp_path, TINY + ["--steps", "6", "--save-every", "3", "--out", str(crashed)],
               env={"DIE_AFTER": name}, check=False)
    assert died.returncode == 17
    assert [r["step"] for r in logged(crashed)] == [1, 2, 3]
    run(tmp_path, TINY + ["--steps", "6", "--save-every", "3", "--out", str(crashed)])
    a, b = logged(straight), logged(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]          # exactly, not approximately
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa = read_weights(straight / "final" / "model.safetensors")
    wb = read_weights(crashed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_write_that_dies_leaves_the_previous_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    args = train.parse_args(TINY + ["--out", str(tmp_path)])
    model = train.build_model(args)
    model.set_stage("pretrain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ResumableSampler(64, 1, 0)
    state = {"stage": "pretrain", "step": 1, "sampler": sampler.state_dict(), "history": []}
    first = train.checkpoint_name("pretrain", 1)
    train.save_checkpoint(tmp_path, first, model, optimizer, state, Dist(), keep=2)

    def crash(*a, **k):
        raise OSError("disk died mid-save")
    monkeypatch.setattr(train_checkpoint, "save_safetensors", crash)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, train.checkpoint_name("pretrain", 2), model, optimizer,
                              {**state, "step": 2}, Dist(), keep=2)
    found = train.find_checkpoint(tmp_path, "auto")
    assert found == tmp_path / first
    assert not (tmp_path / train.checkpoint_name("pretrain", 2)).exists()
    fresh = train.build_model(args)
    trainer = train.load_checkpoint(found, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), sampler, Dist())
    assert trainer["step"] == 1
    saved = read_weights(found / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in fresh.llava_state_dict().items())


KILLER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
from train_dist import Dist, ResumableSampler
torch.manual_seed(0)
model = train.build_model(train.parse_args([]))
opt = torch.optim.AdamW(model.parameters())
sampler = ResumableSampler(64, 1, 0)
out = train.Path({out!r})
for _ in sys.stdin:  # each line: fork a writer (imports and model are paid for once), report how it ended
    pid = os.fork()
    if pid == 0:
        try:
            step = int((out / "latest").read_text().split("-")[-1]) if (out / "latest").exists() else 0
            while True:
                step += 1
                with torch.no_grad():
                    next(model.parameters()).fill_(step)  # the step is visible in the weights
                train.save_checkpoint(out, train.checkpoint_name("pretrain", step), model, opt,
                                      {{"stage": "pretrain", "step": step, "sampler": sampler.state_dict(),
                                        "history": []}}, Dist(), keep=2)
        finally:
            os._exit(1)  # never back into the parent's loop
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)  # -9: killed by SIGKILL
"""


def test_sigkill_while_writing_checkpoints_never_loses_the_latest(tmp_path):
    import random
    out = tmp_path / "o"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO), out=str(out)))
    rng, last, mid_write = random.Random(0), 0, 0
    torch.manual_seed(0)
    model = train.build_model(train.parse_args([]))
    opt = torch.optim.AdamW(model.parameters())
    name = next(model.named_parameters())[0]
    server = subprocess.Popen([PY, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        for _ in range(20):  # 20 writer processes, each killed at a random moment of its save loop (~25 ms a save)
            server.stdin.write("fork\n")
            server.stdin.flush()
            writer = int(server.stdout.readline())
            time.sleep(rng.uniform(0.01, 0.3))
            os.kill(writer, signal.SIGKILL)
            assert int(server.stdout.readline()) == -signal.SIGKILL  # killed, not ended some other way
            mid_write += any(out.glob(".tmp-*"))  # a checkpoint was half written
            ckpt = train.find_checkpoint(out, "auto")
            if ckpt is None:
                continue
            sampler = ResumableSampler(64, 1, 0)
            trainer = train.load_checkpoint(ckpt, model, opt, sampler, Dist())
            assert trainer["step"] >= last  # never goes back
            last = trainer["step"]
            assert torch.all(dict(model.named_parameters())[name] == last)
    finally:
        server.kill()
        server.wait()
    assert last > 0 and mid_write > 0  # writes completed, and kills did land inside one
