"""bench.py's case 8: loading and saving Florence-VL-3B and -8B at full size. Random checkpoints in the official
LLaVA layout (bf16 shards <= 5 GB + model.safetensors.index.json, config.json, vision_tower/) are written one
tensor at a time, then each is loaded by FlorenceVL.from_pretrained(folder, dtype, quantize) in a child process
(tests/memory.py: VmHWM of a fresh process): the peak memory added against the loaded model's bytes, and the
peak of save_pretrained over the loaded model. bench.py imports this file; this file takes the random weight
draws and the memory helpers of bench_real.py (cases 6-7), which does not import it.
"""
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench_real import (BF16, GiB, argparse_bool, drop_pair, florence_init, llm_init, measure, mem_available,
                        random_, vm_hwm)
from checkpoint import save_sharded, write_text_atomic
from florence_encoder import cosine_table
from fusion import PROJECTOR_PREFIX, TOWER_PREFIX, FlorenceVL, FlorenceVLConfig, florence_config_json, \
    llava_config_json, preprocessor_config_json
from quantize import int8_linear_names



class RandomTensor:
    """A tensor of a checkpoint, drawn when it is written: save_sharded / save_safetensors read its shape, dtype
    and size, then call .cpu() for the data, one tensor at a time, so that the builder never holds the model."""

    def __init__(self, name: str, shape, dtype, seed: int, make=None):
        self.name, self.shape, self.dtype, self.seed, self.make = name, torch.Size(shape), dtype, seed, make

    def detach(self):
        return self

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def cpu(self) -> torch.Tensor:
        if self.make is not None:
            return self.make().to(self.dtype)
        init = florence_init if self.name.startswith((TOWER_PREFIX, PROJECTOR_PREFIX)) else llm_init
        return random_(torch.empty(self.shape, dtype=self.dtype), *init(self.name, self.shape), self.seed)


def build_checkpoint(folder, cfg: FlorenceVLConfig, max_shard_bytes: int = 5 * 10**9, seed: int = 0) -> int:
    """A random Florence-VL checkpoint in the official LLaVA layout, as FlorenceVL.save_pretrained writes it
    (bf16 shards + model.safetensors.index.json, config.json, vision_tower/config.json), the tensors drawn one
    at a time as they are written. The names and shapes come from the model built on the meta device. Returns
    the bytes of weights written. (The released repos also hold Florence-2's decoder, which loading skips.)"""
    folder = Path(folder)
    (folder / "vision_tower").mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = FlorenceVL(cfg).to(BF16)
    temporal = TOWER_PREFIX + "visual_temporal_embed"
    sd = {}
    for i, (k, v) in enumerate(model.llava_state_dict().items()):
        make = None
        if k.startswith(temporal):  # a constant table, not a weight
            make = lambda: cosine_table(cfg.vision.temporal_embed_size, cfg.vision.vision.dims[-1])  # noqa: E731
        sd[k] = RandomTensor(k, v.shape, BF16, seed * 1_000_003 + i, make)
    write_text_atomic(folder / "vision_tower" / "config.json", json.dumps(florence_config_json(cfg.vision), indent=2))
    write_text_atomic(folder / "vision_tower" / "preprocessor_config.json",
                      json.dumps(preprocessor_config_json(cfg.vision), indent=2))
    save_sharded(sd, folder, max_shard_bytes)
    config = llava_config_json(cfg)
    config["torch_dtype"] = "bfloat16"
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")  # last: marks it complete
    return sum(t.numel() * t.element_size() for t in sd.values())


def expected_bytes(cfg: FlorenceVLConfig, dtype, quantize=None) -> int:
    """The loaded model's bytes, from its meta-device build: int8 LLM Linears at 1 byte + a scale per row."""
    with torch.device("meta"):
        model = FlorenceVL(cfg)
    int8 = {f"llm.{n}.weight" for n in int8_linear_names(model.llm)} if quantize == "int8" else set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            total += t.numel() * t.element_size()
        elif name in int8:
            total += t.numel() + t.shape[0] * dtype.itemsize
        else:
            total += t.numel() * dtype.itemsize
    return total


LOAD_SETUP = """import torch
torch.set_num_threads({threads})
from fusion import FlorenceVL, FlorenceVLConfig
with torch.device("meta"):  # torch's meta kernels load once per process: before the baseline
    FlorenceVL(FlorenceVLConfig.from_name("tiny"))
"""
LOAD_CODE = """
model = FlorenceVL.from_pretrained({folder!r}, dtype={dtype}, quantize={quantize!r})
out["bytes"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
"""
# save_pretrained of a loaded model: the load happens in the setup, then the peak is reset to the current
# resident set (Linux: "5" > /proc/self/clear_refs), so the peak is the save's own
SAVE_SETUP = LOAD_SETUP + """model = FlorenceVL.from_pretrained({folder!r}, dtype=torch.bfloat16)
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
"""
SAVE_CODE = """
model.save_pretrained({folder!r})
out["bytes"] = weights
"""
DTYPE_NAMES = {"bf16": "torch.bfloat16", "fp32": "torch.float32", "int8": "torch.bfloat16"}


