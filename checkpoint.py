"""Loading plumbing shared by every component: where weights are, how they are read, and strict checks.

Every loader in this project follows the same three steps, in the open:
  folder = resolve(path_or_repo_id)            # a local folder, or the Hugging Face hub cache
  sd = read_weights(file) for file in weight_files(folder)
  check_state_dict(expected_shapes, got_shapes, what)   # raises, listing every problem at once
"""
import ctypes
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: raised with every missing, unexpected and misshaped key."""


def resolve(path_or_repo_id, allow_patterns=None) -> Path:
    """A local folder as it is; otherwise a hub repo id, fetched into (or found in) the local HF cache.

    With HF_HUB_OFFLINE=1 only the cache is used, so a machine without network loads what it has."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the folder that holds config.json and the weights")
    if str(path_or_repo_id).count("/") != 1 or str(path_or_repo_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_repo_id!r} is neither a local folder nor a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo_id), allow_patterns=allow_patterns))
    except Exception as e:  # network down, repo missing, not in the offline cache, ...
        raise CheckpointError(f"could not resolve {path_or_repo_id!r} locally or on the hub: {e}") from e


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def weight_files(folder, prefix="model") -> list:
    """The weight files of a folder, in load order: sharded safetensors (via the index), one safetensors
    file, or a pickled pytorch_model.bin (read safely, see read_weights)."""
    folder = Path(folder)
    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {missing}")
        return [folder / s for s in shards]
    for name in (f"{prefix}.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    raise CheckpointError(f"no weights found in {folder} (looked for {prefix}.safetensors[.index.json], "
                          f"pytorch_model.bin)")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class StoredTensor:
    """A tensor still in its safetensors file, read a block of rows at a time: `t[i:j]` reads rows i..j-1.
    A loader that converts a weight as it reads it (to int8) then never holds the weight itself."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: list):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, torch.Size(shape)
        self.device = torch.device("cpu")

    def __getitem__(self, rows: slice) -> torch.Tensor:
        i, j, _ = rows.indices(self.shape[0])
        row = self.shape[1:].numel() * self.dtype.itemsize
        buf = torch.empty(max(j - i, 0) * row, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * row)
            if f.readinto(buf.numpy()) != buf.numel():
                raise CheckpointError(f"cannot read {self.path}: the file ends inside a tensor's data")
        return buf.view(self.dtype).reshape(-1, *self.shape[1:])

    def detach(self) -> "StoredTensor":
        return self


def stream_tensors(files, skip=lambda name: False, lazy=lambda name: False):
    """Yield (name, tensor) from the weight files one tensor at a time, never reading a tensor that `skip`
    rejects; one that `lazy` selects comes as a StoredTensor, read by the caller block by block. Safetensors
    files are read with plain file reads into fresh memory, so what stays in memory is what the caller keeps
    (a memory map would keep every page it touched resident until the file is closed: a whole 5 GB shard).
    A pickle is memory-mapped (weights_only=True) and yielded from the map."""
    for path in map(Path, files):
        if path.suffix != ".safetensors":
            for name, t in read_weights(path).items():
                if not skip(name):
                    yield name, t
            continue
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                start = 8 + n
                for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    if skip(name):
                        continue
                    a, b = info["data_offsets"]
                    dtype = SAFETENSORS_DTYPES[info["dtype"]]
                    if lazy(name) and len(info["shape"]) >= 1:
                        yield name, StoredTensor(path, start + a, dtype, info["shape"])
                        continue
                    buf = torch.empty(b - a, dtype=torch.uint8)
                    f.seek(start + a)
                    if f.readinto(buf.numpy()) != b - a:
                        raise ValueError(f"{name}: the file ends inside its data")
                    yield name, buf.view(dtype).reshape(info["shape"])
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (macOS, musl)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). A loader that
    frees a read buffer for every weight it converts (a cast, an int8 copy) leaves the heap fragmented, and
    the freed pages keep counting: 0.4 x the model for an int8 load without this (tests/test_checkpoint.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def read_weights(path) -> dict:
    """Read one weight file. Pickles are opened with weights_only=True: tensors only, no code runs."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused {path}: a pickle that does not load with weights_only=True (it holds "
                              f"more than tensors and could run code); convert it to safetensors. "
                              + next((l for l in str(e).splitlines() if "Unpickler error" in l), "")) from e
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def tensor_shapes(files) -> dict:
    """{name: shape} of every tensor in the weight files, read from the safetensors headers alone (a pickle
    is memory-mapped): what a loader needs to know before it reads any tensor."""
    out = {}
    for path in map(Path, files):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from e
        else:
            out.update(shapes(read_weights(path)))
    return out


