"""One command on a GPU machine for what the CPU runs cannot show; its figures in one JSON file.

    python device_check.py                      # CUDA, one or more GPUs: about 4 minutes on one H100 (limit 8)
    python device_check.py --device cpu         # dry run: the same steps at tiny sizes, on the CPU (~1 minute)
    python device_check.py --device cpu --steps memory --tower base:768     # the 768 px figure on the CPU

The steps, each recorded on its own (one that fails or raises is recorded as such, and the others still run):
  parity     pytest tests/test_device.py on the device in bf16 (FLORENCE_VL_DEVICE / FLORENCE_VL_DTYPE): the
             decoders, the vision features and the compiled decode step against transformers. On the CPU only
             the vision test runs (-k vision): the plumbing; the suite runs the whole file on the CPU anyway.
  two_ranks  torchrun --nproc_per_node=2 train.py, DDP and FSDP2 (NCCL, bf16), on the tiny synthetic task: the
             losses of the two, their largest gap, tokens/s. Skipped with fewer than two GPUs. The dry run
             launches the FSDP2 run alone, on gloo in fp32: the launch and the log it reads.
  bench      bench.py --cases 5: bf16 training MFU (the deepest Phi-3.5-mini-wide decoder that fits), batch-1
             decode against the memory-bandwidth roofline, eager and compiled (CUDA graphs), time to first
             token of Florence-VL-3B (one 768 px image + a 30-token question).
  memory     one training step (forward + backward) of the Florence-2-base tower (random weights) at 768 px
             with and without activation checkpointing: the peak memory the step adds over the built model
             (CUDA: torch.cuda.max_memory_allocated, under bf16 autocast; CPU: the peak resident set of a
             fresh child process, fp32). The dry run uses the tiny tower (at 768 px too).
Each step's time limit is cut to what is left of --budget, so that the whole stays under it.
Exit status 1 when a step failed or raised.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))  # tests/memory.py: peak resident set of a child process


# ---- running the steps ---------------------------------------------------------------------------------
class Budget:
    """Seconds left of the whole check; each subprocess gets at most its own limit and what is left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def limit(self, seconds: float) -> float:
        left = self.deadline - time.monotonic()
        if left < 5:
            raise TimeoutError("no time left in --budget")
        return min(seconds, left)


def run_step(name: str, fn, *args) -> dict:
    """fn(*args) -> its figures with a 'status' (passed / failed / skipped); an exception is recorded as
    status 'error' with the end of its traceback."""
    t0 = time.time()
    print(f"== {name}", flush=True)
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - one step's failure must not hide the others' figures
        out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = round(time.time() - t0, 1)
    print(f"   {name}: {out['status']} ({out['seconds']} s)" + (f": {out.get('error') or out.get('why')}"
                                                                 if out["status"] in ("error", "skipped") else ""),
          flush=True)
    return out


def subprocess_run(cmd: list, budget: Budget, limit: float, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=budget.limit(limit),
                          env={**os.environ, **(env or {})})
    return done


# ---- parity: tests/test_device.py on the device ----------------------------------------------------------
def parity(device: str, work: Path, budget: Budget) -> dict:
    xml = work / "parity.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py",
           f"--junitxml={xml}", "-o", "junit_logging=system-out"]
    if device == "cpu":  # the plumbing only: the suite runs the whole file on the CPU anyway
        cmd += ["-k", "vision"]
    done = subprocess_run(cmd, budget, 300, {"FLORENCE_VL_DEVICE": device, "FLORENCE_VL_DTYPE": "bf16"})
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    tests = [test_result(case) for case in ET.parse(xml).getroot().iter("testcase")]
    passed = sum(t["outcome"] == "passed" for t in tests)
    ok = done.returncode == 0 and passed == len(tests) > 0
    return {"status": "passed" if ok else "failed", "passed": passed, "failed": len(tests) - passed, "tests": tests,
            **({} if ok else {"output": done.stdout[-3000:]})}


def test_result(case) -> dict:
    """A junit <testcase>: its name, outcome, seconds and the figure lines it printed."""
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    out = case.findtext("system-out") or ""
    return {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
            "printed": [line.strip() for line in out.splitlines() if line.strip() and not line.startswith("---")],
            **({"message": next(c for c in case if c.tag == outcome).get("message", "")[:1000]}
               if outcome != "passed" else {})}


