"""quantize.py: int8 weight-only Linears against the float Linear on their dequantized weight, and a
random LLM's logits before and after quantization.

Int8Linear has two paths, torch._weight_int8pack_mm and dequantize + F.linear; each is forced and checked
against the same fp32 reference, max |y - ref| / max |ref| <= 1e-5 / 1e-2 / 2e-3 in fp32 / bf16 / fp16
(measured <= 4e-7 / 5e-3 / 6e-4: one or two roundings of the output), with negative controls (a wrong
scale, a transposed weight) that must fail. The quality test uses a 4-layer Llama-shaped model with
heavy-tailed weights (so a row's outliers set its int8 step, as in trained weights) and a 4-bit negative
control that the same thresholds must reject.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from generate import generate  # noqa: E402
from model import LLM, LLMConfig  # noqa: E402
from quantize import (Int8Linear, int8_linear_names, quantize_llm_, quantize_weight,  # noqa: E402
                      set_int8_linear_)
from helpers import randomize_  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LINEARS = ('self_attn.qkv_proj', 'self_attn.o_proj', 'mlp.gate_up_proj', 'mlp.down_proj')


def dequantized(m: Int8Linear) -> torch.Tensor:
    return m.weight.float() * m.scale.float()[:, None]  # (out, in), fp32


def rel_err(y, ref) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


# ---- quantize_weight --------------------------------------------------------------------------------

@pytest.mark.parametrize('w_dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_step(w_dtype, dtype):
    torch.manual_seed(0)
    w = 0.02 * torch.randn(48, 80)
    w[3] = 0                 # an all-zero row
    w[5, 17] = 3.0           # a row with one outlier, 60x the largest of its other entries
    w = w.to(w_dtype)
    before = w.clone()
    q, scale = quantize_weight(w, dtype)
    assert torch.equal(w, before), 'the input weight must not be modified'
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == dtype and scale.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    s = scale.double()[:, None]
    err = (q.double() * s - w.double()).abs()  # exact in fp64
    assert (err <= s / 2 + w.double().abs() * 2 ** -23).all()  # slack: w / scale was rounded once, in fp32
    assert (q[3] == 0).all() and torch.isfinite(scale).all() and scale[3] > 0
    assert q[5, 17] == 127 and (q[5].abs() <= 2).sum() >= 75  # the outlier row keeps only coarse levels...
    assert scale[5] > 30 * scale[4]                            # ...but only that row: scales are per row
    if w_dtype == torch.bfloat16:  # quantized in fp32 whatever w arrives in: bf16 -> fp32 is exact
        q32, s32 = quantize_weight(w.float(), dtype)
        assert torch.equal(q, q32) and torch.equal(scale, s32)


def test_quantizing_in_row_blocks_changes_nothing(monkeypatch):
    """quantize_weight works a block of rows at a time (a bounded fp32 copy); blocks of 3 rows or the whole
    weight give the same int8 values and scales."""
    import quantize
    w = (torch.randn(50, 32) * torch.rand(50, 1) * 3).to(torch.bfloat16)
    whole = quantize_weight(w, torch.bfloat16)
    monkeypatch.setattr(quantize, "BLOCK_ELEMENTS", 3 * 32 + 5)
    blocked = quantize_weight(w, torch.bfloat16)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


# ---- Int8Linear against the float Linear on its dequantized weight ----------------------------------

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kernel', [True, False], ids=['int8pack_mm', 'dequantize'])
@pytest.mark.parametrize('lead', [(5,), (2, 7)], ids=['2d', '3d'])
def test_int8_linear_matches_dequantized_float_linear(dtype, kernel, lead):
    torch.manual_seed(0)
    # in 80: a multiple of 16 (what the kernel needs), not of 32; out 100: not a multiple of its 4-row blocks
    m = Int8Linear.from_weight(torch.randn(100, 80) / 80 ** 0.5, dtype)
    m.kernel = kernel
    x = torch.randn(*lead, 80).to(dtype)
    ref = F.linear(x.float(), dequantized(m))  # the float Linear on the dequantized weight, in fp32
    y = m(x)
    assert y.dtype == dtype and y.shape == (*lead, 100)
    err = rel_err(y, ref)
    print(f'{dtype} {"kernel" if kernel else "dequantize"} {lead}: rel err {err:.1e}')
    assert err <= TOL[dtype]

    # negative controls: each row's scale moved to the next row, and a weight read transposed
    bad = copy.deepcopy(m)
    bad.scale = m.scale.roll(1)
    assert rel_err(bad(x), ref) > 10 * TOL[dtype]
    sq = Int8Linear.from_weight(torch.randn(80, 80) / 80 ** 0.5, dtype)
    sq.kernel = kernel
    assert rel_err(sq(x), F.linear(x.float(), dequantized(sq).T)) > 10 * TOL[dtype]


def test_kernel_is_used_only_where_it_is_fast_and_safe(monkeypatch):
    """The automatic choice: the kernel for a few CPU rows it can read safely, the fallback otherwise
    (many rows, K not a multiple of 16, a misaligned view, input that needs a gradient); right either way."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, '_weight_int8pack_mm', lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)

    def run(x, in_features=80, dtype=torch.bfloat16):
        m = Int8Linear.from_weight(torch.randn(64, in_features) / in_features ** 0.5, dtype)
        calls.clear()
        y = m(x)
        assert rel_err(y, F.linear(x.float(), dequantized(m))) <= TOL[dtype]
        return len(calls) == 1

    bf16 = dict(dtype=torch.bfloat16)
    assert run(torch.randn(1, 80, **bf16))                        # one decode step: the kernel
    assert run(torch.randn(4, 16, 80, **bf16))                    # 64 rows of bf16: still faster
    assert not run(torch.randn(2, 100, 80, **bf16))               # 200 rows: the dequantized matmul
    assert not run(torch.randn(3, 72, **bf16), in_features=72)    # K % 16 != 0: it would read past rows
    assert not run(torch.randn(3 * 80 + 1, **bf16)[1:].view(3, 80))  # 2 bytes off alignment: it would fault
    assert run(torch.randn(2, 80), dtype=torch.float32)           # fp32: its scalar loop wins at 2 rows...
    assert not run(torch.randn(3, 80), dtype=torch.float32)       # ...not at 3
    x = torch.randn(1, 80, requires_grad=True)
    m = Int8Linear.from_weight(torch.randn(64, 80), torch.float32)
    m(x).sum().backward()  # the kernel has no backward: gradients to x go through the fallback
    torch.testing.assert_close(x.grad, dequantized(m).sum(0, keepdim=True))


