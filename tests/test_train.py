"""train.py, the recipe: the gradient of a step does not depend on how it is split over ranks and micro-steps;
FSDP2 trains as DDP does (fp32 and bf16) and resumes from its gathered checkpoint; bad samples, non-finite steps and
impossible settings get a clear answer; the tower's lr share; stage 2's template; bf16 keeps fp32 master weights.

The runs are real (`torchrun` / `python` subprocesses on the tiny synthetic default, tests/trainrun.py); a small
wrapper script observes them from the inside without changing train.py. The tests of what the ranks share, of the
training checkpoints and of the synthetic task's stage 0 are in test_train_dist.py, test_train_checkpoint.py and
test_train_synthetic.py."""
import json
from pathlib import Path

import pytest
import torch

import train
import train_config
import trainrun
from checkpoint import read_weights
from test_data import turns, write_images
from trainrun import TINY, WRAPPER, log_records, logged, run


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


# ----------------------------------------------------------------------------------------------
# Training: bad samples, non-finite steps, command line (in-process: train.main on the tiny model)


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(train, "install_signal_handlers", lambda: None)  # leave pytest's SIGINT alone
    monkeypatch.setitem(train.STOP, "signal", 0)
    torch.set_num_threads(1)


def test_bad_samples_are_skipped_and_counted_or_stop_with_strict(tmp_path, in_process, capsys):
    write_images(tmp_path / "img")
    good = [{"id": f"g{i}", "image": "rgb.jpg", "conversations": turns("<image>\nwhat is the word ?", "cat")}
            for i in range(9)]
    bad = [{"id": "b1", "image": "truncated.png", "conversations": turns("<image>\nwhat ?", "cat")},
           {"id": "b2", "image": "missing.png", "conversations": turns("<image>\nwhat ?", "cat")}]
    lines = [json.dumps(r) for r in good[:4] + bad[:1] + good[4:8] + bad[1:] + good[8:]] + ['{"id": "b3", oops']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")  # 12 records; bad on lines 5, 10, 12
    argv = ["--data", str(tmp_path / "d.jsonl"), "--images", str(tmp_path / "img"), "--steps", "2", "--threads", "1",
            "--global-batch", "8", "--micro-batch", "4", "--log-every", "1", "--eval-samples", "0", "--resume", "none"]
    train.main(argv + ["--out", str(tmp_path / "run")])  # does not crash
    err = capsys.readouterr().err
    for where in ("d.jsonl:5: cannot read image", "d.jsonl:10: cannot read image", "d.jsonl:12: invalid JSON"):
        assert f"skipped bad sample: {tmp_path / where}" in err, err
    n = err.count("skipped bad sample:")
    recs = [r for r in log_records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2] and recs[-1]["bad_samples"] == n >= 3
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match=r"bad sample \(--strict\): .*d\.jsonl:(5|10|12): "):
        train.main(argv + ["--out", str(tmp_path / "strict"), "--strict"])


def test_nonfinite_step_is_not_applied_and_named(tmp_path, in_process, monkeypatch):
    import fusion
    calls, seen = [0], []
    forward, collate = fusion.FlorenceVL.forward, train.collate

    def nan_on_step_2(self, *a, **k):  # micro-steps 3 and 4 are step 2's
        out = forward(self, *a, **k)
        calls[0] += 1
        if calls[0] == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    def recording_collate(items, pad_id):
        b = collate(items, pad_id)
        seen.append(b["ids"])
        return b
    monkeypatch.setattr(fusion.FlorenceVL, "forward", nan_on_step_2)
    monkeypatch.setattr(train, "collate", recording_collate)
    argv = TINY + ["--steps", "3", "--save-every", "1", "--keep", "5", "--resume", "none"]
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "stop")])
    msg = str(e.value)
    assert msg.startswith("pretrain step 2: non-finite loss nan") and "the step was not applied" in msg
    assert f"on samples {seen[2] + seen[3]}" in msg  # the ids of step 2's micro-batches
    assert sorted(p.name for p in (tmp_path / "stop").glob("ckpt-*")) == ["ckpt-1-pretrain-000001"]
    calls[0], seen[:] = 0, []
    train.main(argv + ["--out", str(tmp_path / "skip"), "--skip-nonfinite", "1"])
    recs = log_records(tmp_path / "skip")
    assert any(r.get("nonfinite_skipped") == 1 and r["step"] == 2 for r in recs)
    assert [r["step"] for r in recs if "loss" in r] == [1, 3]
    w1, w2, w3 = (read_weights(tmp_path / "skip" / f"ckpt-1-pretrain-00000{s}" / "model.safetensors") for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 changed nothing
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)  # step 3 trained again


