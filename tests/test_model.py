"""model.py / generate.py: the Llama-3.1 / Phi-3.5 decoder against transformers, on tiny random models.

Every parity test loads a transformers model saved with save_pretrained through our own loader and
compares logits (max abs diff <= 1e-4 in fp32; measured ~1e-7). Each has a negative control: the
same comparison with one thing wrong (a weight, the rope variant, the fused-projection order) must
fail. Weights are re-drawn away from the init (norms != 1, larger scales) so every mapping matters
and greedy generation does not collapse onto one token.
"""
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from checkpoint import CheckpointError  # noqa: E402
from generate import StreamDecoder, generate, sample, stream_text  # noqa: E402
from model import LLM, KVCache, LLMConfig  # noqa: E402
from tokenizer import TEMPLATES, Tokenizer, render_chat  # noqa: E402
from helpers import random_hf_model

VOCAB = 128
TOL = 1e-4


def llama_hf_config(**overrides):
    # 9 query heads over 3 KV heads: an odd number of groups, each of odd size
    kw = dict(vocab_size=VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=None, eos_token_id=None, pad_token_id=0,
              # original context 16: the three rope branches (kept, interpolated, divided) all occur
              rope_parameters=dict(rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=16))
    return LlamaConfig(**{**kw, **overrides})


def phi3_hf_config(partial_rotary_factor=1.0, **overrides):
    g = torch.Generator().manual_seed(1)
    n = int(16 * partial_rotary_factor) // 2
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              original_max_position_embeddings=32, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=None,
              pad_token_id=0,
              rope_parameters=dict(rope_type='longrope', rope_theta=10000.0,
                                   partial_rotary_factor=partial_rotary_factor,
                                   short_factor=(1 + torch.rand(n, generator=g)).tolist(),
                                   long_factor=(1 + 7 * torch.rand(n, generator=g)).tolist()))
    return Phi3Config(**{**kw, **overrides})


