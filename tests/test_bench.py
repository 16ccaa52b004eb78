"""bench.py's case 5 arithmetic (the GPU case, which no CPU run exercises): the FLOPs behind the MFU figure
and the bytes behind the decode roofline, checked against counts made by hand on a small decoder.
Times are measured but not asserted."""
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench  # noqa: E402
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
    flops, _ = bench.measure_training(CFG, B, T, ARGS, torch.device("cpu"))
    # 2 FLOPs per multiply-add, forward; backward computes the input and the weight gradients: twice that.
    # (On the CPU the attention itself is not counted: FlopCounterMode has no formula for the CPU SDPA
    # kernel; on CUDA the flash / efficient kernels are counted and add 12 * B * T^2 * heads * head_dim per layer.)
    assert flops == 3 * 2 * B * T * matmul_params(CFG)
    twice, _ = bench.measure_training(CFG, 2 * B, T, ARGS, torch.device("cpu"))
    assert twice == 2 * flops  # negative control: the count follows the tokens


def test_decode_reads_every_weight_but_the_embedding_table_and_the_kv_cache():
    prompt, n = 8, 4
    _, weights, kv = bench.measure_decode(CFG, prompt, n, ARGS, torch.device("cpu"))
    assert weights == 2 * sum(p.numel() for name, p in LLM(CFG).named_parameters() if name != "embed_tokens.weight")
    head_dim = CFG.hidden_size // CFG.n_heads
    assert kv == 2 * CFG.n_layers * CFG.n_kv_heads * head_dim * 2 * (prompt + 1 + n / 2)  # k and v, bf16