# ---- a random LLM before and after quantization -----------------------------------------------------

def heavy_tailed_llm(cfg: LLMConfig, seed=0) -> LLM:
    """randomize_'s conventions (norms 1 + 0.2 N(0,1), embeddings N(0, 0.25), matrices std 1 / sqrt(fan_in)),
    the matrices drawn from a Student-t with 4 degrees of freedom: heavier tails, as in trained weights,
    so a row's max (which sets its int8 step) lies ~5-6 std out (~3 for a Gaussian)."""
    torch.manual_seed(seed)
    llm = LLM(cfg).eval()
    randomize_(llm)
    t = torch.distributions.StudentT(torch.tensor(4.0))
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if p.ndim == 2 and 'embed' not in name:
                p.copy_(t.sample(p.shape) / 2 ** 0.5 / p.shape[1] ** 0.5)  # t(4) has variance 2
    return llm


QUALITY_CFG = LLMConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, n_layers=4, n_heads=8,
                        n_kv_heads=2, max_position_embeddings=512)  # Llama-shaped: GQA, K = 256 and 688


@pytest.fixture(scope='module')
def models():
    fp32 = heavy_tailed_llm(QUALITY_CFG)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = copy.deepcopy(bf16)
    quantize_llm_(int8)  # from the bf16 weights, as a user quantizes a bf16 checkpoint
    return fp32, bf16, int8


def agreement(logits, ref):
    """(top-1 agreement, max over positions of max|a - b| / max|b|, its median) over (B, T, V) logits."""
    a, b = logits.float().flatten(0, 1), ref.float().flatten(0, 1)
    rel = (a - b).abs().amax(-1) / b.abs().amax(-1)
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item(), rel.max().item(), rel.median().item()


