"""int8 weight-only quantization of the LLM's Linears: half the bytes of bf16, activations untouched.

Florence-VL-8B's decoder is 16 GB in bf16, too much for a 24 GiB box once the tower, activations
and the KV cache are added; per-output-channel symmetric int8 (one scale per row, gpt-fast's int8
mode) brings its Linears to 1 byte per weight, 8.6 GB in all (tests/test_quantize.py measures the
logit error on a random model).

    summary = quantize_llm_(model.llm)    # in place, on a loaded model (FlorenceVL's or a bare LLM)
    ids = generate(llm, prompt_ids)       # model.py / generate.py work unchanged

Loading straight to int8, never holding the bf16 model: build the LLM on the meta device, and as a
loader assembles each weight named by int8_linear_names(llm) (q/k/v and gate/up concatenated first),
call set_int8_linear_(llm, name, weight, dtype) instead of setting the parameter; the other parameters
(embedding, norms) load as usual. model.LLM.load_hf_shards does this, with each weight still in its file
(checkpoint.StoredTensor): quantize_weight reads it a block of rows at a time, so the peak beyond the
int8 model is one block (4 MB of fp32), never a float weight (lm_head of Llama-3.1-8B: 1 GB in bf16).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Up to how many rows (tokens) torch._weight_int8pack_mm beats dequantize + F.linear, measured on a
# 4096 x 4096 weight (2 AMD EPYC cores with avx512_bf16, torch 2.13 CPU): its bf16 path is vectorized
# (~1.8x faster than bf16 F.linear at 1 row), its fp16 / fp32 paths are scalar loops that lose past 2-3 rows.
KERNEL_MAX_ROWS = {torch.bfloat16: 128, torch.float16: 2, torch.float32: 2}


# quantize_weight works through a weight this many elements at a time (4 MB of fp32), so that loading
# Llama-3.1-8B's lm_head (128257 x 4096) does not need a 2 GB fp32 copy next to the bf16 one
BLOCK_ELEMENTS = 1 << 20


def kernel_fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether the CPU kernel can read x (M, K) and q (N, K) safely. Its vector paths (AVX512 / AVX2 for
    bf16, NEON for all dtypes) step through K 16 (or 8) values at a time with no tail, using aligned
    loads: with K % 16 != 0, or x not 32-byte / q not 16-byte aligned (a view at an offset, an mmapped
    file), it reads out of bounds or faults (segfaults measured on torch 2.13). Checked, not trusted."""
    return x.shape[-1] % 16 == 0 and x.data_ptr() % 32 == 0 and q.data_ptr() % 16 == 0