def saved(model, folder, shard=None) -> Path:
    model.save_pretrained(folder, **({'max_shard_size': shard} if shard else {}))
    return Path(folder)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def batch(T, lengths, seed=0):
    """ids (B, T) and a right-padding mask with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def real_diff(ours, theirs, mask) -> float:
    """Max abs diff over real (unpadded) positions only: padded positions have no defined output."""
    return max_diff(ours[mask.bool()], theirs[mask.bool()])


@torch.no_grad()
def compare(ours: LLM, hf, ids, mask=None) -> float:
    return real_diff(ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits,
                     torch.ones_like(ids) if mask is None else mask)


# ---- logits parity -------------------------------------------------------------------------------

@pytest.mark.parametrize('tied,shard', [(False, '30KB'), (True, None)])
def test_llama_logits_match_transformers(tmp_path, tied, shard):
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config(tie_word_embeddings=tied))
    folder = saved(hf, tmp_path, shard)
    assert (folder / 'model.safetensors.index.json').is_file() == (shard is not None)
    if shard:  # some fused weight has its parts in different shards: the loader must wait for both
        files = json.loads((folder / 'model.safetensors.index.json').read_text())['weight_map']
        assert any(files[f'model.layers.{i}.mlp.gate_proj.weight'] != files[f'model.layers.{i}.mlp.up_proj.weight']
                   for i in range(2))
    ours = LLM.from_pretrained(folder)
    assert ours.cfg.rope_type == 'llama3' and ours.cfg.n_kv_heads == 3 and ours.cfg.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    ids, mask = batch(40, [40, 27, 9])
    d_full = compare(ours, hf, ids)
    d_pad = compare(ours, hf, ids, mask)
    print(f'llama tied={tied} shard={shard}: max abs diff {d_full:.2e} (no padding), {d_pad:.2e} (right padding)')
    assert d_full <= TOL and d_pad <= TOL


@pytest.mark.parametrize('T', [20, 48])  # below and above the original context of 32
@pytest.mark.parametrize('partial', [1.0, 0.5])
def test_phi3_longrope_logits_match_transformers(tmp_path, T, partial):
    hf = random_hf_model(Phi3ForCausalLM, phi3_hf_config(partial))
    ours = LLM.from_pretrained(saved(hf, tmp_path, '40KB'))
    assert ours.cfg.family == 'phi3' and ours.cfg.rope_type == 'longrope'
    assert ours.cfg.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(32.0))).sqrt().item())
    ids, mask = batch(T, [T, T - 7])
    assert ours.rotary.use_long(torch.arange(T)) == (T > 32)
    d_full = compare(ours, hf, ids)
    d_pad = compare(ours, hf, ids, mask)
    print(f'phi3 longrope T={T} partial={partial}: max abs diff {d_full:.2e} (no padding), {d_pad:.2e} (right padding)')
    assert d_full <= TOL and d_pad <= TOL


def test_right_padding_does_not_change_real_positions():
    ours = LLM(LLMConfig.from_hf_config(llama_hf_config().to_dict())).eval()
    ours.load_hf_state_dict(random_hf_model(LlamaForCausalLM, llama_hf_config()).state_dict())
    ids, mask = batch(30, [30, 17])
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)[1, :17]
        alone = ours(ids[1:, :17])[0]
        left = ours(torch.cat([torch.zeros(1, 13, dtype=torch.long), ids[1:, :17]], 1),
                    attention_mask=torch.cat([torch.zeros(1, 13), torch.ones(1, 17)], 1).long())[0, 13:]
    assert max_diff(padded, alone) <= 1e-5 and max_diff(left, alone) <= 1e-5


# ---- negative controls: one thing wrong must break parity ----------------------------------------

def _loaded(cfg_dict, sd) -> LLM:
    return LLM(LLMConfig.from_hf_config(cfg_dict)).eval().load_hf_state_dict(sd)


@pytest.mark.parametrize('wrong', ['perturbed_weight', 'default_rope', 'k_v_swapped', 'gate_up_swapped'])
def test_llama_negative_controls(wrong):
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config())
    cfg, sd = hf.config.to_dict(), dict(hf.state_dict())
    ids, _ = batch(40, [40])
    assert compare(_loaded(cfg, sd), hf, ids) <= TOL  # the control's baseline passes
    if wrong == 'perturbed_weight':
        sd['model.layers.1.post_attention_layernorm.weight'] = sd['model.layers.1.post_attention_layernorm.weight'] + 1e-2
    elif wrong == 'default_rope':
        cfg = {**cfg, 'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000.0}}
    elif wrong == 'k_v_swapped':  # same shapes under GQA: only the fused order tells them apart
        for i in range(2):
            p = f'model.layers.{i}.self_attn.'
            sd[p + 'k_proj.weight'], sd[p + 'v_proj.weight'] = sd[p + 'v_proj.weight'], sd[p + 'k_proj.weight']
    elif wrong == 'gate_up_swapped':
        for i in range(2):
            p = f'model.layers.{i}.mlp.'
            sd[p + 'gate_proj.weight'], sd[p + 'up_proj.weight'] = sd[p + 'up_proj.weight'], sd[p + 'gate_proj.weight']
    d = compare(_loaded(cfg, sd), hf, ids)
    print(f'llama negative control {wrong}: max abs diff {d:.2e}')
    assert d > 100 * TOL


@pytest.mark.parametrize('wrong', ['swapped_factors', 'no_attention_factor', 'qkv_transposed_halves',
                                   'gate_up_halves_swapped'])
@pytest.mark.parametrize('T', [20, 48])
def test_phi3_negative_controls(wrong, T):
    hf = random_hf_model(Phi3ForCausalLM, phi3_hf_config())
    cfg, sd = hf.config.to_dict(), dict(hf.state_dict())
    ids, _ = batch(T, [T])
    assert compare(_loaded(cfg, sd), hf, ids) <= TOL
    rope = dict(cfg['rope_parameters'])
    if wrong == 'swapped_factors':
        rope['short_factor'], rope['long_factor'] = rope['long_factor'], rope['short_factor']
        cfg = {**cfg, 'rope_parameters': rope}
    elif wrong == 'no_attention_factor':
        cfg = {**cfg, 'rope_parameters': {**rope, 'attention_factor': 1.0}}
    elif wrong == 'qkv_transposed_halves':  # k and v blocks of the fused projection exchanged
        for i in range(2):
            w = sd[f'model.layers.{i}.self_attn.qkv_proj.weight']
            q, k, v = w.split([64, 32, 32])
            sd[f'model.layers.{i}.self_attn.qkv_proj.weight'] = torch.cat([q, v, k])
    elif wrong == 'gate_up_halves_swapped':
        for i in range(2):
            gate, up = sd[f'model.layers.{i}.mlp.gate_up_proj.weight'].chunk(2)
            sd[f'model.layers.{i}.mlp.gate_up_proj.weight'] = torch.cat([up, gate])
    d = compare(_loaded(cfg, sd), hf, ids)
    print(f'phi3 negative control {wrong} T={T}: max abs diff {d:.2e}')
    assert d > 100 * TOL


# ---- loading and saving --------------------------------------------------------------------------

@pytest.mark.parametrize('family', ['llama', 'phi3'])
def test_hf_state_dict_round_trip(family):
    hf = (random_hf_model(LlamaForCausalLM, llama_hf_config()) if family == 'llama'
          else random_hf_model(Phi3ForCausalLM, phi3_hf_config()))
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    theirs, back = hf.state_dict(), ours.hf_state_dict()
    assert set(back) == set(theirs)  # the family's own layout: Llama separate, Phi-3 fused
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_tied_state_dict_omits_lm_head():
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config(tie_word_embeddings=True))
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    assert 'lm_head.weight' not in ours.hf_state_dict()


def test_strict_loading_names_every_problem():
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config())
    sd = dict(hf.state_dict())
    del sd['model.layers.0.self_attn.k_proj.weight']
    sd['model.layers.0.self_attn.extra.weight'] = torch.zeros(3)
    sd['model.norm.weight'] = torch.ones(5)
    with pytest.raises(CheckpointError) as e:
        _loaded(hf.config.to_dict(), sd)
    msg = str(e.value)
    assert 'model.layers.0.self_attn.k_proj.weight' in msg and 'extra.weight' in msg and 'model.norm.weight' in msg


def test_from_pretrained_dtype_and_config_vocab(tmp_path):
    # Florence-VL 8B adds a pad token: the config's vocab size (not the base model's) decides the shapes
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config(vocab_size=VOCAB + 1))
    folder = saved(hf, tmp_path)
    (folder / 'generation_config.json').write_text(json.dumps({'eos_token_id': [5, 7]}))
    ours = LLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.shape == (VOCAB + 1, 72) and ours.lm_head.weight.dtype == torch.bfloat16
    assert ours.rotary.freqs['short'].dtype == torch.float32  # rope stays fp32 in a bf16 model
    assert set(ours.cfg.eos_token_ids) == {5, 7}
    assert all(not p.is_meta for p in ours.parameters())


def test_presets_have_released_parameter_counts():
    llama = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                        rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=8192))
    preset = LLMConfig.from_name('phi3.5-mini')
    phi = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
                     pad_token_id=32000, sliding_window=262144,
                     rope_scaling=dict(type='longrope', short_factor=list(preset.short_factor),
                                       long_factor=list(preset.long_factor)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights count once)
    for name, cls, hf_cfg, released in [('llama3.1-8b', LlamaForCausalLM, llama, 8_030_261_248),
                                        ('phi3.5-mini', Phi3ForCausalLM, phi, 3_821_079_552)]:
        with torch.device('meta'):
            ours, theirs = LLM(LLMConfig.from_name(name)), cls(hf_cfg)
        assert count(ours) == count(theirs) == released, name
        # the preset is what from_hf_config reads from the released config
        parsed = LLMConfig.from_hf_config(hf_cfg.to_dict())
        assert {**vars(parsed), 'name': name} == {**vars(LLMConfig.from_name(name)), 'eos_token_ids': parsed.eos_token_ids}
    assert LLMConfig.from_name('phi3.5-mini').attention_factor == pytest.approx(1.1902, abs=1e-4)


# ---- KV cache and generation ---------------------------------------------------------------------

@pytest.mark.parametrize('family', ['llama', 'phi3'])
def test_kv_cache_logits_match_full_forward(family):
    hf = (random_hf_model(LlamaForCausalLM, llama_hf_config()) if family == 'llama'
          else random_hf_model(Phi3ForCausalLM, phi3_hf_config()))
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    ids, _ = batch(28, [28, 28])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # sample 1 left-padded
    mask[0, 20:] = 0  # sample 0 right-padded in the middle of the stream: padding on both sides
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(ours.cfg, 2, 28)
        chunks = [ours(ids[:, :10], attention_mask=mask[:, :10], cache=cache),     # prefill
                  ours(ids[:, 10:15], attention_mask=mask[:, 10:15], cache=cache)]  # a second chunk
        chunks += [ours(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache) for t in range(15, 28)]
    d = real_diff(torch.cat(chunks, 1), full, mask)
    # transformers' own cached path differs from its full forward by the same fp32 kernel noise
    # (~2e-5 on logits of magnitude ~8); ours matches its cached logits too
    with torch.no_grad():
        ref = hf(ids[:1, :10], use_cache=True)
        cached_hf, pkv = [ref.logits], ref.past_key_values
        cache = KVCache(ours.cfg, 1, 28)
        cached_ours = [ours(ids[:1, :10], cache=cache)]
        for t in range(10, 28):
            cached_hf.append(hf(ids[:1, t:t + 1], past_key_values=pkv, use_cache=True).logits)
            cached_ours.append(ours(ids[:1, t:t + 1], cache=cache))
    d_hf = max_diff(torch.cat(cached_ours, 1), torch.cat(cached_hf, 1))
    print(f'{family}: kv-cache vs full forward max abs diff {d:.2e}; vs transformers cached {d_hf:.2e}')
    assert d <= TOL and d_hf <= TOL


@pytest.mark.parametrize('family', ['llama', 'phi3'])
def test_decode_step_matches_the_forward_step_and_transformers(family):
    """decode_step (fixed shapes: every cache slot read under the valid mask, the slot index a tensor) gives
    the logits of forward's one-token step, and transformers' cached ones; a left-padded prompt too."""
    hf = (random_hf_model(LlamaForCausalLM, llama_hf_config()) if family == 'llama'
          else random_hf_model(Phi3ForCausalLM, phi3_hf_config()))
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    ids, _ = batch(20, [20, 20])
    mask = torch.ones_like(ids[:, :10])
    mask[1, :4] = 0
    with torch.no_grad():
        a, b = KVCache(ours.cfg, 2, 20), KVCache(ours.cfg, 2, 20)
        ours(ids[:, :10], attention_mask=mask, cache=a)
        ours(ids[:, :10], attention_mask=mask, cache=b)
        stepped = [ours.decode_step(ids[:, t], a) for t in range(10, 20)]
        forward = [ours(ids[:, t:t + 1], cache=b)[:, -1] for t in range(10, 20)]
        ref = hf(ids[:1, :10], use_cache=True)
        pkv, theirs = ref.past_key_values, []
        for t in range(10, 20):
            theirs.append(hf(ids[:1, t:t + 1], past_key_values=pkv, use_cache=True).logits[:, -1])
    d = max_diff(torch.stack(stepped), torch.stack(forward))
    d_hf = max_diff(torch.stack(stepped)[:, :1], torch.stack(theirs))
    print(f'{family}: decode_step vs forward step {d:.2e}, vs transformers cached {d_hf:.2e}')
    assert d <= 1e-5 and d_hf <= TOL


def test_a_bf16_model_on_a_cpu_without_native_bf16_caches_and_attends_in_fp32(monkeypatch):
    """model.cache_dtype: fp32 for a bf16 / fp16 model on a CPU without native bf16 (there bf16 attention is
    ~5x slower than fp32), the model's own dtype elsewhere; generate builds its cache with it. The fp32 cache
    holds the bf16 keys exactly (layer 0's, which no attention precedes, equal a bf16 cache's bit for bit), and
    the logits stay as close to the fp32 model's as a bf16 cache's are (control: the bf16 cache's error)."""
    import generate as G
    import model as M
    monkeypatch.setattr(M, 'cpu_has_native_bf16', lambda: False)
    assert M.cache_dtype(torch.bfloat16, 'cpu') == M.cache_dtype(torch.float16, 'cpu') == torch.float32
    assert M.cache_dtype(torch.float32, 'cpu') == torch.float32
    assert M.cache_dtype(torch.bfloat16, 'cuda') == torch.bfloat16
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config())
    fp32 = _loaded(hf.config.to_dict(), hf.state_dict())
    bf16 = _loaded(hf.config.to_dict(), hf.state_dict()).to(torch.bfloat16)
    ids, _ = batch(24, [24, 24])
    with torch.no_grad():
        want = fp32(ids)[:, 11:23]  # the prefill's last position, then one per decode step
        got = {}
        for dtype in (torch.float32, torch.bfloat16):
            cache = KVCache(bf16.cfg, 2, 24, dtype=dtype)
            out = [bf16(ids[:, :12], cache=cache)[:, -1:]]
            out += [bf16.decode_step(ids[:, t], cache)[:, None] for t in range(12, 23)]
            got[dtype] = (torch.cat(out, 1).float(), cache.k[0].clone())
    (wide, k_wide), (narrow, k_narrow) = got[torch.float32], got[torch.bfloat16]
    assert k_wide.dtype == torch.float32 and torch.equal(k_wide, k_narrow.float())
    err_wide, err_narrow = max_diff(wide, want), max_diff(narrow, want)
    print(f'bf16 model vs fp32: logits {err_wide:.3f} with an fp32 cache, {err_narrow:.3f} with a bf16 one '
          f'(scale {want.abs().max():.1f})')
    assert err_wide <= 1.5 * err_narrow and err_wide <= 0.05 * want.abs().max()
    made = []
    monkeypatch.setattr(G, 'KVCache', lambda *a, dtype, **k: made.append(dtype) or KVCache(*a, dtype=dtype, **k))
    generate(bf16, ids[:, :8], max_new_tokens=2)
    monkeypatch.setattr(M, 'cpu_has_native_bf16', lambda: True)
    generate(bf16, ids[:, :8], max_new_tokens=2)
    assert made == [torch.float32, torch.bfloat16]


