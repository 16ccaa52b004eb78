"""The language model of Florence-VL: the Llama-3.1 / Phi-3.5 decoder.

One decoder-only Transformer serves both families (Florence-VL 8B reads Llama-3.1-8B-Instruct, 3B reads
Phi-3.5-mini-instruct): pre-RMSNorm blocks, rotary embeddings (plain, Llama-3 scaled, or Phi-3
LongRoPE), grouped-query attention through F.scaled_dot_product_attention, SwiGLU MLP.

Internally the projections are fused (qkv_proj, gate_up_proj; one matmul instead of three / two), as
in Phi-3 checkpoints; Llama checkpoints are concatenated on load and split again on save.

Generation (KV-cache prefill + decode, sampling, streaming) lives in generate.py, the tokenizer and
chat templates in tokenizer.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import (StoredTensor, check_state_dict, cpu_has_native_bf16, read_config, release_freed_memory, resolve, stream_tensors,
                        weight_files)
from quantize import int8_linear_names, quantize_weight, set_int8_linear_

# Phi-3.5-mini-instruct LongRoPE rescale factors, one per rotary frequency (48 = head_dim 96 / 2).
# Written as the shortest decimals that give the released float32 values bit for bit.
PHI35_SHORT_FACTOR = (
    1.0, 1.02, 1.03, 1.03, 1.05, 1.05, 1.05, 1.05, 1.05, 1.0699999, 1.0999999, 1.1099999,
    1.1599998, 1.1599998, 1.1699998, 1.2899998, 1.3399998, 1.6799998, 1.7899998, 1.8199998, 1.8499998,
    1.8799998, 1.9099997, 1.9399997, 1.9899997, 2.0199997, 2.0199997, 2.0199997, 2.0199997, 2.0199997,
    2.0199997, 2.0299997, 2.0299997, 2.0299997, 2.0299997, 2.0299997, 2.0299997, 2.0299997, 2.0299997,
    2.0299997, 2.0799997, 2.0899997, 2.1899996, 2.2199996, 2.5899994, 2.7299995, 2.7499995, 2.8399994)
PHI35_LONG_FACTOR = (
    1.08, 1.11, 1.14, 1.34, 1.5899999, 1.6, 1.62, 2.6200001, 3.23, 3.23, 4.79, 7.4, 7.7000003, 9.09,
    12.2, 17.67, 24.460001, 28.570002, 30.420002, 30.840002, 32.590004, 32.930004, 42.320004, 44.960003,
    50.340004, 50.450005, 57.550003, 57.930004, 58.210003, 60.140003, 62.610004, 62.620003, 62.710003,
    63.140003, 63.140003, 63.770004, 63.930004, 63.960003, 63.97, 64.03, 64.07, 64.08, 64.12, 64.41,
    64.48, 64.51, 64.53, 64.84)


@dataclass
class LLMConfig:
    name: str = 'tiny'
    family: str = 'llama'              # 'llama' | 'phi3': only decides the checkpoint layout
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 160
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2                # < n_heads: grouped-query attention
    head_dim: int | None = None        # None: hidden_size // n_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # rotary embeddings
    rope_theta: float = 10000.0
    rope_type: str = 'default'         # 'default' | 'llama3' | 'longrope'
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    original_max_position_embeddings: int | None = None  # llama3 and longrope: the pretraining context
    rope_factor: float | None = None   # llama3: frequency divisor; longrope: None -> max / original
    low_freq_factor: float = 1.0       # llama3
    high_freq_factor: float = 4.0      # llama3
    short_factor: tuple = ()           # longrope: per-frequency factors within the original context
    long_factor: tuple = ()            # longrope: ... beyond it
    attention_factor: float | None = None  # longrope: scale on cos/sin; None -> from rope_factor
    # special tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()          # generation stops on any of these
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f'n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}')
        if self.rope_type not in ('default', 'llama3', 'longrope'):
            raise ValueError(f'unsupported rope_type {self.rope_type!r}')
        if self.rope_type == 'longrope':
            if self.rope_factor is None:  # Phi-3 states the extension as a ratio of context lengths
                self.rope_factor = self.max_position_embeddings / self.original_max_position_embeddings
            if self.attention_factor is None:  # LongRoPE paper: sqrt(1 + ln s / ln L_original)
                self.attention_factor = 1.0 if self.rope_factor <= 1.0 else math.sqrt(
                    1 + math.log(self.rope_factor) / math.log(self.original_max_position_embeddings))
        self.short_factor, self.long_factor = tuple(self.short_factor), tuple(self.long_factor)
        self.eos_token_ids = tuple(self.eos_token_ids)

    @classmethod
    def from_name(cls, name: str, **overrides) -> LLMConfig:
        if name not in PRESETS:
            raise ValueError(f'unknown LLM preset {name!r}; known: {sorted(PRESETS)}')
        return cls(**{**PRESETS[name], 'name': name, **overrides})

    @classmethod
    def from_hf_config(cls, d: dict) -> LLMConfig:
        """From a Hugging Face config.json (LlamaForCausalLM, Phi3ForCausalLM, or the LLaVA wrappers
        LlavaLlamaForCausalLM / LlavaPhiForCausalLM of Florence-VL, whose LLM fields are the same)."""
        kind = ' '.join([d.get('model_type', '')] + list(d.get('architectures') or [])).lower()
        family = 'phi3' if 'phi' in kind else 'llama' if 'llama' in kind else None
        if family is None:
            raise ValueError(f"cannot tell the LLM family from model_type/architectures: {kind!r}")
        for flag in ('attention_bias', 'mlp_bias'):
            if d.get(flag):
                raise NotImplementedError(f'{flag}=True is not supported (neither Llama-3.1 nor Phi-3.5 has it)')
        if d.get('hidden_act', 'silu') != 'silu':
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r}: only silu (SwiGLU)")
        max_pos = d.get('max_position_embeddings', 4096 if family == 'phi3' else 2048)
        # Phi-3 releases cap attention with a sliding window wider than the context: a no-op we can skip.
        if family == 'phi3' and d.get('sliding_window') is not None and d['sliding_window'] < max_pos:
            raise NotImplementedError(f"sliding_window {d['sliding_window']} < context {max_pos} is not supported")

        # transformers 5 writes `rope_parameters` (with rope_theta inside); released configs `rope_scaling`.
        rope = dict(d.get('rope_parameters') or d.get('rope_scaling') or {})
        rope_type = rope.get('rope_type', rope.get('type', 'default'))
        if family == 'phi3' and rope_type in ('su', 'yarn'):  # older names of Phi-3's LongRoPE
            rope_type = 'longrope'
        if family == 'phi3':  # Phi-3 keeps the pretraining length at the top level (4096 if absent)
            original = d.get('original_max_position_embeddings', 4096)
        else:
            original = rope.get('original_max_position_embeddings', max_pos)
        eos = d.get('eos_token_id')
        n_heads = d['num_attention_heads']
        return cls(
            name=d.get('_name_or_path') or family, family=family,
            vocab_size=d['vocab_size'], hidden_size=d['hidden_size'], intermediate_size=d['intermediate_size'],
            n_layers=d['num_hidden_layers'], n_heads=n_heads,
            n_kv_heads=d.get('num_key_value_heads') or n_heads, head_dim=d.get('head_dim'),
            rms_norm_eps=d.get('rms_norm_eps', 1e-5 if family == 'phi3' else 1e-6),
            max_position_embeddings=max_pos, tie_word_embeddings=d.get('tie_word_embeddings', False),
            rope_theta=rope.get('rope_theta', d.get('rope_theta', 10000.0)), rope_type=rope_type,
            partial_rotary_factor=rope.get('partial_rotary_factor', d.get('partial_rotary_factor', 1.0)),
            original_max_position_embeddings=original if rope_type != 'default' else None,
            rope_factor=rope.get('factor'),
            low_freq_factor=rope.get('low_freq_factor', 1.0), high_freq_factor=rope.get('high_freq_factor', 4.0),
            short_factor=rope.get('short_factor', ()), long_factor=rope.get('long_factor', ()),
            attention_factor=rope.get('attention_factor'),
            bos_token_id=d.get('bos_token_id'), pad_token_id=d.get('pad_token_id'),
            eos_token_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
        )


PRESETS = {
    'tiny': dict(family='llama'),  # the dataclass defaults: 2 layers, 64 wide, for tests and the demo
    'tiny-phi3': dict(family='phi3'),  # the same in Phi-3's checkpoint layout (the tiny Florence-VL's LLM)
    'llama3.1-8b': dict(  # meta-llama/Llama-3.1-8B-Instruct
        family='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32,
        n_heads=32, n_kv_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, rope_type='llama3', original_max_position_embeddings=8192, rope_factor=8.0,
        low_freq_factor=1.0, high_freq_factor=4.0,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),  # end_of_text, eom, eot
    'phi3.5-mini': dict(  # microsoft/Phi-3.5-mini-instruct
        family='phi3', vocab_size=32064, hidden_size=3072, intermediate_size=8192, n_layers=32,
        n_heads=32, n_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=10000.0, rope_type='longrope', original_max_position_embeddings=4096,
        short_factor=PHI35_SHORT_FACTOR, long_factor=PHI35_LONG_FACTOR,
        bos_token_id=1, pad_token_id=32000, eos_token_ids=(32000, 32001, 32007)),  # endoftext, assistant, end
}


# ----------------------------------------------------------------------------------------------
# Rotary embeddings

def rope_inv_freq(cfg: LLMConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim / 2,), fp32, computed on the CPU in the same order of float
    operations as transformers, so cos/sin match bit for bit."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device='cpu').float() / dim
    if cfg.rope_type == 'longrope':  # LongRoPE: each frequency stretched by its own searched factor
        factors = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float32, device='cpu')
        return 1.0 / (factors * cfg.rope_theta ** exponent)
    inv_freq = 1.0 / (cfg.rope_theta ** exponent)
    if cfg.rope_type == 'llama3':
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are slowed by
        # `factor`, shorter than original / high_freq_factor kept, and the band between interpolated.
        factor, low, high = cfg.rope_factor, cfg.low_freq_factor, cfg.high_freq_factor
        old = cfg.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        between = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(medium, between, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin for given positions. The frequencies are plain tensors, not buffers: they must stay
    fp32 when the model is cast to bf16, and exist when the model is built on the meta device."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.freqs = {'short': rope_inv_freq(cfg)}
        if cfg.rope_type == 'longrope':
            self.freqs['long'] = rope_inv_freq(cfg, long=True)
        self.scale = cfg.attention_factor if cfg.rope_type == 'longrope' else 1.0
        self._on_device = {}

    def use_long(self, position_ids: torch.Tensor) -> bool:
        """LongRoPE picks one factor set per forward call, as transformers does: long factors when the
        largest position in the call lies beyond the original context."""
        return (self.cfg.rope_type == 'longrope'
                and int(position_ids.max()) + 1 > self.cfg.original_max_position_embeddings)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype, long: bool = False):
        which = 'long' if long else 'short'
        key = (which, position_ids.device)
        if key not in self._on_device:
            self._on_device[key] = self.freqs[which].to(position_ids.device)
        freqs = position_ids[..., None].float() * self._on_device[key]  # (B, T, rot/2)
        angles = torch.cat([freqs, freqs], dim=-1)                       # (B, T, rot)
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim); cos/sin (B, T, rot). Rotates the first `rot` dims in the
    half-split convention (pairs i and i + rot/2), which is how HF Llama/Phi-3 weights are laid out."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]  # partial rotary: the rest passes unrotated
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat([x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin, x_pass], dim=-1)


# ----------------------------------------------------------------------------------------------
# The decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalize in fp32 (bf16 sums of squares lose precision), scale in the model dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # rows: [q (n_heads * hd) | k (n_kv * hd) | v (n_kv * hd)], the Phi-3 layout
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0, start=0):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hd)
        qk = apply_rotary(qkv[:, :nh + nkv], cos, sin)  # q and k heads rotated in one go
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]  # (B, nh, T, hd), (B, nkv, T, hd) x2
        if cache is not None:
            k, v = cache.update(layer, start, k, v)                       # (B, nkv, start + T, hd)
        # a cache wider than the model (cache_dtype: fp32 for bf16 on a CPU without native bf16) holds the
        # same values exactly; attention then runs in its dtype and only the output is rounded back
        q = q.to(k.dtype)
        # enable_gqa lets each group of n_heads / n_kv_heads query heads read one k/v head, no copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul ([gate | up] rows, Phi-3 layout)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def cache_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype (and attention's) for a model computing in dtype on device: its own, except bf16 /
    fp16 on a CPU without native bf16 (checkpoint.cpu_has_native_bf16), where it is fp32. There ATen runs bf16
    attention through fp32 conversions in small blocks: one decode step's SDPA over 633 cached tokens of
    Phi-3.5-mini's shape took 2.1-2.9 ms per layer in bf16 and 0.4 ms in fp32 (2 AVX2-only vCPUs), 116 ms of a
    570 ms int8 decode step at 3B. The values cached are the model's, exactly; the cost is twice the bytes
    (0.5 instead of 0.25 GB for Phi-3.5-mini at 633 tokens)."""
    if torch.device(device).type == 'cpu' and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return torch.float32
    return dtype