# ---- two ranks: train.py under torchrun ------------------------------------------------------------------
TINY_RUN = ["--synthetic-size", "64", "--global-batch", "16", "--micro-batch", "4", "--eval-samples", "0",
            "--vision-steps", "0", "--log-every", "1", "--stage", "pretrain", "--resume", "none"]
LOSS_GAP = 0.02  # DDP vs FSDP2 in bf16: FSDP computes with bf16 copies of every weight (0.07% at most on the CPU)


def two_ranks(device: str, work: Path, budget: Budget) -> dict:
    if device == "cuda" and torch.cuda.device_count() < 2:
        return {"status": "skipped", "why": f"{torch.cuda.device_count()} GPU(s): two are needed"}
    modes = {"ddp": [], "fsdp": ["--fsdp"]} if device == "cuda" else {"fsdp": ["--fsdp"]}
    # the dry run: one micro-step of 4 per rank, 2 steps (the launch costs ~10 s of imports; the steps little)
    size = ["--steps", "10"] if device == "cuda" else ["--steps", "2", "--global-batch", "8"]
    runs = {}
    for mode, extra in modes.items():
        out = work / mode
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *TINY_RUN, *size, "--out", str(out), *extra]
        done = subprocess_run(cmd, budget, 180)
        if done.returncode:
            raise RuntimeError(f"{mode}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        runs[mode] = {"losses": losses, "tokens_per_s": records[-1].get("tokens_per_s"),
                      "backend": "nccl" if device == "cuda" else "gloo"}
    result = {"status": "passed", "runs": runs}
    if len(runs) == 2:
        gap = max(abs(a - b) / a for a, b in zip(runs["ddp"]["losses"], runs["fsdp"]["losses"]))
        result.update(largest_loss_gap=gap, allowed_gap=LOSS_GAP, status="passed" if gap <= LOSS_GAP else "failed")
    return result


