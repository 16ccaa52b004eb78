"""bench_cases.py's case 5 arithmetic (the GPU case, which no CPU run exercises): the FLOPs behind the MFU figure
and the bytes behind the decode roofline, checked against counts made by hand on a small decoder.
Times are measured but not asserted."""
import types

import torch


import bench  # noqa: E402
import bench_cases  # noqa: E402
from model import LLM, LLMConfig  # noqa: E402

# Phi-3.5-mini's layout (its long-rope factors need head_dim 96), made small
CFG = LLMConfig.from_name("phi3.5-mini", n_layers=2, hidden_size=192, intermediate_size=256, n_heads=2, n_kv_heads=2,
                          vocab_size=100)
ARGS = types.SimpleNamespace(repeats=1, warmup=0)


def matmul_params(cfg: LLMConfig) -> int:
    """Weights used as matrices in every position's forward: all 2-D ones but the embedding table."""
    return sum(p.numel() for name, p in LLM(cfg).named_parameters() if p.dim() == 2 and name != "embed_tokens.weight")


def test_training_flops_are_forward_plus_twice_the_forward_for_backward():
    B, T = 2, 16
    flops, _ = bench_cases.measure_training(CFG, B, T, ARGS, torch.device("cpu"))
    # 2 FLOPs per multiply-add, forward; backward computes the input and the weight gradients: twice that.
    # (On the CPU the attention itself is not counted: FlopCounterMode has no formula for the CPU SDPA
    # kernel; on CUDA the flash / efficient kernels are counted and add 12 * B * T^2 * heads * head_dim per layer.)
    assert flops == 3 * 2 * B * T * matmul_params(CFG)
    twice, _ = bench_cases.measure_training(CFG, 2 * B, T, ARGS, torch.device("cpu"))
    assert twice == 2 * flops  # negative control: the count follows the tokens


def test_decode_reads_every_weight_but_the_embedding_table_and_the_kv_cache():
    prompt, n = 8, 4
    _, weights, kv = bench_cases.measure_decode(CFG, prompt, n, ARGS, torch.device("cpu"))
    assert weights == 2 * sum(p.numel() for name, p in LLM(CFG).named_parameters() if name != "embed_tokens.weight")
    head_dim = CFG.hidden_size // CFG.n_heads
    assert kv == 2 * CFG.n_layers * CFG.n_kv_heads * head_dim * 2 * (prompt + 1 + n / 2)  # k and v, bf16


# ----------------------------------------------------------------------------------------------
# Cases 6-8 (bench_real.py, bench_loading.py) on tiny shapes: the plumbing, not the times

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

import bench_loading  # noqa: E402
import bench_real  # noqa: E402
from florence_encoder import cosine_table  # noqa: E402
from fusion import FlorenceVL, FlorenceVLConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair():
    vision_cfg, llm_cfg = bench_real.real_configs("tiny")
    ref = bench_real.build_reference(vision_cfg, llm_cfg, dtype=torch.float32)
    ours = bench_real.ours_from_reference(ref, vision_cfg, dtype=torch.float32)
    ids = bench_real.real_prompt(llm_cfg.vocab_size)
    pixels = bench_real.real_pixels(vision_cfg.image_size, torch.float32)
    return ref, ours, ids, pixels


def test_ours_holds_the_references_tensors(tiny_pair):
    ref, ours, _, _ = tiny_pair
    theirs = bench_real.storages(ref)
    # everything of ours is the reference's storage but the prompt ids (3 x 14 int64) and the rope tables
    assert bench_real.tensor_bytes(ours, exclude=theirs) == 3 * 14 * 8
    assert ours.llm.layers[0].self_attn.qkv_proj.weight.data_ptr() == \
        ref.llm.model.layers[0].self_attn.qkv_proj.weight.data_ptr()
    assert ours.mm_projector.encoder_mlp[2][1].weight is ref.projector[4].weight