class KVCache(nn.Module):
    """Preallocated keys/values for generation (gpt-fast style): one buffer for all layers, written in
    place, so decoding allocates nothing per step.

    Tokens occupy *slots* 0, 1, 2, ... in the order they were fed, the same slot for every sample;
    `valid` marks the slots holding real tokens (padding of any side is just invalid slots), and
    `next_pos` holds each sample's next rotary position, so positions stay per sample."""

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('valid', torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.register_buffer('next_pos', torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        # the next slot as a tensor, for LLM.decode_step: its writes are then the same kernels every step
        self.register_buffer('slot', torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.length = 0         # slots filled so far by forward (the prefill)
        self.padded = False     # some slot so far is padding: attention needs an explicit mask
        self.long_rope = False  # the cached keys were rotated with LongRoPE's long factors

    def reset(self):
        self.valid.zero_()
        self.next_pos.zero_()
        self.slot.zero_()
        self.length, self.padded, self.long_rope = 0, False, False

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        """Write this call's keys / values from slot `start` on; return every slot the queries may read:
        up to the last one written (forward), or, for a tensor `start` (decode_step), all of them."""
        if torch.is_tensor(start):
            self.k[layer].index_copy_(2, start, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, start, v.to(self.v.dtype))
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.grad_checkpointing = False  # recompute each block in backward (training memory)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or with return_hidden the final normed hidden states (B, T, H) so a
        caller can apply lm_head to the positions it needs.

        attention_mask (B, T): 1 for real tokens, 0 for padding on either side. Rotary positions count
        real tokens only (cumsum of the mask), so a padded sample computes what it would alone. With a
        cache, the mask and positions cover this call's tokens; earlier ones are in the cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError('give exactly one of input_ids and inputs_embeds')
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T = x.shape[:2]
        start = 0 if cache is None else cache.length
        if cache is not None and start + T > cache.k.shape[3]:
            raise ValueError(f'KV cache holds {cache.k.shape[3]} slots; {start} used, {T} more requested')
        valid = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, T)
        if position_ids is None:
            offset = 0 if cache is None else cache.next_pos[:, None]
            if valid is None:
                position_ids = offset + torch.arange(T, device=x.device)[None]
            else:  # pads before a sample's first token get position 0: they attend to nothing real
                position_ids = offset + (valid.long().cumsum(1) - 1).clamp(min=0)
        long = self.rotary.use_long(position_ids)
        cos, sin = self.rotary(position_ids, x.dtype, long)  # (B or 1, T, rotary_dim)
        mask, is_causal = self._attention_mask(valid, B, T, start, cache, x.device)
        for i, block in enumerate(self.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, is_causal, cache, i, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, cache, i, start)
        if cache is not None:
            cache.length = start + T
            cache.slot.fill_(start + T)
            cache.next_pos.add_(T if valid is None else valid.sum(1))
            cache.long_rope = long
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sample, after a prefill (forward with the cache): token (B,) -> logits (B, vocab).

        Fixed shapes and no host sync: the keys and values go to slot cache.slot (a tensor), every query
        reads all cache slots under cache.valid, the rotary factors are the ones the cache was filled with
        (cache.long_rope). So one compiled graph serves every step (torch.compile; CUDA graphs with
        mode='reduce-overhead'). The same arithmetic as forward's one-token step: masked slots weigh 0."""
        x = self.embed_tokens(token[:, None])                        # (B, 1, H)
        cos, sin = self.rotary(cache.next_pos[:, None], x.dtype, cache.long_rope)
        cache.valid.index_fill_(1, cache.slot, True)
        mask = cache.valid[:, None, None, :]                         # (B, 1, 1, slots)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, False, cache, i, cache.slot)
        cache.next_pos.add_(1)
        cache.slot.add_(1)
        return self.lm_head(self.norm(x))[:, -1]

    @staticmethod
    def _attention_mask(valid, B, T, start, cache, device):
        """(attn_mask, is_causal) for SDPA. Queries sit in slots start..start+T-1, keys in 0..start+T-1.
        Fast paths without a mask: a first chunk that is unpadded or only right-padded (causal attention
        never looks ahead, so trailing pads cannot reach real tokens: the training case), and one new
        token when no slot so far is padding (the decode step)."""
        has_pad = valid is not None and not bool(valid.all())
        right_padded = has_pad and bool((valid[:, 1:] <= valid[:, :-1]).all())  # 1s then 0s per row
        if cache is not None:
            cache.valid[:, start:start + T] = True if valid is None else valid
            cache.padded = cache.padded or has_pad
            padded, key_valid = cache.padded, cache.valid[:, :start + T]
        else:
            padded, key_valid = has_pad, valid
        if start == 0 and (not has_pad or right_padded):
            return None, T > 1
        if not padded and T == 1:
            return None, False
        q_slot = torch.arange(start, start + T, device=device)[:, None]
        k_slot = torch.arange(start + T, device=device)[None, :]
        allowed = (k_slot <= q_slot).expand(B, T, start + T)                   # causal, (B, T, S)
        if padded:
            # a padding query also sees itself, so no row is empty (an all-masked row gives NaN)
            allowed = allowed & key_valid[:, None, :] | (k_slot == q_slot)
        return allowed[:, None], False                                         # (B, 1, T, S)

    # ---- checkpoints in Hugging Face layout ---------------------------------------------------
    def hf_state_dict(self, ours: dict | None = None) -> dict[str, torch.Tensor]:
        """Our weights under HF names, in the family's own layout (Llama: separate q/k/v and gate/up;
        Phi-3: fused). Views, no copies. A tied lm_head is left out, as transformers saves it.
        ours: our-named tensors to convert instead of this module's own (e.g. gathered FSDP shards)."""
        ours = dict(self.named_parameters()) if ours is None else ours
        out = {}
        for name, parts in hf_layout(self.cfg).items():
            t = ours[name].detach()
            if len(parts) == 1:
                out[parts[0][0]] = t
            else:
                out.update(zip([hf for hf, _ in parts], t.split([rows for _, rows in parts])))
        return out

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], what: str = 'LLM state dict'):
        """Load HF-named weights (either family layout), strictly: every key used, every key present."""
        self.load_hf_shards([dict(sd)], what)  # a shallow copy: loading pops its items
        return self

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype: torch.dtype | None = None, quantize: str | None = None) -> LLM:
        """A Hugging Face folder or hub id: config.json + (sharded) safetensors. Built on the meta device
        and filled shard by shard, each tensor becoming the parameter itself: peak memory is the model
        plus one shard. dtype None: the checkpoint's dtype as config.json states it."""
        folder = resolve(path_or_repo_id, allow_patterns=['*.json', '*.safetensors'])
        hf = read_config(folder)
        cfg = add_generation_eos(LLMConfig.from_hf_config(hf), folder)
        if dtype is None:
            dtype = stored_dtype(hf)
        with torch.device('meta'):
            model = cls(cfg)
        tensors = stream_tensors(weight_files(folder), lazy=lambda name: quantize is not None)
        model.load_hf_shards(({k: t} for k, t in tensors), f'checkpoint {folder}', dtype, quantize)
        return model.eval()

    def load_hf_shards(self, shards, what: str = 'LLM checkpoint', dtype: torch.dtype | None = None,
                       quantize: str | None = None):
        """Load an iterable of HF-named state dicts (shards; each is emptied as it is read), strictly
        over all of them together. On a meta-built model each tensor becomes the parameter (cast to
        dtype), so shards can be streamed with one in memory at a time. quantize='int8': each Linear
        becomes an int8 Linear the moment its weight is complete (quantize.py), so the float model is
        never held."""
        layout = hf_layout(self.cfg)
        params = dict(self.named_parameters())  # the shapes, taken before any Linear is replaced
        int8 = set()
        if quantize == 'int8':
            int8 = {f'{n}.weight' for n in int8_linear_names(self)}
        elif quantize is not None:
            raise ValueError(f'unknown quantization {quantize!r}: int8 or None')
        where, expected = {}, {}  # HF name -> (our name, part index); HF name -> shape
        for name, parts in layout.items():
            for j, (hf, rows) in enumerate(parts):
                where[hf] = (name, j)
                expected[hf] = (rows if rows is not None else params[name].shape[0], *params[name].shape[1:])
        got, pending = {}, {}
        for sd in shards:
            while sd:  # pop as we go: tensors merged into a fused weight are freed right away
                hf, t = sd.popitem()
                if hf.endswith('rotary_emb.inv_freq'):
                    continue  # old checkpoints store the rope table; ours comes from the config
                if self.cfg.tie_word_embeddings and hf == 'lm_head.weight':
                    continue  # some tied checkpoints also store the copy; the embedding is the weight
                got[hf] = tuple(t.shape)
                if hf not in where or got[hf] != tuple(expected[hf]):
                    continue  # reported all together by check_state_dict below
                name, j = where[hf]
                if name in int8:  # rows quantize independently: each part (q, k, v) on arrival, block by block
                    t = quantize_weight(t, dtype or t.dtype)
                elif isinstance(t, StoredTensor):
                    t = t[:]
                pending.setdefault(name, {})[j] = t
                if len(pending[name]) == len(layout[name]):  # all parts seen (they may span shards)
                    parts = pending.pop(name)
                    parts = [parts[i] for i in range(len(layout[name]))]
                    if name in int8:
                        q, scale = (torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts))
                        set_int8_linear_(self, name.removesuffix('.weight'), (q, scale))
                    else:
                        t = torch.cat(parts) if len(parts) > 1 else parts[0]
                        self._set_param(name, t, dtype)
                    converted = name in int8 or len(parts) > 1 or (dtype is not None and parts[0].dtype != dtype)
                    del t, parts
                    if converted:  # a read buffer was freed: give its pages back, or they pile up
                        release_freed_memory()
            del sd  # before the next shard is read, not after
        check_state_dict(expected, got, what)
        if self.cfg.tie_word_embeddings:  # assigning a new embedding Parameter broke the tie
            self.lm_head.weight = self.embed_tokens.weight

    def _set_param(self, name: str, t: torch.Tensor, dtype: torch.dtype | None):
        module_name, _, attr = name.rpartition('.')
        module = self.get_submodule(module_name)
        old = getattr(module, attr)
        if old.is_meta:  # built on meta: the loaded tensor becomes the parameter, no second copy
            setattr(module, attr, nn.Parameter(t.to(dtype or t.dtype), requires_grad=old.requires_grad))
        else:
            with torch.no_grad():
                old.copy_(t)


