"""DaViT against transformers' Florence2VisionBackbone (random weights, eager attention as the reference).

Tolerance: max abs difference <= 1e-4 in fp32; each parity test also shows that one perturbed weight
pushes the same comparison past that tolerance."""
import pytest
import torch
from transformers import Florence2VisionConfig
from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

from davit import DaViT, DaViTConfig
from helpers import randomize_

TOL = 1e-4


CONFIGS = {
    # the tiny preset: 64x64 -> last grid 2x2, smaller than the window 3 (padded)
    "tiny": (DaViTConfig.from_name("tiny"), (2, 3, 64, 64)),
    # odd sizes: heads/groups 3 and 6, a non-square 16x24 first grid that window 5 does not divide,
    # a last grid 2x3; depth 2 in stage 2
    "odd": (DaViTConfig(dims=(24, 48, 72, 96), heads=(3, 6, 3, 6), groups=(2, 3, 6, 3), depths=(1, 2, 1, 1),
                        window=5, drop_path_rate=0.2), (2, 3, 64, 96)),
}


def hf_vision_config(cfg: DaViTConfig) -> Florence2VisionConfig:
    c = Florence2VisionConfig(embed_dim=list(cfg.dims), num_heads=list(cfg.heads), num_groups=list(cfg.groups),
                              depths=list(cfg.depths), window_size=cfg.window, patch_size=list(cfg.patch_size),
                              patch_stride=list(cfg.patch_stride), patch_padding=list(cfg.patch_padding),
                              patch_prenorm=list(cfg.patch_prenorm), drop_path_rate=cfg.drop_path_rate)
    c._attn_implementation = "eager"
    return c


def build_pair(name):
    cfg, shape = CONFIGS[name]
    torch.manual_seed(0)
    ref = Florence2VisionBackbone(hf_vision_config(cfg)).eval()
    randomize_(ref)
    ours = DaViT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)   # our names are transformers' names
    return ref, ours, torch.randn(shape)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_davit_matches_transformers_backbone(name):
    ref, ours, x = build_pair(name)
    with torch.no_grad():
        expected = ref(x).last_hidden_state
        got = ours(x)
    assert got.shape == expected.shape == (x.shape[0], ours.cfg.dims[-1], *ours.cfg.grid(*x.shape[2:]))
    diff = (got - expected).abs().max().item()
    print(f"{name}: DaViT max abs diff {diff:.2e} (output max abs {expected.abs().max():.1f})")
    assert diff <= TOL

    # negative control: one weight of the first window attention, nudged
    with torch.no_grad():
        ours.blocks[0][0].spatial_block.window_attn.qkv.weight[0, 0] += 0.1
        assert (ours(x) - expected).abs().max().item() > TOL


def test_window_padding_happens(monkeypatch):
    """The odd config's first grid (16x24) is padded to 20x25 for window 5: 4 x 5 windows of 25 tokens per
    image. (That the padded tokens are unmasked keys, as in the reference, is what the parity test shows.)"""
    _, ours, _ = build_pair("odd")
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(tuple(q.shape)) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        ours.blocks[0][0].spatial_block.window_attn(torch.randn(2, 16 * 24, 24), 16, 24)
    assert seen == [(2 * 4 * 5, 3, 25, 8)]   # (windows, heads, tokens per window, head dim)


def test_drop_path_schedule_and_training_behaviour():
    ref, ours, x = build_pair("odd")
    ref_rates = [m.drop_prob for m in ref.modules() if type(m).__name__ == "Florence2DropPath"]
    our_rates = [m.p for m in ours.modules() if type(m).__name__ == "DropPath"]
    # transformers has two DropPath modules per sub-block with the same rate; skips those with rate 0
    assert sorted(set(our_rates) - {0.0}) == pytest.approx(sorted(set(ref_rates)))
    assert our_rates == pytest.approx(torch.linspace(0, 0.2, 2 * sum(ours.cfg.depths)).tolist())

    ours.train()
    torch.manual_seed(1)
    a = ours(x)
    b = ours(x)
    assert (a - b).abs().max() > 1e-3              # stochastic in training
    ours.eval()
    with torch.no_grad():
        assert (ours(x) - ref(x).last_hidden_state).abs().max() <= TOL   # identity in eval


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours, x = build_pair("tiny")
    ours.train()
    grads = []
    for flag in (False, True):
        ours.grad_checkpointing = flag
        ours.zero_grad()
        ours(x).square().mean().backward()
        grads.append(ours.convs[0].conv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_presets():
    base, large = DaViTConfig.from_name("base"), DaViTConfig.from_name("large")
    assert base.dims == (128, 256, 512, 1024) and base.heads == (4, 8, 16, 32) and base.depths == (1, 1, 9, 1)
    assert large.dims == (256, 512, 1024, 2048) and large.groups == (8, 16, 32, 64) and large.window == 12
    assert base.grid(768) == (24, 24) and large.grid(768) == (24, 24)
    assert DaViTConfig.from_name("tiny").grid(64) == (2, 2)
    with pytest.raises(ValueError, match="unknown DaViT preset"):
        DaViTConfig.from_name("huge")
    with pytest.raises(ValueError, match="not divisible"):
        DaViTConfig(dims=(10, 20, 40, 80))
