"""Peak memory of a piece of work, measured in a fresh Python process (tests/test_checkpoint.py, bench.py).

    result = measure(CODE, setup="import torch")   # CODE may set `out = {...}`; returned with the figures

The child runs `setup` (imports: not counted), reads its resident set (VmRSS) as the baseline, runs `code`,
then reads the peak resident set (VmHWM). added = peak - baseline is the most the code held at once, over
what was there before it (an upper bound: anything above the baseline that setup had already freed would
count too). Not resource.getrusage's ru_maxrss: Linux carries it over fork + exec, so a child of a large
process (pytest holding a model) reports its parent's size as its own peak (measured: +290 MB). Linux
only (/proc/self/status), as the machines this project runs on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
{setup}

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

out = {{}}
baseline = status("VmRSS")
t0 = time.perf_counter()
{code}
seconds = time.perf_counter() - t0
peak = status("VmHWM")
print("MEASURED " + json.dumps(dict(out=out, baseline=baseline, peak=peak, added=peak - baseline, seconds=seconds)))
"""


def measure(code: str, setup: str = "", env: dict | None = None, timeout: int = 1800) -> dict:
    """{'out', 'baseline', 'peak', 'added' (bytes), 'seconds'} of `code` run in a child process."""
    script = CHILD.format(root=str(ROOT), setup=setup, code=code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if done.returncode or not lines:
        raise RuntimeError(f"measured child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MEASURED "))