def test_generation_reads_the_device_only_every_few_steps(monkeypatch):
    """The decode loop's host reads (what makes a GPU wait: .item, .tolist, bool(), int()) are one after the
    prefill and one per CHECK_EVERY steps, not several per token; the steps themselves have none."""
    import generate as G
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config())
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    ids, mask, _, _ = _prompts([12, 5])
    expected = generate(ours, ids, attention_mask=mask, max_new_tokens=32, stop_ids=())
    reads = []
    for name in ('item', 'tolist', '__bool__', '__int__'):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    prefill_reads = []
    forward = LLM.forward

    def forward_counted(self, *a, **k):  # the prefill's own reads (its masks) are counted apart
        before = len(reads)
        out = forward(self, *a, **k)
        prefill_reads.append(len(reads) - before)
        return out
    monkeypatch.setattr(LLM, 'forward', forward_counted)
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=32, stop_ids=()) == expected
    loop = len(reads) - sum(prefill_reads)
    print(f'host reads: {sum(prefill_reads)} in the prefill, {loop} in 32 decode steps')
    assert len(prefill_reads) == 1 and loop <= 1 + 32 // G.CHECK_EVERY + 2  # + the final transfer of tokens


def _prompts(lengths, seed=3):
    """Right-padded prompts for us and the same prompts left-padded for transformers."""
    ids, mask = batch(max(lengths), lengths, seed)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        left_ids[b, -n:], left_mask[b, -n:] = ids[b, :n], 1
    return ids, mask, left_ids, left_mask


