"""train.py: the gradient of a step does not depend on how it is split over ranks and micro-steps,
a resumed run continues bit for bit, a checkpoint write that dies leaves the previous one usable,
and the default configuration learns under torchrun.

The runs are real (`torchrun` / `python` subprocesses on the tiny synthetic default); a small wrapper
script observes them from the inside (it dumps the gradients or dies at a chosen moment) without
changing train.py."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
import train_checkpoint  # noqa: E402
from checkpoint import read_weights  # noqa: E402

TINY = ["--synthetic-size", "64", "--global-batch", "8", "--micro-batch", "4", "--eval-samples", "0",
        "--vision-steps", "0", "--log-every", "1", "--stage", "pretrain", "--resume", "auto"]

# Runs train.main inside a wrapper. DUMP_GRADS=path saves the gradients of the first optimiser step
# (they are final when clip_grad_norm_ is called; DDP has already averaged them over the ranks).
# DIE_AFTER=name makes the process exit hard right after that checkpoint is complete (a crash).
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
    train.main(sys.argv[1:])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, args, nproc=1, env=None, check=True):
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


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(tmp_path):
    """Same global batch of 8: 2 ranks x 1 micro-step of 4 vs 1 rank x 2 micro-steps of 4. The synthetic
    captions have different lengths, so the ranks' supervised-token counts are uneven."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(tmp_path, TINY + ["--steps", "1", "--out", str(one)], env={"DUMP_GRADS": str(tmp_path / "g1.safetensors")})
    run(tmp_path, TINY + ["--steps", "1", "--out", str(two)], nproc=2,
        env={"DUMP_GRADS": str(tmp_path / "g2.safetensors")})
    g1, g2 = read_weights(tmp_path / "g1.safetensors"), read_weights(tmp_path / "g2.safetensors")
    assert g1.keys() == g2.keys() and len(g1) > 50
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    print(f"max abs gradient difference, 2 ranks vs 1 rank x 2 micro-steps: {worst:.2e}")
    assert worst <= 1e-6
    l1, l2 = logged(one)[0], logged(two)[0]
    assert abs(l1["loss"] - l2["loss"]) <= 1e-6 and abs(l1["grad_norm"] - l2["grad_norm"]) <= 1e-6
    # negative control: the gradient of half the batch is not the gradient of the step
    half = tmp_path / "half"
    run(tmp_path, TINY + ["--steps", "1", "--out", str(half), "--global-batch", "4"],
        env={"DUMP_GRADS": str(tmp_path / "g3.safetensors")})
    g3 = read_weights(tmp_path / "g3.safetensors")
    assert max((g1[k] - g3[k]).abs().max().item() for k in g1) > 1e-4


def test_only_the_prompt_rows_of_the_encoder_token_table_get_gradient():
    """Under DDP the Florence encoder's token table is left out of the gradient all-reduce and only the rows
    of the prompts' tokens are summed (train_dist.replicate / sync_table_rows): exact only while no other row
    of the table gets gradient."""
    torch.manual_seed(0)
    args = train.parse_args([])
    model = train.build_model(args)
    data = train.build_dataset(args, model, "pretrain", n=8)
    b = train.collate([data[i] for i in range(4)], model.tokenizer.token_to_id(train.PAD_TOKEN))
    model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]).loss_sum.backward()
    grad = model.vision.encoder.embed_tokens.weight.grad
    outside = torch.ones(len(grad), dtype=torch.bool)
    outside[model.prompt_ids.unique()] = False
    assert grad[~outside].abs().sum() > 0 and grad[outside].abs().max() == 0