def add_generation_eos(cfg: LLMConfig, folder) -> LLMConfig:
    """Add the end tokens of folder/generation_config.json (where a release lists all of them) to cfg's."""
    gen = Path(folder) / 'generation_config.json'
    if gen.is_file():
        eos = json.loads(gen.read_text()).get('eos_token_id')
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *eos]))
    return cfg


def stored_dtype(hf: dict) -> torch.dtype:
    """The dtype a config.json says its weights are stored in (fp32 when it does not say)."""
    name = str(hf.get('dtype') or hf.get('torch_dtype') or 'float32')
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f'unknown torch_dtype {name!r} in config.json')
    return dtype


def hf_layout(cfg: LLMConfig) -> dict[str, list[tuple[str, int | None]]]:
    """The key table: our parameter -> the HF tensors it is made of, stacked along dim 0, as
    (HF name, rows) pairs (rows None: the whole tensor). Llama checkpoints keep q/k/v and gate/up
    apart; Phi-3 checkpoints are fused exactly like ours."""
    table = {'embed_tokens.weight': [('model.embed_tokens.weight', None)],
             'norm.weight': [('model.norm.weight', None)]}
    for i in range(cfg.n_layers):
        ours, hf = f'layers.{i}.', f'model.layers.{i}.'
        for n in ('input_layernorm.weight', 'post_attention_layernorm.weight',
                  'self_attn.o_proj.weight', 'mlp.down_proj.weight'):
            table[ours + n] = [(hf + n, None)]
        if cfg.family == 'phi3':
            table[ours + 'self_attn.qkv_proj.weight'] = [(hf + 'self_attn.qkv_proj.weight', None)]
            table[ours + 'mlp.gate_up_proj.weight'] = [(hf + 'mlp.gate_up_proj.weight', None)]
        else:
            q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size
            table[ours + 'self_attn.qkv_proj.weight'] = [
                (hf + 'self_attn.q_proj.weight', q), (hf + 'self_attn.k_proj.weight', kv),
                (hf + 'self_attn.v_proj.weight', kv)]
            table[ours + 'mlp.gate_up_proj.weight'] = [(hf + 'mlp.gate_proj.weight', ff), (hf + 'mlp.up_proj.weight', ff)]
    if not cfg.tie_word_embeddings:
        table['lm_head.weight'] = [('lm_head.weight', None)]
    return table
