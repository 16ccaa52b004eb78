"""checkpoint.py at a size where memory shows: sharded safetensors as the hub lays them out, streamed reads and
writes, and the peak memory of loading and saving a Florence-VL checkpoint, measured in a child process
(tests/memory.py), each with a negative control that the measurement can tell a second copy apart.

The checkpoint: the tiny tower, an 8-layer LLM 1024 wide with a vocabulary of 8192 (its largest tensor 7% of the
model, as Llama-3.1-8B's lm_head is 6% of Florence-VL-8B): 119M parameters, 238 MB in bf16, in 100 MB shards.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import train
from checkpoint import read_weights, save_sharded, stream_tensors, weight_files  # noqa: E402
from fusion import FlorenceVL, FlorenceVLConfig  # noqa: E402
from memory import measure  # noqa: E402
from model import LLMConfig  # noqa: E402

SHARD = 100 * 10**6
# Imports, and the first model built on the meta device (torch loads its meta kernels then: ~85 MB, once per
# process), before the baseline: the figures are what loading or saving a checkpoint adds.
SETUP = """import torch
from fusion import FlorenceVL, FlorenceVLConfig
with torch.device("meta"):
    FlorenceVL(FlorenceVLConfig.from_name("tiny"))
"""


def medium_config() -> FlorenceVLConfig:
    cfg = FlorenceVLConfig.from_name("tiny")
    cfg.llm = LLMConfig(family="phi3", vocab_size=8192, hidden_size=1024, intermediate_size=2816, n_layers=8,
                        n_heads=16, n_kv_heads=16)
    return cfg


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    torch.manual_seed(0)
    model = FlorenceVL(medium_config()).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("medium")
    model.save_pretrained(folder, max_shard_bytes=SHARD)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"folder": folder, "model": model, "bytes": weights,
            "params": sum(p.numel() for p in model.parameters())}


def test_sharded_layout_and_round_trip(medium):
    folder = medium["folder"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(files) == 3 and set(index["weight_map"].values()) == {f.name for f in files}
    assert not (folder / "model.safetensors").exists()
    sizes = [sum(t.numel() * t.element_size() for _, t in stream_tensors([f])) for f in files]
    assert max(sizes) <= SHARD and index["metadata"]["total_size"] == sum(sizes)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = FlorenceVL.from_pretrained(folder)  # dtype as stored
    a, b = medium["model"].state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_resaving_in_the_other_layout_leaves_nothing_stale(tmp_path):
    sd = {f"w{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    save_sharded(sd, tmp_path, max_shard_bytes=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json"]
    save_sharded({"x": torch.ones(3)}, tmp_path)  # now it fits in one file
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert [k for k, _ in stream_tensors(weight_files(tmp_path))] == ["x"]
    save_sharded(sd, tmp_path, max_shard_bytes=1000)
    assert not (tmp_path / "model.safetensors").exists()
    assert [k for k, _ in stream_tensors(weight_files(tmp_path))] == list(sd)


def test_stored_tensors_read_rows_from_the_file(tmp_path):
    """lazy names come as StoredTensor: rows read from the file on demand, equal to the tensor; int8
    quantization from the file block by block gives what quantizing the tensor gives."""
    import quantize
    from checkpoint import StoredTensor, save_safetensors
    w = torch.randn(37, 24).to(torch.bfloat16)
    save_safetensors({"a": torch.ones(3), "w": w, "c": torch.zeros(2, 2, 2)}, tmp_path / "x.safetensors")
    got = dict(stream_tensors([tmp_path / "x.safetensors"], lazy=lambda name: name != "a"))
    assert isinstance(got["w"], StoredTensor) and not isinstance(got["a"], StoredTensor)
    assert got["w"].shape == w.shape and torch.equal(got["w"][:], w) and torch.equal(got["w"][5:9], w[5:9])
    assert torch.equal(got["c"][1:], torch.zeros(1, 2, 2)) and got["w"][40:].shape == (0, 24)
    quantize.BLOCK_ELEMENTS, old = 5 * 24, quantize.BLOCK_ELEMENTS
    try:
        lazy, eager = quantize.quantize_weight(got["w"], torch.bfloat16), quantize.quantize_weight(w, torch.bfloat16)
    finally:
        quantize.BLOCK_ELEMENTS = old
    assert torch.equal(lazy[0], eager[0]) and torch.equal(lazy[1], eager[1])


LOAD = """
model = FlorenceVL.from_pretrained({folder!r}, dtype={dtype}, quantize={quantize!r})
out["bytes"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
"""


@pytest.mark.parametrize("dtype, quantize", [("torch.bfloat16", None), ("torch.float32", None),
                                             ("torch.bfloat16", "int8")])
def test_loading_holds_the_model_and_little_else(medium, dtype, quantize):
    """Peak memory added by from_pretrained <= 1.15 x the loaded model's bytes: bf16 as stored, bf16 -> fp32
    (each tensor cast as it is read), bf16 -> int8 (each Linear quantized as it is assembled)."""
    got = measure(LOAD.format(folder=str(medium["folder"]), dtype=dtype, quantize=quantize), setup=SETUP)
    ratio = got["added"] / got["out"]["bytes"]
    print(f"\n{dtype} {quantize}: model {got['out']['bytes'] / 1e6:.0f} MB, peak added {got['added'] / 1e6:.0f} MB "
          f"({ratio:.2f}x), {got['seconds']:.1f} s")
    expected = medium["bytes"] * (2 if dtype == "torch.float32" else 1) if quantize is None else None
    assert expected is None or abs(got["out"]["bytes"] - expected) < 0.01 * expected
    assert ratio <= 1.15


def test_the_measurement_sees_a_second_copy(medium):
    """Negative control: reading every shard whole (safetensors' load_file) and then building the model from
    the dict holds the weights twice; the same measurement reports it."""
    code = f"""
sd = {{}}
for f in weight_files({str(medium['folder'])!r}):
    sd.update(load_file(str(f)))
model = FlorenceVL(medium_config()).to(torch.bfloat16)
out["bytes"] = sum(t.numel() * t.element_size() for t in sd.values())
"""
    got = measure(code, setup=SETUP + "from safetensors.torch import load_file\nfrom checkpoint import weight_files\n"
                                      "from test_checkpoint import medium_config",
                  env={"PYTHONPATH": str(Path(__file__).resolve().parent)})
    assert got["added"] / got["out"]["bytes"] > 1.8


SAVE = """
model.save_pretrained({folder!r}, max_shard_bytes={shard})
"""


def test_saving_streams_one_tensor_at_a_time(medium, tmp_path):
    """save_pretrained adds at most one shard's worth over the loaded model (each tensor is written from its own
    memory). Negative control: writing the file from safetensors.torch.save's bytes (the whole file built in
    memory first) adds the weights once more, and the same measurement sees it. (safetensors 0.8's save_file
    itself streams: it adds under 1 MB here.)"""
    setup = SETUP + f"model = FlorenceVL.from_pretrained({str(medium['folder'])!r})"
    ours = measure(SAVE.format(folder=str(tmp_path / "ours"), shard=SHARD), setup=setup)
    whole = measure(f"from safetensors.torch import save\nopen({str(tmp_path / 'whole.safetensors')!r}, 'wb').write("
                    f"save({{k: v.contiguous() for k, v in model.llava_state_dict().items()}}))", setup=setup)
    print(f"\nsave: ours added {ours['added'] / 1e6:.1f} MB, whole file in memory {whole['added'] / 1e6:.0f} MB "
          f"(weights {medium['bytes'] / 1e6:.0f} MB)")
    assert ours["added"] <= SHARD
    assert whole["added"] > 0.8 * medium["bytes"]
    again = FlorenceVL.from_pretrained(tmp_path / "ours")
    a, b = medium["model"].state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Checkpoints that do not fit

def test_bad_checkpoints_get_a_clear_error(tmp_path):
    import shutil
    from checkpoint import CheckpointError, save_safetensors
    from fusion import FlorenceVL
    torch.manual_seed(0)
    model = train.build_model(train.parse_args([]))
    good = tmp_path / "good"
    model.save_pretrained(good)
    FlorenceVL.from_pretrained(good)

    def variant(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name
    # missing / unexpected / misshaped keys, all listed
    bad = variant("keys")
    sd = read_weights(bad / "model.safetensors")
    proj = sorted(k for k in sd if "mm_projector" in k)
    del sd[proj[0]]
    sd["model.mm_projector.extra.weight"] = torch.zeros(2)
    sd[proj[1]] = torch.zeros(3, 3)
    save_safetensors(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        FlorenceVL.from_pretrained(bad)
    msg = str(e.value)
    assert "(mm_projector) does not match the model" in msg and "missing (1): " + proj[0].split("mm_projector.")[1] in msg
    assert "unexpected (1): extra.weight" in msg and "wrong shape: " + proj[1].split("mm_projector.")[1] in msg
    # a truncated safetensors file
    bad = variant("truncated")
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read {bad / 'model.safetensors'}"):
        FlorenceVL.from_pretrained(bad)
    # a pickle that would run code is refused; a plain-tensor pickle loads
    bad = variant("pickle")
    (bad / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"x": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"refused {bad / 'pytorch_model.bin'}: a pickle that does not load "
                                              r"with weights_only=True"):
        FlorenceVL.from_pretrained(bad)
    assert not (tmp_path / "pwned").exists()
    torch.save(read_weights(good / "model.safetensors"), bad / "pytorch_model.bin")
    FlorenceVL.from_pretrained(bad)
    # a config naming an unknown architecture
    bad = variant("arch")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model \(architectures \['MambaForCausalLM'\]"):
        FlorenceVL.from_pretrained(bad)
    # a tokenizer larger than the embedding
    bad = variant("vocab")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = model.tokenizer.vocab_size - 8
    (bad / "config.json").write_text(json.dumps(cfg))
    sd = read_weights(bad / "model.safetensors")  # the weights agree with the config; the tokenizer does not
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:cfg["vocab_size"]].clone()
    save_safetensors(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tokenizer\.json does not match the model: {model.tokenizer.vocab_size} "
                                              rf"tokens, but the embedding has {cfg['vocab_size']} rows"):
        FlorenceVL.from_pretrained(bad)


def test_auto_dtype_fits_the_machine(monkeypatch):
    """--dtype auto: bf16 on a CPU with native bf16; without it fp32 when the fp32 weights fit in 85% of the memory
    available (bf16 would be emulated through fp32, several times slower), else bf16; as asked otherwise."""
    import checkpoint
    GiB = 2**30
    monkeypatch.setattr(checkpoint, "memory_available", lambda: 20 * GiB)
    monkeypatch.setattr(checkpoint, "cpu_has_native_bf16", lambda: True)
    assert checkpoint.pick_dtype("auto", "cpu", 16 * GiB)[0] == torch.bfloat16
    monkeypatch.setattr(checkpoint, "cpu_has_native_bf16", lambda: False)
    assert checkpoint.pick_dtype("auto", "cpu", 16 * GiB)[0] == torch.float32      # Florence-VL-3B: 16.5 GiB
    dtype, why = checkpoint.pick_dtype("auto", "cpu", 32 * GiB)                     # Florence-VL-8B: 32.2 GiB
    assert dtype == torch.bfloat16 and "do not fit in 20.0 GiB" in why
    assert checkpoint.pick_dtype("fp16", "cpu", 32 * GiB) == (torch.float16, "as asked")
    with pytest.raises(ValueError, match="unknown dtype"):
        checkpoint.pick_dtype("int4", "cpu")


def test_stored_numel_reads_the_headers(tmp_path):
    import checkpoint
    checkpoint.save_safetensors({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    assert checkpoint.stored_numel([tmp_path / "m.safetensors"]) == 17