def quantize_weight(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) of any float dtype -> (q int8 (out, in), scale (out,) in dtype), w ~ q * scale[:, None].
    w may also be a checkpoint.StoredTensor: its rows are then read from the file block by block.

    scale = max|row| / 127, rounded to dtype *before* q is computed, so that |q * scale - w| <= scale / 2
    holds for the scale actually stored (a bf16 scale is off by up to 2^-9). The floor at the dtype's
    smallest normal number keeps an all-zero row (q = 0) and tiny fp16 rows away from 0 and subnormals."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=dtype, device=w.device)
    if w.device.type == "meta":  # shapes only (a model sized on the meta device): no blocks to walk
        return q, scale
    step = max(1, BLOCK_ELEMENTS // max(w.shape[1], 1))  # rows at a time: the fp32 working copy stays small
    for i in range(0, w.shape[0], step):
        block = w[i:i + step].to(torch.float32, copy=True)  # exact for bf16 / fp16
        scale[i:i + step] = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny).to(dtype)
        q[i:i + step] = block.div_(scale[i:i + step].float()[:, None]).round_().clamp_(-127, 127)  # -128 unused
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights: y = (x @ q.T) * scale, computed in x's dtype.

    weight and scale are buffers, not parameters: they appear in state_dict and follow .to(device) (scale
    also .to(dtype), like any float buffer), but an optimizer never sees them (a quantized LLM is frozen)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer('weight', torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer('scale', torch.ones(out_features, dtype=dtype, device=device))
        self.kernel: bool | None = None  # None: choose per call; True / False force a path (tests:
        #                                  forcing True is only safe where kernel_fits holds)

    @classmethod
    def from_weight(cls, w: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize a Linear weight (out, in); dtype: the compute dtype of the scales (default w's)."""
        dtype = dtype or w.dtype
        m = cls(w.shape[1], w.shape[0], dtype, device='meta')  # no throwaway zeros for big weights
        m.weight, m.scale = quantize_weight(w, dtype)
        return m

    def use_kernel(self, x2: torch.Tensor) -> bool:
        if self.kernel is not None:
            return self.kernel
        # CPU only: PyTorch's CUDA version (int8mm.cu) is a plain one-thread-per-output fp32 loop, so there
        # dequantize + cuBLAS (gpt-fast's formula, fused under torch.compile) is the better bet (no GPU here
        # to measure). The kernel has no backward: a frozen LLM may still pass gradients to x.
        return (x2.device.type == 'cpu' and x2.shape[0] <= KERNEL_MAX_ROWS.get(x2.dtype, 0)
                and not (torch.is_grad_enabled() and x2.requires_grad) and kernel_fits(x2, self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        scale = self.scale.to(x.dtype)  # the kernel wants scale in x's dtype (a no-op normally)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel takes 2-D input; a view when x is contiguous
        if self.use_kernel(x2):
            return torch._weight_int8pack_mm(x2, self.weight, scale).view(*x.shape[:-1], self.out_features)
        # int8 -> bf16/fp16/fp32 is exact (|q| <= 127), so this is the float Linear on q, rescaled per row
        if torch.is_grad_enabled() and x.requires_grad:  # LoRA over a frozen int8 base: see DequantizedLinear
            return DequantizedLinear.apply(x, self.weight, scale)
        return F.linear(x, self.weight.to(x.dtype)) * scale

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, scale={self.scale.dtype}'


class DequantizedLinear(torch.autograd.Function):
    """y = (x @ q.T) * scale with a gradient for x only (the int8 weight is frozen). F.linear on the dequantized
    weight would save that float copy for backward: a whole bf16 LLM's worth of saved tensors over a LoRA
    forward, the memory int8 was meant to save. Here backward dequantizes again (QLoRA's trade: one more
    conversion per Linear) and nothing but the resident q and scale is kept."""

    @staticmethod
    def forward(ctx, x, q, scale):
        ctx.save_for_backward(q, scale)
        return F.linear(x, q.to(x.dtype)) * scale

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return (grad * scale) @ q.to(grad.dtype), None, None


def int8_linear_names(llm: nn.Module) -> list[str]:
    """The Linears to quantize: all of them (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head) but an
    lm_head tied to the embedding, whose int8 copy would sit next to the bf16 embedding that the input
    lookup still needs: more bytes, not fewer."""
    embed = llm.embed_tokens.weight
    return [name for name, m in llm.named_modules() if isinstance(m, nn.Linear) and m.weight is not embed]


def set_int8_linear_(llm: nn.Module, name: str, weight, dtype: torch.dtype | None = None):
    """Replace the Linear `name` of llm (meta or real) by the Int8Linear of `weight`: the loader's hook.
    weight: a float weight (out, in), or an already quantized (q, scale) pair."""
    parent, _, attr = name.rpartition('.')
    old = llm.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f'{name} is a {type(old).__name__}, not an nn.Linear')
    if old.bias is not None:
        raise NotImplementedError(f'{name} has a bias; Int8Linear has none (neither do the LLM Linears)')
    q, scale = weight if isinstance(weight, tuple) else (weight, None)
    if tuple(q.shape) != (old.out_features, old.in_features):
        raise ValueError(f'{name}: weight {tuple(q.shape)}, module wants {(old.out_features, old.in_features)}')
    if scale is None:
        module = Int8Linear.from_weight(weight, dtype)
    else:
        module = Int8Linear(q.shape[1], q.shape[0], scale.dtype, device='meta')
        module.weight, module.scale = q, scale
    setattr(llm.get_submodule(parent), attr, module)


@torch.no_grad()
def quantize_llm_(llm: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """Quantize every Linear of llm in place (see int8_linear_names); dtype of the scales: the compute
    dtype, default each weight's own. Returns what changed, in bytes."""
    names = int8_linear_names(llm)
    tied = llm.lm_head.weight is llm.embed_tokens.weight
    before = after = 0
    for name in names:
        w = llm.get_submodule(name).weight
        before += w.numel() * w.element_size()
        set_int8_linear_(llm, name, w, dtype)
        new = llm.get_submodule(name)
        after += new.weight.numel() * 1 + new.scale.numel() * new.scale.element_size()
    skipped = ['lm_head: tied to embed_tokens, kept in float (an int8 copy would add bytes)'] if tied else []
    rest = sum(t.numel() * t.element_size() for t in llm.parameters())  # embedding, norms, a tied lm_head
    return dict(linears=len(names), linear_bytes_before=before, linear_bytes_after=after,
                model_bytes_before=before + rest, model_bytes_after=after + rest, skipped=skipped)