@pytest.mark.parametrize("extra, why", [
    (("--global-batch", "10", "--micro-batch", "4"), "--global-batch 10 is not a multiple of micro-batch x ranks"),
    (("--florence", "f", "--llm", "l", "--stage", "finetune"), "--stage finetune from --florence/--llm parts"),
    (("--florence", "f"), "--florence and --llm go together"),
    (("--resume", "{tmp}/nowhere"), "no trainer.json there"),
    (("--data", "{tmp}/none.json"), "--data .*none.json: no such file"),
    (("--steps", "0"), "must be positive"),
    (("--synthetic-size", "64", "64", "64"), "one or two positive numbers"),
    (("--synthetic-size", "0"), "one or two positive numbers"),
    (("--vision-steps", "-1"), "--vision-steps must be >= 0"),
    (("--tower-lr-scale", "-0.5"), "--tower-lr-scale must be >= 0"),
    (("--threads", "0"), "--threads must be >= 1"),
    (("--dtype", "bf16"), "this CPU has no bf16 support"),   # with a CPU made to say it has none
])
def test_impossible_settings_rejected_before_any_work(tmp_path, in_process, monkeypatch, extra, why):
    built = []
    monkeypatch.setattr(train, "build_model", lambda cfg: built.append(1))
    monkeypatch.setattr(train_config, "cpu_supports_bf16", lambda: False)  # where check_config looks it up
    with pytest.raises(SystemExit, match=why):
        train.main(["--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in extra)])
    assert built == []  # nothing was built


# ----------------------------------------------------------------------------------------------
# Faults in real processes: signals, ranks that die, SIGKILL while a checkpoint is written


def test_the_tower_trains_at_its_own_share_of_the_lr_in_pretrain(tmp_path, monkeypatch):
    import fusion
    """Synthetic default: the tower's parameter group runs at 0.1x the lr (--tower-lr-scale overrides it)."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    for extra, scale in (([], 0.1), (["--tower-lr-scale", "0.5"], 0.5)):
        made.clear()
        train.main(TINY + ["--steps", "2", "--resume", "none", "--out", str(tmp_path / f"r{scale}"), *extra])
        model_groups = made[-1].param_groups
        assert [g["lr_scale"] for g in model_groups] == [1.0, scale]
        assert model_groups[1]["lr"] == pytest.approx(scale * model_groups[0]["lr"]) and model_groups[0]["lr"] > 0
        n_tower = sum(p.numel() for p in model_groups[1]["params"])
        final = fusion.FlorenceVL.from_pretrained(tmp_path / f"r{scale}" / "final")
        assert n_tower == sum(p.numel() for p in final.vision.parameters())


# ----------------------------------------------------------------------------------------------
# The sampler (train_dist.ResumableSampler): each rank's share of the data, resumable mid-epoch


def test_finetune_from_a_pretrain_checkpoint_speaks_the_chat_template(tmp_path):
    """A stage-1 checkpoint's config says plain (and square); stage 2 from it trains in the LLM's chat template,
    as the official recipe does (--version phi3 / llama3), and its final model says so."""
    torch.manual_seed(0)
    model = train.tiny_model()
    model.cfg.template, model.cfg.image_aspect_ratio = "plain", "square"
    model.save_pretrained(tmp_path / "pre")
    pre = train.FlorenceVL.from_pretrained(tmp_path / "pre")
    assert pre.template == "plain" and train.stage_template(pre, "pretrain") == "plain"
    assert train.stage_template(pre, "finetune") == "phi3"
    cfg = train.parse_args(["--model", str(tmp_path / "pre"), "--stage", "finetune", "--synthetic-size", "8"])
    data = train.stage_dataset(cfg, train.SyntheticTask(cfg), pre, "finetune")
    assert data.template_name == "phi3"
    run(tmp_path, TINY[:-6] + ["--model", str(tmp_path / "pre"), "--stage", "finetune", "--steps", "1",
                               "--synthetic-size", "8", "--resume", "none", "--out", str(tmp_path / "ft")])
    final = train.FlorenceVL.from_pretrained(tmp_path / "ft" / "final")
    assert final.template == "phi3" and final.cfg.image_aspect_ratio == "pad"


# ----------------------------------------------------------------------------------------------
# bf16 training (the GPU's precision policy, run on the CPU) and FSDP2 in bf16

def test_bf16_training_tracks_fp32_and_keeps_fp32_master_weights(tmp_path, in_process):
    """--dtype bf16 as on a GPU: fp32 weights (the optimiser's master copy), bf16 compute under autocast. 30 steps
    of the tiny synthetic task track the fp32 run's losses: measured largest gap 0.20% of the loss (1.9e-3);
    asserted <= 1%, and > 0 (a bf16 run that equals the fp32 one to the bit computed nothing in bf16). What is
    saved, model and optimiser, is fp32. Not skipped where bf16 is missing: a CPU that cannot compute bf16 fails.
    (The CPUs here compute it without native bf16 instructions: train.cpu_has_native_bf16.)"""
    assert train_config.cpu_supports_bf16(), \
        "this CPU does not compute bf16 matmuls as a GPU does: --dtype bf16 is untested"
    args = TINY + ["--global-batch", "4", "--steps", "30", "--save-every", "30", "--resume", "none"]
    losses = {}
    for dtype in ("fp32", "bf16"):
        train.main(args + ["--dtype", dtype, "--out", str(tmp_path / dtype)])
        losses[dtype] = [r["loss"] for r in logged(tmp_path / dtype)]
    gaps = [abs(a - b) / a for a, b in zip(losses["fp32"], losses["bf16"])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    print(f"\nbf16 vs fp32 over {len(gaps)} steps: largest loss gap {gaps[worst]:.2%} at step {worst + 1} "
          f"({losses['fp32'][worst]:.4f} vs {losses['bf16'][worst]:.4f}); last {losses['fp32'][-1]:.4f} vs "
          f"{losses['bf16'][-1]:.4f}")
    assert len(gaps) == 30 and 0 < max(gaps) <= 0.01
    assert losses["bf16"][-1] < 0.3 * losses["bf16"][0]  # and it learns
    ckpt = tmp_path / "bf16" / train.checkpoint_name("pretrain", 30)
    for saved in (tmp_path / "bf16" / "final" / "model.safetensors", ckpt / "model.safetensors",
                  ckpt / "optimizer.safetensors"):
        dtypes = {t.dtype for t in read_weights(saved).values()}
        assert dtypes == {torch.float32}, (saved, dtypes)


# Several train.main runs in the same torchrun processes and process group: a launch costs ~10 s of imports
# here before its first step, more than these runs' steps. argv[1]: a JSON list of [train.py arguments,
# environment] (the WRAPPER's hooks; DIE_AFTER ends the processes for real). COUNT_RS=path: rank 0 appends
# the number of reduce-scatters (FSDP2's gradient collective) of each optimiser step. FORCE_SYNC=1: FSDP's
# set_requires_gradient_sync(False) is ignored (a sync after every micro-step: the negative control).
PHASES = """
import json
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
ctx = train.setup_distributed()
train.setup_distributed = lambda: ctx
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
calls = [0]
name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
reduce_scatter = getattr(dist, name)
def counting(*a, **k):
    calls[0] += 1
    return reduce_scatter(*a, **k)
setattr(dist, name, counting)
sync = FSDPModule.set_requires_gradient_sync
def forced_sync(self, requires, **k):
    return sync(self, requires or os.environ.get("FORCE_SYNC") == "1", **k)
FSDPModule.set_requires_gradient_sync = forced_sync
counted_step = train.train_step
def counting_step(cfg, st, model, ctx, i):
    calls[0] = 0
    r = counted_step(cfg, st, model, ctx, i)
    if os.environ.get("COUNT_RS") and ctx.rank == 0:
        with open(os.environ["COUNT_RS"], "a") as f:
            f.write(f"{{calls[0]}}\\n")
    return r
train.train_step = counting_step
for argv, env in json.loads(open(sys.argv[1]).read()):
    os.environ.update(env)
    train.main(argv)
    for k in env:
        del os.environ[k]
destroy()
"""


def run_phases(tmp_path, monkeypatch, phases: list, nproc: int = 2, check: bool = True):
    """train.py runs one after another in one `run` launch (PHASES): [(arguments, environment), ...]."""
    monkeypatch.setattr(trainrun, "WRAPPER", WRAPPER.replace("train.main(sys.argv[1:])", PHASES))
    path = tmp_path / f"phases{len(list(tmp_path.glob('phases*')))}.json"
    path.write_text(json.dumps(phases))
    return run(tmp_path, [str(path)], nproc=nproc, check=check)


def counts(path: Path) -> list:
    return [int(line) for line in path.read_text().split()]


def test_fsdp_bf16_matches_ddp_bf16_resumes_exactly_and_reduces_once_per_step(tmp_path, monkeypatch):
    """FSDP2 with the bf16 MixedPrecisionPolicy (shards all-gathered in bf16, gradients reduce-scattered in fp32;
    gloo does both on the CPU), 2 ranks x 2 micro-steps:
    - its losses match DDP's in bf16 (fp32 weights + autocast) within 1% (measured: 0.07% at most); they differ
      at all because FSDP computes with bf16 copies of every weight, where DDP keeps norms and embeddings fp32;
    - a run killed after its step-2 checkpoint resumes to the uninterrupted run's losses and weights, bit for bit;
    - gradient accumulation does not sync each micro-step: the reduce-scatters of a step of 2 micro-steps are
      as many as one micro-step's (one per FSDP unit: 4 LLM blocks + the root = 5); with the sync left on for
      every micro-step (the negative control) they double."""
    common = TINY + ["--global-batch", "8", "--micro-batch", "2", "--dtype", "bf16", "--save-every", "2"]
    out = {k: tmp_path / k for k in ("ddp", "fsdp", "one_micro", "forced", "crashed")}
    fsdp = common + ["--fsdp", "--steps", "3"]
    died = run_phases(tmp_path, monkeypatch, [
        [common + ["--steps", "3", "--out", str(out["ddp"])], {}],
        [fsdp + ["--out", str(out["fsdp"])], {"COUNT_RS": str(tmp_path / "rs_fsdp")}],
        [fsdp + ["--steps", "1", "--global-batch", "4", "--out", str(out["one_micro"])],
         {"COUNT_RS": str(tmp_path / "rs_one_micro")}],
        [fsdp + ["--steps", "1", "--out", str(out["forced"])], {"COUNT_RS": str(tmp_path / "rs_forced"),
                                                                "FORCE_SYNC": "1"}],
        [fsdp + ["--out", str(out["crashed"])], {"DIE_AFTER": train.checkpoint_name("pretrain", 2)}],
    ], check=False)
    assert died.returncode != 0 and "exitcode  : 17" in died.stderr, died.stderr[-3000:]
    assert [r["step"] for r in logged(out["crashed"])] == [1, 2]
    run_phases(tmp_path, monkeypatch, [[fsdp + ["--out", str(out["crashed"])], {}]])

    ddp, straight = logged(out["ddp"]), logged(out["fsdp"])
    gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ddp, straight)]
    print(f"\nFSDP2 bf16 vs DDP bf16, 3 steps: loss gaps {', '.join(f'{g:.2%}' for g in gaps)}")
    assert len(gaps) == 3 and max(gaps) <= 0.01
    resumed = {r["step"]: r for r in logged(out["crashed"])}
    assert [resumed[s]["loss"] for s in (1, 2, 3)] == [r["loss"] for r in straight]  # exactly
    assert resumed[3]["grad_norm"] == straight[2]["grad_norm"]
    wa = read_weights(out["fsdp"] / "final" / "model.safetensors")
    wb = read_weights(out["crashed"] / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {t.dtype for t in wa.values()} == {torch.float32}  # the gathered shards: fp32 master weights

    per_step, one_micro, forced = (counts(tmp_path / f"rs_{k}") for k in ("fsdp", "one_micro", "forced"))
    print(f"reduce-scatters per optimiser step: 2 micro-steps {per_step}, 1 micro-step {one_micro}, "
          f"2 micro-steps with a sync after each {forced}")
    assert per_step == [5, 5, 5] and one_micro == [5] and forced == [10]