def check_state_dict(expected: dict, got: dict, what: str = "checkpoint"):
    """Compare {name: shape} maps; raise one CheckpointError that lists every difference."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20])
                     + (" ..." if len(unexpected) > 20 else ""))
    for k in misshaped[:20]:
        lines.append(f"  wrong shape: {k}: checkpoint {tuple(got[k])}, model {tuple(expected[k])}")
    raise CheckpointError("\n".join(lines))


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _safetensors_header(sd: dict, metadata=None) -> bytes:
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def save_safetensors(sd: dict, path, metadata=None):
    """Write a safetensors file atomically (a temp file in the same folder, fsync, then rename: a crash never
    leaves a half-written file under the final name), one tensor at a time: what is held beyond the tensors
    themselves is one tensor's contiguous copy at most (safetensors' own writer builds the whole file in
    memory, a second copy of everything)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in sd.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # (not mkstemp: its files are 0600, where the umask should decide)
            f.write(_safetensors_header(sd, metadata))
            for v in sd.values():
                if v.numel():
                    f.write(memoryview(v.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_sharded(sd: dict, folder, max_shard_bytes: int = 5 * 10**9, prefix: str = "model") -> list:
    """The hub's layout: one `{prefix}.safetensors` if everything fits in one shard, else
    `{prefix}-0000i-of-0000n.safetensors` shards of at most max_shard_bytes (a tensor larger than that gets a
    shard of its own) and `{prefix}.safetensors.index.json` (written last). Returns the files written."""
    folder = Path(folder)
    shards, size = [[]], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = [f"{prefix}.safetensors"] if len(shards) == 1 else \
        [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_safetensors({k: sd[k] for k in keys}, folder / name)
    index = folder / f"{prefix}.safetensors.index.json"
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        write_text_atomic(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                          + "\n")
    # what an earlier save in the other layout left would be read instead (the index first) or beside
    keep = set(names) | ({index.name} if len(shards) > 1 else set())
    for path in [*folder.glob(f"{prefix}-*-of-*.safetensors"), folder / f"{prefix}.safetensors", index]:
        if path.name not in keep and path.exists():
            path.unlink()
    return [folder / n for n in names]


def write_text_atomic(path, text: str):
    """A small text file (config.json, a pointer) written to a temp name, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- dtypes ------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """oneDNN's bf16 kernels need AVX512-BF16 or AMX. Without them (AVX2-only CPUs: most laptops, and VMs that hide
    the rest) PyTorch computes bf16 through fp32: the same numbers, far slower for prefill-sized matmuls (measured on
    2 Zen 5 vCPUs showing AVX2 only, a 600 x 3072 @ 3072 x 3072 matmul: 20 GFLOP/s in bf16, 136 in fp32; at one row,
    where the bytes decide, bf16 is 1.8x faster)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def memory_available() -> int | None:
    """Bytes the kernel says a new allocation can take now (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def stored_numel(files) -> int:
    """Elements of all tensors in the weight files (headers only)."""
    n = 0
    for shape in tensor_shapes(files).values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def pick_dtype(name: str, device, fp32_bytes: int | None = None) -> tuple[torch.dtype, str]:
    """--dtype for inference -> (dtype, why). fp32 / bf16 / fp16 as asked; auto is what fits the machine:
    - CUDA: bf16, fp16 on a GPU without bf16 (the official evaluation runs fp16);
    - a CPU with native bf16: bf16 (half the memory of fp32; Florence-VL-8B is 32 GiB in fp32);
    - a CPU without (cpu_has_native_bf16): fp32 when the weights in fp32 (fp32_bytes) fit in 85% of the memory
      available, since bf16 would make the prompt ~7x slower there; else bf16, which fits, slowly."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
        return DTYPES[name], "as asked"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 on this GPU"
        return torch.float16, "auto: this GPU has no bf16"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: bf16 (this CPU has native bf16)"
    free = memory_available()
    if fp32_bytes is None or free is None or fp32_bytes <= 0.85 * free:
        return torch.float32, ("auto: fp32, since this CPU has no native bf16 (AVX512-BF16 / AMX) and bf16 would run "
                               "through fp32, several times slower")
    return torch.bfloat16, (f"auto: bf16 although this CPU has no native bf16 (slow): the weights in fp32, "
                            f"{fp32_bytes / 2**30:.1f} GiB, do not fit in {free / 2**30:.1f} GiB available")