def hf_generate(hf, ids, mask, n, eos=None) -> list[list[int]]:
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)[:, ids.shape[1]:].tolist()
    return [row[:row.index(eos)] if eos in row else row for row in out]


def test_greedy_generation_matches_transformers_batched():
    hf = random_hf_model(LlamaForCausalLM, llama_hf_config())
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    ids, mask, left_ids, left_mask = _prompts([12, 5, 9])
    theirs = hf_generate(hf, left_ids, left_mask, 40)
    assert all(len(set(r)) >= 15 for r in theirs)  # not a degenerate repetition
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=40, stop_ids=()) == theirs        # right padded
    assert generate(ours, left_ids, attention_mask=left_mask, max_new_tokens=40, stop_ids=()) == theirs  # left padded
    # generation from embeddings (how Florence-VL feeds image tokens) gives the same tokens
    embeds = ours.embed_tokens(ids).detach()
    assert generate(ours, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=40, stop_ids=()) == theirs
    # stopping: make a token the first sample emits mid-way the eos; both stop there, others go on
    eos = theirs[0][10]
    theirs_eos = hf_generate(hf, left_ids, left_mask, 40, eos)
    streamed = [[] for _ in range(3)]
    mine = generate(ours, ids, attention_mask=mask, max_new_tokens=40, stop_ids=[eos],
                         stream=lambda b, t: streamed[b].append(t))
    assert mine == theirs_eos == streamed and len(mine[0]) <= 10