def test_ttft_path_ours_equals_the_reference_in_fp32(tiny_pair):
    """The same tokens, one clock reading per token on both sides; the same visual tokens and first logits."""
    ref, ours, ids, pixels = tiny_pair
    n = 6
    t = bench_real.race_answers({"ours": lambda m: bench_real.answer_ours(ours, ids, pixels, n, m),
                                 "reference": lambda m: bench_real.answer_reference(ref, ids, pixels, n, m)},
                                repeats=1, warmup=0, clock=0, max_others=math.inf)
    assert t["ours"]["tokens"] == t["reference"]["tokens"] and len(t["ours"]["tokens"]) == n
    assert all(len(m.times) == n + 1 for side in t.values() for m in side["runs"])
    assert all(side["ttft"] > 0 and side["decode"] > 0 for side in t.values())
    a = bench_real.breakdown(lambda: bench_real.answer_ours(ours, ids, pixels, 1), bench_real.ours_stages(ours), False,
                             math.inf)
    b = bench_real.breakdown(lambda: bench_real.answer_reference(ref, ids, pixels, 1),
                             bench_real.reference_stages(ref), False, math.inf)
    va, vb = a[0].outputs["projector"], b[0].outputs["projector"]
    assert va.shape == vb.shape == (1, ours.num_visual_tokens, ours.cfg.llm.hidden_size)
    assert (va - vb).abs().max() < 1e-4
    la, lb = a[0].outputs["LLM prefill"][0], b[0].outputs["LLM prefill"].logits[0, -1]
    assert (la - lb).abs().max() < 1e-4
    assert a[0].seconds["DaViT"] > 0 and a[1] >= sum(a[0].seconds.values())


def test_flop_counts_of_the_ttft(tiny_pair):
    """FLOPs by stage: the reference runs DaViT three times (once per prompt), ours once, the rest is the same
    work; the prefill is 2 x tokens x matrix weights + lm_head on one position + SDPA by our CPU formula."""
    ref, ours, ids, pixels = tiny_pair
    a, _, fa, sa = bench_real.breakdown(lambda: bench_real.answer_ours(ours, ids, pixels, 1),
                                        bench_real.ours_stages(ours), True, math.inf)
    b, _, fb, sb = bench_real.breakdown(lambda: bench_real.answer_reference(ref, ids, pixels, 1),
                                        bench_real.reference_stages(ref), True, math.inf)
    assert a.flops["DaViT"] > 0 and b.flops["DaViT"] == 3 * a.flops["DaViT"]
    for stage in ("encoder", "projector", "LLM prefill"):
        assert a.flops[stage] == b.flops[stage] > 0, stage
    cfg = ours.cfg.llm
    T = ids.shape[1] - 1 + ours.num_visual_tokens
    matrices = matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size  # lm_head runs on the last position only
    attention = cfg.n_layers * 4 * cfg.n_heads * T * T * cfg.head_dim  # q k^T and p v, full square
    assert a.flops["LLM prefill"] == 2 * T * matrices + 2 * cfg.hidden_size * cfg.vocab_size + attention
    assert 0 < sa < fa and sb > sa  # SDPA counted (by its formula), more of it with DaViT's windows thrice
    # outside the stages: the image projection (once per DaViT pass), nothing else
    vision = ours.cfg.vision
    other_a, other_b = fa - sum(a.flops.values()), fb - sum(b.flops.values())
    assert other_a == 2 * ours.num_visual_tokens * vision.vision.dims[-1] * vision.d_model and other_b == 3 * other_a
    assert fb - fa == 2 * (a.flops["DaViT"] + other_a)


def test_the_cases_run_end_to_end_on_tiny_shapes(capsys):
    bench.main(["--cases", "6,7", "--real-preset", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory",
                "--real-tokens", "3", "--max-others", "inf"])
    out = capsys.readouterr().out
    assert "| 6    | TTFT bf16" in out and "| 7    | decode ms/token, ours int8" in out
    assert "decode step as a share of its roofline" in out and "TTFT FLOPs counted" in out
    assert "ours int8 decode step at" in out and "interleaved at" in out
    bench.main(["--cases", "7", "--real-preset", "tiny", "--no-ttft", "--no-memory", "--max-others", "inf"])
    out = capsys.readouterr().out
    assert "interleaved at" in out and "TTFT" not in out.split("| case")[1]