@torch.no_grad()
def test_int8_logits_stay_close_to_bf16(models):
    fp32, bf16, int8 = models
    ids = torch.randint(0, QUALITY_CFG.vocab_size, (2, 160), generator=torch.Generator().manual_seed(0))
    ref = bf16(ids)
    top1, worst, median = agreement(int8(ids), ref)
    base = agreement(bf16(ids), fp32(ids))  # what bf16 alone costs, for scale
    coarse = copy.deepcopy(int8)  # negative control: 4-bit (15 levels) instead of 255
    for m in coarse.modules():
        if isinstance(m, Int8Linear):
            m.weight, m.scale = (m.weight.float() / 18).round().to(torch.int8), m.scale * 18
    bad = agreement(coarse(ids), ref)
    print(f'\n320 positions, vs bf16: int8 top-1 {top1:.3f}, max rel logit err {worst:.4f} (median {median:.4f}); '
          f'bf16 vs fp32: top-1 {base[0]:.3f}, max {base[1]:.4f}; 4-bit: top-1 {bad[0]:.3f}, max {bad[1]:.4f}')
    # measured 0.906 and 0.093 (seeds 0-3: top-1 0.906-0.931, max 0.089-0.093); bf16 vs fp32 alone is
    # 0.969 / 0.027: random nets amplify any noise much more than trained ones
    assert top1 >= 0.85 and worst <= 0.15
    assert bad[0] < 0.85 and bad[1] > 0.15  # 4-bit: 0.228 / 1.386


@torch.no_grad()
def test_greedy_generation_with_int8(models):
    _, bf16, int8 = models
    ids = torch.randint(0, QUALITY_CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = generate(int8, ids, max_new_tokens=12)  # prefill (24 rows) and decode (2 rows): the kernel
    ref = generate(bf16, ids, max_new_tokens=12)
    assert [len(o) for o in out] == [12, 12] and len(set(out[0])) > 3
    same = sum(a == b for o, r in zip(out, ref) for a, b in zip(o, r))
    print(f'\ngreedy: {same}/24 tokens as the bf16 model')

    # the cache does not change what the int8 model computes: fp32, against full forwards without cache
    llm = copy.deepcopy(int8).float()
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, llm(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(llm, ids, max_new_tokens=8) == seq[:, 12:].tolist()


# ---- quantize_llm_: what it replaces, what it keeps, the bytes -------------------------------------

def test_quantize_llm_replaces_every_linear_and_halves_their_bytes():
    llm = LLM(LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=2)).to(torch.bfloat16)
    embed = llm.embed_tokens
    embed_weight = embed.weight.clone()
    numel = sum(llm.get_submodule(n).weight.numel() for n in int8_linear_names(llm))
    rows = sum(llm.get_submodule(n).out_features for n in int8_linear_names(llm))
    summary = quantize_llm_(llm)
    assert not any(isinstance(m, nn.Linear) for m in llm.modules())
    for i in range(2):
        assert all(isinstance(llm.layers[i].get_submodule(n), Int8Linear) for n in LINEARS)
    assert isinstance(llm.lm_head, Int8Linear) and llm.lm_head.scale.dtype == torch.bfloat16
    assert llm.embed_tokens is embed and torch.equal(embed.weight, embed_weight)
    assert summary['linears'] == 2 * 4 + 1 and summary['skipped'] == []
    assert summary['linear_bytes_before'] == numel * torch.bfloat16.itemsize
    assert summary['linear_bytes_after'] == numel * 1 + rows * torch.bfloat16.itemsize  # int8 + bf16 scales
    assert summary['linear_bytes_after'] / summary['linear_bytes_before'] < 0.5 + 1 / 64
    llm(torch.arange(10)[None])  # still runs


def test_tied_lm_head_is_left_alone():
    llm = LLM(LLMConfig(tie_word_embeddings=True))
    summary = quantize_llm_(llm)
    assert type(llm.lm_head) is nn.Linear and llm.lm_head.weight is llm.embed_tokens.weight
    assert summary['linears'] == 2 * 4 and 'tied' in summary['skipped'][0]
    assert llm(torch.arange(10)[None]).shape == (1, 10, 512)


def test_linear_with_bias_is_refused():
    llm = LLM(LLMConfig())
    llm.layers[1].self_attn.o_proj = nn.Linear(64, 64, bias=True)
    with pytest.raises(NotImplementedError, match='layers.1.self_attn.o_proj has a bias'):
        quantize_llm_(llm)


def test_llama_8b_bytes_on_the_meta_device():
    with torch.device('meta'):
        llm = LLM(LLMConfig.from_name('llama3.1-8b')).to(torch.bfloat16)
    s = quantize_llm_(llm)
    gb = {k: v / 1e9 for k, v in s.items() if k.endswith('bytes_before') or k.endswith('bytes_after')}
    print(f'\nLlama-3.1-8B: Linears {gb["linear_bytes_before"]:.2f} -> {gb["linear_bytes_after"]:.2f} GB, '
          f'model {gb["model_bytes_before"]:.2f} -> {gb["model_bytes_after"]:.2f} GB')
    assert s['linears'] == 32 * 4 + 1 and 8.5 < gb['model_bytes_after'] < 8.7 and gb['model_bytes_before'] > 16


# ---- state dict, and loading straight to int8 -------------------------------------------------------

def test_state_dict_round_trip(models):
    int8 = models[2]
    sd = int8.state_dict()
    assert sd['layers.0.self_attn.qkv_proj.weight'].dtype == torch.int8
    assert sd['lm_head.scale'].dtype == torch.bfloat16
    buf = io.BytesIO()
    torch.save(sd, buf)
    with torch.device('meta'):  # the skeleton: a meta LLM, quantized on meta (no real tensors made)
        again = LLM(QUALITY_CFG)
    quantize_llm_(again, torch.bfloat16)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=True, assign=True)
    ids = torch.arange(20)[None]
    assert torch.equal(again(ids), int8(ids))