def test_longrope_generation_crossing_original_context_matches_transformers():
    """Prompt of 20, 32 new tokens: the sequence crosses the original context (32) mid-way, where the
    cached keys must be recomputed with the long factors, as transformers does."""
    hf = random_hf_model(Phi3ForCausalLM, phi3_hf_config())
    ours = _loaded(hf.config.to_dict(), hf.state_dict())
    ids, mask, _, _ = _prompts([20])
    theirs = hf_generate(hf, ids, mask, 32)
    assert len(set(theirs[0])) >= 12
    assert generate(ours, ids, max_new_tokens=32, stop_ids=()) == theirs


def test_vocab_limit_keeps_generation_to_the_tokenizers_ids():
    """Rows past the tokenizer's vocabulary (Phi-3.5's 32011-32063) are never chosen with vocab_limit; without
    it (negative control) this model picks such ids."""
    torch.manual_seed(0)
    llm, limit = LLM(LLMConfig(vocab_size=VOCAB, n_layers=1)).eval(), VOCAB // 2
    with torch.no_grad():
        llm.lm_head.weight[limit:] *= 8  # make the rows past the limit win often
    ids, mask, _, _ = _prompts([6, 9])
    free = generate(llm, ids, attention_mask=mask, max_new_tokens=20, stop_ids=())
    limited = generate(llm, ids, attention_mask=mask, max_new_tokens=20, stop_ids=(), vocab_limit=limit)
    assert any(t >= limit for row in free for t in row)
    assert all(t < limit for row in limited for t in row) and all(len(row) == 20 for row in limited)


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))  # nucleus of one
    a = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    b = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # top-p never picks a token outside the nucleus
    flat = logits[:1] / 3
    p, idx = torch.softmax(flat[0], -1).sort(descending=True)
    nucleus = set(idx[:int((p.cumsum(0) < 0.5).sum()) + 1].tolist())  # smallest set reaching 0.5
    draws = {int(sample(flat, 1.0, 0.5, g)) for _ in range(300)}
    assert draws == nucleus and len(nucleus) > 3