# ---- bench: bench.py case 5 -------------------------------------------------------------------------------
def bench(device: str, work: Path, budget: Budget) -> dict:
    out = work / "bench.json"
    cmd = [sys.executable, "bench.py", "--device", device, "--dtype", "bf16", "--cases", "5", "--json", str(out)]
    if device == "cpu":
        cmd += ["--dry-run", "--repeats", "1"]
    done = subprocess_run(cmd, budget, 360)
    if done.returncode or not out.is_file():
        raise RuntimeError(f"bench.py: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    saved = json.loads(out.read_text())
    return {"status": "passed", **saved["figures"]["5"], "rows": saved["rows"]}


# ---- memory: the tower's activation checkpointing ---------------------------------------------------------
TOWER_SETUP = """
import torch
import torch._dynamo  # torch.utils.checkpoint imports it on first use: ~60 MB that are not the step's
from florence_encoder import FlorenceConfig, FlorenceVision
torch.set_num_threads({threads})
torch.manual_seed(0)
tower = FlorenceVision(FlorenceConfig.from_name({preset!r}, image_size={size}, **{overrides})).train().to({device!r})
tower.vision_tower.grad_checkpointing = tower.encoder.grad_checkpointing = {checkpointing}
pixels = torch.randn(1, 3, {size}, {size}, device={device!r})
"""
TOWER_STEP = """
with torch.autocast({device!r}, dtype=torch.bfloat16, enabled={device!r} == "cuda"):
    features = tower.multi_prompt_features(pixels)  # V and the three prompts' encoder outputs
    loss = torch.cat(features, dim=-1).float().square().mean()
loss.backward()
"""


def tower_step_peak(preset: str, size: int, checkpointing: bool, device: str, threads: int = 1) -> int:
    """Bytes one training step of the tower adds at its peak over the built model (and its inputs)."""
    # the tiny preset's position table is sized for its own 64 px: larger images need a longer one
    overrides = {"max_position_embeddings": 1024} if preset == "tiny" else {}
    kw = dict(preset=preset, size=size, checkpointing=checkpointing, device=device, threads=threads,
              overrides=overrides)
    if device == "cpu":  # a fresh process: its peak resident set is this step's alone
        from memory import measure
        return measure(TOWER_STEP.format(**kw), setup=TOWER_SETUP.format(**kw))["added"]
    scope = {}
    exec(TOWER_SETUP.format(**kw), scope)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    exec(TOWER_STEP.format(**kw), scope)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del scope
    torch.cuda.empty_cache()
    return peak


def tower_memory(preset: str, size: int, device: str, threads: int = 1) -> dict:
    without = tower_step_peak(preset, size, False, device, threads)
    with_ = tower_step_peak(preset, size, True, device, threads)
    return {"tower": preset, "image_size": size, "without_checkpointing_bytes": without,
            "with_checkpointing_bytes": with_, "ratio": with_ / without,
            "how": "torch.cuda.max_memory_allocated, bf16 autocast" if device == "cuda"
            else "peak resident set (VmHWM) of a child process over its baseline, fp32"}


def memory(device: str, work: Path, budget: Budget, tower: str | None = None) -> dict:
    preset, size = (tower or ("base:768" if device == "cuda" else "tiny:768")).split(":")
    budget.limit(0)  # raises when no time is left
    return {"status": "passed", **tower_memory(preset, int(size), device)}


# ---- the whole check --------------------------------------------------------------------------------------
STEPS = {"parity": parity, "two_ranks": two_ranks, "bench": bench, "memory": memory}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def summary(report: dict) -> str:
    """The JSON as a few readable lines."""
    s = report["steps"]
    lines = [f"device_check on {report['device']} ({'CPU dry run' if report['dry_run'] else 'real sizes'}), "
             f"torch {report['torch']}, {report['seconds']:.0f} s: {'all passed' if report['ok'] else 'FAILED'}"]

    def head(name):
        step = s.get(name)
        if step is None:
            return None
        if step["status"] in ("error", "skipped"):
            lines.append(f"  {name}: {step['status']}: {step.get('error') or step.get('why')}")
            return None
        return step
    if p := head("parity"):
        lines.append(f"  parity: {p['passed']} passed, {p['failed']} failed")
        lines += [f"    {t['name']}: {t['outcome']}; " + " ".join(t["printed"]) for t in p["tests"]]
    if r := head("two_ranks"):
        runs = ", ".join(f"{m} ({v['backend']}) last loss {v['losses'][-1]:.4f}, {v['tokens_per_s']:,.0f} tok/s"
                         for m, v in r["runs"].items())
        gap = f"; largest DDP/FSDP loss gap {r['largest_loss_gap']:.2%}" if "largest_loss_gap" in r else ""
        lines.append(f"  two ranks: {runs}{gap}")
    if b := head("bench"):
        if "training" in b:
            t = b["training"]
            lines.append(f"  training MFU {t['mfu']:.1%} ({t['tflops']:.0f} TFLOP/s, {t['layers']} layers of "
                         f"{b['plan']['llm']}, {t['batch']}x{t['seq']} tokens)")
        for kind in ("eager", "compiled"):
            d = b[f"decode_{kind}"]
            lines.append(f"  decode {kind}: {d['ms_per_token']:.2f} ms/token = {d['roofline_share']:.0%} of the "
                         f"bandwidth roofline ({d['roofline_ms']:.2f} ms)"
                         + (f", CUDA graphs skipped {d['cudagraph_skips']}x" if d["cudagraph_skips"] else ""))
        lines.append(f"  time to first token: {b['ttft']['seconds'] * 1e3:.0f} ms ({b['ttft']['preset']}, "
                     f"{b['ttft']['prompt_tokens']} tokens)")
    if m := head("memory"):
        lines.append(f"  tower step at {m['image_size']} px ({m['tower']}): {m['without_checkpointing_bytes'] / 2**20:,.0f}"
                     f" MiB without activation checkpointing, {m['with_checkpointing_bytes'] / 2**20:,.0f} MiB with "
                     f"({m['ratio']:.2f}x; {m['how']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default), or cpu: a dry run")
    p.add_argument("--out", default="device_check.json", help="the JSON of figures (default device_check.json)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)} (default all)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    p.add_argument("--tower", default=None, metavar="PRESET:SIZE",
                   help="the memory step's tower and image size (default base:768 on CUDA, tiny:768 on the CPU; "
                        "base:768 on the CPU takes ~3 minutes and ~6 GB)")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        p.error(f"unknown steps {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu runs the dry run")
    t0, budget = time.time(), Budget(args.budget)
    report = {"device": machine(args.device), "kind": args.device, "dry_run": args.device == "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        for name in steps:
            work = Path(tmp) / name
            work.mkdir()
            extra = (args.tower,) if name == "memory" else ()
            report["steps"][name] = run_step(name, STEPS[name], args.device, work, budget, *extra)
    report["seconds"] = round(time.time() - t0, 1)
    report["ok"] = all(s["status"] in ("passed", "skipped") for s in report["steps"].values())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n" + summary(report) + f"\n(figures in {args.out})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
