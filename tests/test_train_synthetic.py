"""train_synthetic.py: stage 0 (the tiny tower learns to name each scene cell) gives the same gradient on 2 ranks
as on 1, lowers its loss and is not redone after a crash; the default configuration learns under torchrun."""
from checkpoint import read_weights
from trainrun import logged, run


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


def test_default_task_learns_under_torchrun(tmp_path):
    out = tmp_path / "run"
    run(tmp_path, ["--steps", "25", "--synthetic-size", "800", "--global-batch", "16", "--micro-batch", "8",
                   "--vision-steps", "4", "--eval-samples", "0", "--log-every", "1", "--stage", "both",
                   "--out", str(out)], nproc=2)
    assert [r["step"] for r in logged(out) if r["stage"] == "vision"] == [1, 2, 3, 4]  # stage 0 under DDP too
    losses = [r["loss"] for r in logged(out) if r["stage"] == "pretrain"]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()


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
    died = run(tmp_path, args + ["--out", str(crashed)], env={"FAIL_AT": "0:1"}, check=False)
    assert died.returncode != 0 and (crashed / "vision-stage0.safetensors").is_file()
    again = run(tmp_path, args + ["--out", str(crashed)])
    assert "vision stage: loaded" in again.stdout and "vision step" not in again.stdout
    first = {r["step"]: r["loss"] for r in logged(straight) if r["stage"] == "pretrain"}
    resumed = {r["step"]: r["loss"] for r in logged(crashed) if r["stage"] == "pretrain"}
    assert first == resumed
