"""Parity on the accelerator in bf16: ours vs transformers, the same random weights, on DEVICE (env
FLORENCE_VL_DEVICE, default cpu) in DTYPE (env FLORENCE_VL_DTYPE, default bf16). device_check.py runs this file
on a GPU; CI runs it on the CPU in bf16 (the same code paths, as a dry run).

bf16 keeps 8 bits of mantissa: two implementations that round in different places agree to about 1e-2 of the
logits' scale, not 1e-5. Tolerances (relative to the reference's largest |logit|): 3e-2 for the decoders and the
compiled decode step, 5e-2 for the vision features (DaViT is deep); greedy tokens: top-1 on the reference's own
continuation, at least 90% the same."""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from generate import compile_decode
from helpers import random_hf_model
from model import LLM, LLMConfig

DEVICE = torch.device(os.environ.get("FLORENCE_VL_DEVICE", "cpu"))
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[os.environ.get("FLORENCE_VL_DTYPE", "bf16")]
LLM_TOL, VISION_TOL, TOKENS_AGREE = 3e-2, 5e-2, 0.9


def hf_llm(family: str):
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if family == "llama":
        return random_hf_model(LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, **kw))
    return random_hf_model(Phi3ForCausalLM, Phi3Config(num_key_value_heads=4, **kw))


def pair(family: str):
    hf = hf_llm(family)
    ours = LLM(LLMConfig.from_hf_config(hf.config.to_dict())).eval().load_hf_state_dict(hf.state_dict())
    return hf.to(DEVICE, DTYPE), ours.to(DEVICE, DTYPE)


def relative(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "phi3"])
@torch.no_grad()
def test_decoder_logits_and_greedy_tokens_in_bf16(family):
    """Logits on a prompt; then transformers' greedy continuation of 32 tokens, read back by ours
    (teacher-forced: each position's top-1 compared on the same context, so one flipped near-tie does not
    carry over to every later token)."""
    hf, ours = pair(family)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    err = relative(ours(ids), hf(ids).logits)
    full = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False, pad_token_id=0)
    agree = (ours(full)[:, 23:-1].argmax(-1) == full[:, 24:]).float().mean().item()
    print(f"\n{family} on {DEVICE} in {DTYPE}: logits {err:.2e} of their scale, greedy tokens {agree:.0%} agreed")
    assert err <= LLM_TOL and agree >= TOKENS_AGREE


@torch.no_grad()
def test_vision_features_in_bf16():
    from florence_encoder import FlorenceConfig, FlorenceVision, to_original_state_dict
    from transformers import Florence2ForConditionalGeneration
    from helpers import florence2_hf_config, randomize_
    cfg = FlorenceConfig.from_name("tiny", vocab_size=51290)  # Florence-2's 51289 + transformers' image placeholder
    torch.manual_seed(0)
    hf = Florence2ForConditionalGeneration._from_config(florence2_hf_config(cfg, 51290, 51289),
                                                        attn_implementation="eager").eval()
    randomize_(hf)
    ours = FlorenceVision.from_state_dict(cfg, hf.state_dict())
    assert to_original_state_dict(ours.state_dict(), cfg)  # the writer runs on these keys
    hf, ours = hf.to(DEVICE, DTYPE), ours.to(DEVICE, DTYPE)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    mine = ours.image_features(pixels)
    theirs = hf.model.get_image_features(pixels).pooler_output
    err = relative(mine, theirs.reshape(mine.shape))
    print(f"\nvision features on {DEVICE} in {DTYPE}: {err:.2e} of their scale")
    assert err <= VISION_TOL


@torch.no_grad()
def test_compiled_decode_step_is_as_close_to_fp32_as_eager():
    """torch.compile of the fixed-shape decode step (on CUDA: mode reduce-overhead, a CUDA graph per step), 24 steps
    fed the same tokens after the same prompt. Two bf16 programs round in different places (the compiled one
    keeps fused intermediates in fp32), so they are compared with the fp32 eager steps: the compiled steps must be
    no further from them than the eager bf16 steps are (x 1.5), and within 10% of their scale."""
    from model import KVCache
    _, ours = pair("llama")
    exact = ours.float()
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def steps(model, dtype, step):
        cache = KVCache(model.cfg, 2, 40, dtype=dtype, device=DEVICE)
        model(ids[:, :16], cache=cache)
        return torch.stack([step(ids[:, t], cache).float().clone() for t in range(16, 40)])
    reference = steps(exact, torch.float32, exact.decode_step)
    ours = ours.to(DTYPE)
    eager = relative(steps(ours, DTYPE, ours.decode_step), reference)
    compiled = relative(steps(ours, DTYPE, compile_decode(ours, "reduce-overhead" if DEVICE.type == "cuda" else None)),
                        reference)
    print(f"\ndecode steps on {DEVICE} in {DTYPE} vs fp32: eager {eager:.2e}, compiled {compiled:.2e} of their scale")
    assert compiled <= 1.5 * eager + 1e-3 and compiled <= 0.1