def load_memory(folder, dtype: str, threads: int = 1) -> dict:
    """{'peak', 'added', 'bytes', 'seconds'} of FlorenceVL.from_pretrained(folder, dtype, quantize) in a child."""
    got = measure(LOAD_CODE.format(folder=str(folder), dtype=DTYPE_NAMES[dtype],
                                   quantize="int8" if dtype == "int8" else None),
                  setup=LOAD_SETUP.format(threads=threads), timeout=3600)
    got["bytes"] = got["out"]["bytes"]
    return got


def save_memory(folder, out_folder, threads: int = 1) -> dict:
    got = measure(SAVE_CODE.format(folder=str(out_folder)),
                  setup=SAVE_SETUP.format(threads=threads, folder=str(folder)), timeout=3600)
    got["bytes"] = got["out"]["bytes"]
    return got


def checkpoint_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def case_loading(args) -> list:
    """Case 8: random Florence-VL-3B and -8B checkpoints (official layout, bf16, 5 GB shards) loaded with
    FlorenceVL.from_pretrained(folder, dtype, quantize) in child processes; save_pretrained of the 3B bf16."""
    drop_pair()
    models = [m.strip() for m in args.load_models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.load_dtypes.split(",") if d.strip()]
    print(f"case 8: loading at full size: random checkpoints of {', '.join(models)} in the official LLaVA layout "
          f"(bf16, shards <= 5 GB + index), FlorenceVL.from_pretrained in a child process per (model, dtype): "
          f"{', '.join(dtypes)}")
    keep = args.checkpoints is not None
    root = Path(args.checkpoints) if keep else Path(tempfile.mkdtemp(prefix="florence-vl-checkpoints-"))
    rows = []
    try:
        for name in models:
            cfg = FlorenceVLConfig.from_name("tiny" if name == "tiny" else f"florence-vl-{name}")
            folder = root / f"florence-vl-{name}"
            if checkpoint_ready(folder):
                print(f"    {folder}: reused")
            else:
                t = time.perf_counter()
                written = build_checkpoint(folder, cfg)
                print(f"    {folder}: {written / 1e9:.2f} GB of bf16 weights written in {time.perf_counter() - t:.0f} s"
                      f" (builder's RSS peak so far {vm_hwm() / GiB:.2f} GiB)")
            shards = sorted(folder.glob("model*.safetensors"))
            print(f"      {len(shards)} shards, largest {max(p.stat().st_size for p in shards) / 1e9:.2f} GB")
            for dtype in dtypes:
                need = expected_bytes(cfg, torch.float32 if dtype == "fp32" else BF16,
                                      "int8" if dtype == "int8" else None)
                what = f"load {name} {dtype}: peak added / model"
                if need * 1.15 + 1 * GiB > mem_available():
                    reason = (f"skipped: the model is {need / GiB:.1f} GiB, {mem_available() / GiB:.1f} GiB of RAM "
                              f"available")
                    print(f"    {name} {dtype}: {reason}")
                    rows.append(("8", what, reason, "-", "-", "<= 1.15", "-"))
                    continue
                got = load_memory(folder, dtype, args.threads)
                ratio = got["added"] / got["bytes"]
                print(f"    {name} {dtype}: peak added {got['added'] / GiB:.2f} GiB, model {got['bytes'] / GiB:.2f} "
                      f"GiB (expected {need / GiB:.2f}), ratio {ratio:.3f}; whole process peak "
                      f"{got['peak'] / GiB:.2f} GiB; "
                      f"{got['seconds']:.0f} s")
                rows.append(("8", f"{what} ({got['seconds']:.0f} s)",
                             f"{got['added'] / GiB:.2f} / {got['bytes'] / GiB:.2f} GiB", "-", f"{ratio:.2f}", "<= 1.15",
                             "yes" if ratio <= 1.15 else "no"))
                if name == "8b" and dtype == "int8":
                    rows.append(("8", "  8B int8 loaded: whole process peak", f"{got['peak'] / GiB:.2f} GiB", "-", "-",
                                 "<= 10 GiB", "yes" if got["peak"] <= 10 * GiB else "no"))
            if name in ("3b", "tiny") and args.load_save:
                out = Path(tempfile.mkdtemp(prefix="florence-vl-save-", dir=root))
                try:
                    got = save_memory(folder, out, args.threads)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                shard = 5 * 10**9
                print(f"    save_pretrained of the loaded {name} bf16 ({got['bytes'] / GiB:.2f} GiB): peak added over "
                      f"the loaded model {got['added'] / 2**20:.1f} MiB, process peak {got['peak'] / GiB:.2f} GiB "
                      f"(the load's own peak reset before saving), {got['seconds']:.0f} s")
                rows.append(("8", f"save_pretrained {name} bf16: peak added over the loaded model "
                                  f"({got['seconds']:.0f} s)",
                             f"{got['added'] / 2**20:.0f} MiB", "-", "-", "<= one shard (5 GB)",
                             "yes" if got["added"] <= shard else "no"))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def add_arguments(p):
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="case 8: keep the random checkpoints in DIR and reuse them on later runs (default: a temporary "
                        "folder, removed at the end; building them writes ~26 GB)")
    p.add_argument("--load-models", default="3b,8b",
                   help="case 8: which checkpoints: 3b, 8b (tiny: a seconds-long run of the same code)")
    p.add_argument("--load-dtypes", default="int8,bf16,fp32", help="case 8: dtypes to load them in")
    p.add_argument("--load-save", action=argparse_bool(), default=True,
                   help="case 8: also measure save_pretrained of the loaded 3B bf16 model (default on)")
