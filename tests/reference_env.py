"""A second Python environment with the official code's tokenizer stack, for references that the main
environment cannot give.

Florence-VL was trained with transformers 4.43.1, whose slow (SentencePiece) LlamaTokenizer built the
Phi-3.5 prompt ids. transformers 5.x no longer has that class, and both cannot live in one environment,
so the tests that need it run a small script in `.venv-ref/` (created here on first use, about 10 s and
250 MB; pip needs the package index once). Nothing outside tests/ uses it.
"""
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-ref.txt"
VENV = ROOT / ".venv-ref"


def python() -> Path:
    """The reference environment's interpreter, built from requirements-ref.txt if it is missing or stale."""
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / "requirements.sha256"
    exe = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".venv-ref.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes must not build it at once
        if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
            return exe
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        done = subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                               str(REQUIREMENTS)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"could not build the reference environment {VENV} from {REQUIREMENTS} "
                               f"(pip needs the package index):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        stamp.write_text(want + "\n")
    return exe


def run(script: str, payload=None, cwd=None, timeout=300):
    """Run `script` in the reference environment; it reads JSON `payload` from stdin and prints JSON.

    -I: isolated mode, so neither this repository nor PYTHONPATH can shadow the reference's packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    done = subprocess.run([str(python()), "-I", "-c", script], input=json.dumps(payload), capture_output=True,
                          text=True, cwd=cwd or "/", env=env, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"reference script failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


TRAIN_SENTENCEPIECE = r"""
import json, sys
import sentencepiece as spm
a = json.load(sys.stdin)
# Llama-2 / Phi-3's tokenizer.model settings: BPE, byte fallback, identity normalisation (no NFKC),
# a dummy prefix, whitespace kept as it is; <unk> <s> </s> at 0 1 2
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(a["corpus"]), model_prefix=a["prefix"], vocab_size=a["vocab_size"], model_type="bpe",
    byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
print(json.dumps(a["prefix"] + ".model"))
"""


def train_sentencepiece(folder, corpus: list, vocab_size: int = 600) -> Path:
    """A small SentencePiece BPE model with Llama-2 / Phi-3's settings, written to folder/tokenizer.model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(run(TRAIN_SENTENCEPIECE, {"corpus": corpus, "prefix": str(folder / "tokenizer"),
                                          "vocab_size": vocab_size}))
    (folder / "tokenizer.vocab").unlink(missing_ok=True)  # the trainer's side file; released repos do not have it
    return path