# ---- tokenizer and chat templates ----------------------------------------------------------------

MESSAGES = [{'role': 'user', 'content': '<image>\nWhat is shown?'}, {'role': 'assistant', 'content': 'A cat.'},
            {'role': 'user', 'content': 'What color?'}, {'role': 'assistant', 'content': 'Black.'}]
LLAMA3_CHAT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and "
               "an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to "
               "the user's questions.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat color?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>")
PHI3_CHAT = ("<|system|>\nYou are a helpful AI assistant.<|end|>"
             "\n<|user|>\n<image>\nWhat is shown?<|end|>\n<|assistant|>\nA cat.<|end|>"
             "\n<|user|>\nWhat color?<|end|>\n<|assistant|>\nBlack.<|end|>")


def test_chat_templates_render_exactly():
    assert render_chat('llama3', MESSAGES, add_generation_prompt=False) == LLAMA3_CHAT
    assert render_chat(TEMPLATES['phi3'], MESSAGES, add_generation_prompt=False) == PHI3_CHAT
    assert render_chat('llama3', MESSAGES[:3]) == LLAMA3_CHAT[:LLAMA3_CHAT.index('Black.')]
    assert render_chat('phi3', MESSAGES[:3]) == PHI3_CHAT[:PHI3_CHAT.index('Black.')]