def test_vision_stage_gradient_on_two_ranks_equals_one_rank(tmp_path):
    """Stage 0 under DDP (its token-table rows summed by hand) computes the gradient one rank computes."""
    args = ["--vision-steps", "1", "--steps", "1", "--synthetic-size", "64", "--global-batch", "8",
            "--micro-batch", "4", "--eval-samples", "0", "--stage", "pretrain"]
    for name, extra, nproc in [("one", [], 1), ("two", [], 2), ("half", ["--global-batch", "4"], 1)]:
        run(tmp_path, args + extra + ["--out", str(tmp_path / name)], nproc=nproc,
            env={"DUMP_GRADS": str(tmp_path / f"{name}.safetensors")})  # the first clip: stage 0's step 1
    one, two, half = (read_weights(tmp_path / f"{name}.safetensors") for name in ("one", "two", "half"))
    assert one.keys() == two.keys() and len(one) > 50
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"stage 0 gradient, 2 ranks vs 1 rank: max abs difference {worst:.2e}")
    assert worst <= 1e-6
    assert max((one[k] - half[k]).abs().max().item() for k in one) > 1e-4  # negative control: half the batch


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
    sampler = train.ResumableSampler(64, 1, 0)
    state = {"stage": "pretrain", "step": 1, "sampler": sampler.state_dict(), "history": []}
    first = train.checkpoint_name("pretrain", 1)
    train.save_checkpoint(tmp_path, first, model, optimizer, state, 0, 1, torch.device("cpu"), keep=2)

    def crash(*a, **k):
        raise OSError("disk died mid-save")
    monkeypatch.setattr(train_checkpoint, "save_safetensors", crash)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, train.checkpoint_name("pretrain", 2), model, optimizer,
                              {**state, "step": 2}, 0, 1, torch.device("cpu"), keep=2)
    found = train.find_checkpoint(tmp_path, "auto")
    assert found == tmp_path / first
    assert not (tmp_path / train.checkpoint_name("pretrain", 2)).exists()
    fresh = train.build_model(args)
    trainer = train.load_checkpoint(found, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), sampler, 0,
                                    torch.device("cpu"))
    assert trainer["step"] == 1
    saved = read_weights(found / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in fresh.llava_state_dict().items())


def test_default_task_learns_under_torchrun(tmp_path):
    out = tmp_path / "run"
    run(tmp_path, ["--steps", "25", "--synthetic-size", "800", "--global-batch", "16", "--micro-batch", "8",
                   "--vision-steps", "4", "--eval-samples", "0", "--log-every", "1", "--stage", "both",
                   "--out", str(out)], nproc=2)
    assert [r["step"] for r in logged(out) if r["stage"] == "vision"] == [1, 2, 3, 4]  # stage 0 under DDP too
    losses = [r["loss"] for r in logged(out) if r["stage"] == "pretrain"]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()


def test_fsdp_matches_ddp_and_resumes_from_its_gathered_checkpoint(tmp_path):
    """FSDP2 (fully_shard per block, gloo on CPU) computes the same steps as DDP; its checkpoint is written
    from the gathered shards in the official layout and a run killed after it resumes from it."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    args = TINY + ["--steps", "3", "--save-every", "2"]
    run(tmp_path, args + ["--out", str(ddp)], nproc=2)
    died = run(tmp_path, args + ["--out", str(fsdp), "--fsdp"], nproc=2,
               env={"DIE_AFTER": train.checkpoint_name("pretrain", 2)}, check=False)
    assert died.returncode != 0 and [r["step"] for r in logged(fsdp)] == [1, 2]
    run(tmp_path, args + ["--out", str(fsdp), "--fsdp"], nproc=2)
    by_step = {r["step"]: r["loss"] for r in logged(fsdp)}
    assert sorted(by_step) == [1, 2, 3]
    for r in logged(ddp):
        assert abs(r["loss"] - by_step[r["step"]]) <= 1e-5, (r, by_step)
    wa = read_weights(ddp / "final" / "model.safetensors")
    wb = read_weights(fsdp / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4


def test_vision_stage_learns_to_name_the_cells_and_a_crash_after_it_does_not_redo_it(tmp_path):
    """Stage 0 of the synthetic default (the tower and encoder learn what each grid cell holds) lowers its
    loss; its result is saved, and a run that dies in stage 1 resumes with it instead of training it again."""
    args = ["--vision-steps", "40", "--steps", "2", "--synthetic-size", "640", "--global-batch", "16",
            "--micro-batch", "8", "--eval-samples", "0", "--log-every", "10", "--stage", "pretrain", "--resume", "auto"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run(tmp_path, args + ["--out", str(straight)])
    vision = [r for r in logged(straight) if r["stage"] == "vision"]
    assert [r["step"] for r in vision] == [10, 20, 30, 40]
    assert vision[-1]["loss"] < 0.8 * vision[0]["loss"], vision
    died = run(tmp_path, args + ["--out", str(crashed)], env={"TRAIN_FAIL_AT": "0:1"}, check=False)
    assert died.returncode != 0 and (crashed / "vision-stage0.safetensors").is_file()
    again = run(tmp_path, args + ["--out", str(crashed)])
    assert "vision stage: loaded" in again.stdout and "vision step" not in again.stdout
    first = {r["step"]: r["loss"] for r in logged(straight) if r["stage"] == "pretrain"}
    resumed = {r["step"]: r["loss"] for r in logged(crashed) if r["stage"] == "pretrain"}
    assert first == resumed