def test_interleaved_decode_feeds_both_sides_the_same_cache(tiny_pair):
    """decode_race gives ours and the reference the same random cache and token at the same position: in fp32 their
    first logits agree to parity; the control, ours with int8 weights, does not."""
    ref, ours, _, _ = tiny_pair
    got = bench_real.decode_race(ours.llm, ref.llm, context=20, steps=1, rounds=2)
    assert len(got["rounds"]["ours"]) == len(got["rounds"]["reference"]) == 2
    diff = (got["first"]["ours"] - got["first"]["reference"]).abs().max().item()
    int8 = bench_real.ours_from_reference(ref, ours.cfg.vision, torch.float32, "int8")
    wrong = bench_real.decode_race(int8.llm, ref.llm, context=20, steps=1, rounds=2)
    control = (wrong["first"]["ours"] - wrong["first"]["reference"]).abs().max().item()
    print(f"first decode logits, ours vs reference: {diff:.2e}; control (int8 weights) {control:.2e}")
    assert diff <= 1e-4 < control


def test_decode_profile_finds_the_matmul_and_attention_kernels(tiny_pair):
    """decode_profile sorts a step's time by kernel name: a renamed kernel would silently count as 'the rest', so
    both named groups must be found; the three parts add up to the step."""
    ref, ours, _, _ = tiny_pair
    for llm in (ours.llm, bench_real.ours_from_reference(ref, ours.cfg.vision, torch.float32, "int8").llm):
        p = bench_real.decode_profile(llm, context=20, steps=2)
        assert p["matmuls"] > 0 and p["attention"] > 0 and p["step"] > 0
        assert abs(p["matmuls"] + p["attention"] + p["rest"] - p["step"]) < 1e-9


def test_checkpoint_builder_writes_a_loadable_sharded_layout(tmp_path):
    """Random tensors drawn one at a time into save_sharded: shards <= the limit + index, the configs as
    save_pretrained writes them; from_pretrained loads it, with the bytes expected_bytes predicts."""
    cfg = FlorenceVLConfig.from_name("tiny")
    written = bench_loading.build_checkpoint(tmp_path, cfg, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == written
    assert (tmp_path / "vision_tower" / "config.json").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = FlorenceVL.from_pretrained(tmp_path)
    sd = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v.is_floating_point())
    assert sum(v.numel() * v.element_size() for v in sd.values()) == written
    assert bench_real.tensor_bytes(model) == bench_loading.expected_bytes(cfg, torch.bfloat16)
    assert abs(model.llm.norm.weight.float().mean() - 1) < 0.1 and model.llm.embed_tokens.weight.float().std() > 0.5
    assert torch.equal(model.vision.visual_temporal_embed,
                       cosine_table(cfg.vision.temporal_embed_size, cfg.vision.vision.dims[-1]).to(torch.bfloat16))
    int8 = FlorenceVL.from_pretrained(tmp_path, quantize="int8")
    assert bench_real.tensor_bytes(int8) == bench_loading.expected_bytes(cfg, torch.bfloat16, "int8") < written


def test_memory_children_run(tmp_path):
    """One side built + one TTFT in a child, and case 8 (load in int8, save) on a tiny checkpoint."""
    got = bench_real.side_memory("ours", "tiny", quantize="int8", threads=1)
    assert got["peak"] > got["added"] > 0 and got["bytes"] > 0
    rows = bench_loading.case_loading(types.SimpleNamespace(load_models="tiny", load_dtypes="int8", threads=1,
                                                            checkpoints=str(tmp_path), load_save=True))
    assert [r[1].split(":")[0] for r in rows] == ["load tiny int8", "save_pretrained tiny bf16"]
    assert all(r[4] == "-" or float(r[4]) > 0 for r in rows)
    assert (tmp_path / "florence-vl-tiny" / "config.json").is_file()  # kept: --checkpoints DIR