SPECIALS = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']


@pytest.fixture(scope='module')
def bpe_tokenizer(tmp_path_factory):
    """A small byte-level BPE with the Llama-3 special tokens, saved as tokenizer.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([LLAMA3_CHAT.replace('<|', ' ').replace('|>', ' '), 'naïve café 日本語 ✓'] * 5, trainer)
    path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
    tok.save(str(path))
    return Tokenizer(path)


def test_encoded_llama3_chat_has_special_token_ids(bpe_tokenizer):
    ids = bpe_tokenizer.encode(LLAMA3_CHAT)
    special = {bpe_tokenizer.token_to_id(t): t for t in SPECIALS}
    assert ids[0] == bpe_tokenizer.token_to_id('<|begin_of_text|>')
    rendered_specials = [special[i] for i in ids if i in special]
    assert rendered_specials == ['<|begin_of_text|>'] + ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'] * 5
    assert bpe_tokenizer.decode(ids) == LLAMA3_CHAT
    assert bpe_tokenizer.end_ids == [bpe_tokenizer.token_to_id('<|eot_id|>')]


def test_stream_decoder_reassembles_multibyte_text(bpe_tokenizer):
    text = 'naïve café 日本語 ✓ done'
    ids = bpe_tokenizer.encode(text)
    decoder = bpe_tokenizer.stream()
    pieces = [decoder.put(i) for i in ids] + [decoder.flush()]
    assert ''.join(pieces) == text and all('\ufffd' not in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 3  # it really streams


def test_stream_text_yields_the_generated_reply(bpe_tokenizer):
    cfg = LLMConfig.from_name('tiny', vocab_size=bpe_tokenizer.vocab_size)
    torch.manual_seed(0)
    llm = LLM(cfg).eval()
    prompt = bpe_tokenizer.encode(render_chat('llama3', MESSAGES[:1]))
    ids = generate(llm, torch.tensor([prompt]), max_new_tokens=12, stop_ids=bpe_tokenizer.end_ids)[0]
    text = ''.join(stream_text(llm, bpe_tokenizer, prompt, max_new_tokens=12))
    assert text == bpe_tokenizer.decode(ids, skip_special_tokens=True) and isinstance(StreamDecoder(bpe_tokenizer), StreamDecoder)
    assert generate(llm, torch.tensor([prompt]), max_new_tokens=12, stop_ids=bpe_tokenizer.end_ids)[0] == ids