def test_loading_weight_by_weight_matches_quantizing_in_place(models):
    """What a streaming loader does: a meta LLM, each Linear weight quantized the moment it is ready."""
    bf16, int8 = models[1], models[2]
    with torch.device('meta'):
        llm = LLM(QUALITY_CFG)
    linear = int8_linear_names(llm)
    for name in linear:
        set_int8_linear_(llm, name, bf16.get_submodule(name).weight)
    for name, p in bf16.named_parameters():  # the rest (embedding, norms) as the loader sets them
        if name.removesuffix('.weight') not in linear:
            module, _, attr = name.rpartition('.')
            setattr(llm.get_submodule(module), attr, nn.Parameter(p.detach().clone()))
    assert not any(t.is_meta for t in [*llm.parameters(), *llm.buffers()])
    ids = torch.arange(20)[None]
    assert torch.equal(llm(ids), int8(ids))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_loading_to_int8_equals_quantizing_the_loaded_model(family, tmp_path):
    """LLM.from_pretrained(..., quantize='int8') quantizes each weight as it is read (Llama's q/k/v and
    gate/up apart, then joined; Phi-3's fused ones whole): the same int8 weights and scales as loading bf16
    and then quantize_llm_."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
    from helpers import random_hf_model
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2 if family == "llama" else 4, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=None, eos_token_id=None)
    cls, cfg = (LlamaForCausalLM, LlamaConfig(**kw)) if family == "llama" else (Phi3ForCausalLM, Phi3Config(**kw))
    random_hf_model(cls, cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    lazy = LLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantize="int8")
    eager = LLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    quantize_llm_(eager)
    a, b = lazy.state_dict(), eager.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert isinstance(lazy.layers[0].self_attn.qkv_proj, Int8Linear)


def test_a_frozen_int8_linear_passes_gradients_without_saving_a_float_weight():
    """LoRA over an int8 base: the gradient reaching x equals the float path's, and what autograd keeps for
    backward is the int8 weight and its scale (resident anyway), not a dequantized copy per Linear."""
    import lora
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    m = Int8Linear.from_weight(w, torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    resident = {t.untyped_storage()._cdata for t in m.buffers()}
    saved, y = lora.saved_bytes(lambda: m(x), resident)
    y.float().square().sum().backward()
    dequantized = m.weight.to(torch.bfloat16) * m.scale[:, None]
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ dequantized.T).float().square().sum().backward()
    assert saved == 0 and (x.grad.float() - x2.grad.float()).abs().max() <= 1e-2 * x2.grad.float().abs().max()
    # negative control: the float path saves the dequantized weight (96 x 64 bf16)
    plain, _ = lora.saved_bytes(lambda: torch.nn.functional.linear(x, m.weight.to(x.dtype)) * m.scale, resident)
    assert plain >= 96 * 64 * 2
