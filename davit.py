"""DaViT, the image backbone of Florence-2 (Ding et al., "DaViT: Dual Attention Vision Transformers").

Four stages; each starts with a convolutional patch embedding and then runs `depth` blocks. A block is
a *spatial* block (self-attention inside non-overlapping windows of `window x window` tokens) followed
by a *channel* block (self-attention between channels, in groups, over all tokens of the image). Every
attention and every MLP is preceded by a 3x3 depthwise convolution added residually, which serves as
the positional encoding. Module names follow transformers' Florence2VisionBackbone, so its checkpoint
keys map one to one (florence_encoder.py holds the tables for Microsoft's original names).

    image (B, 3, 768, 768) -> (B, 128, 192, 192) -> (B, 256, 96, 96) -> (B, 512, 48, 48) -> (B, 1024, 24, 24)
                                                                           (sizes of the `base` preset)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class DaViTConfig:
    dims: tuple = (128, 256, 512, 1024)      # channels of each stage
    heads: tuple = (4, 8, 16, 32)            # window-attention heads per stage
    groups: tuple = (4, 8, 16, 32)           # channel-attention groups per stage
    depths: tuple = (1, 1, 9, 1)             # (spatial block, channel block) pairs per stage
    window: int = 12
    patch_size: tuple = (7, 3, 3, 3)         # conv kernel of each stage's patch embedding
    patch_stride: tuple = (4, 2, 2, 2)
    patch_padding: tuple = (3, 1, 1, 1)
    patch_prenorm: tuple = (False, True, True, True)  # LayerNorm before the conv (else after it)
    in_channels: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1              # stochastic depth, rising linearly over all sub-blocks
    eps: float = 1e-5                        # every LayerNorm

    def __post_init__(self):
        n = len(self.dims)
        for name in ("heads", "groups", "depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"DaViTConfig.{name} has {len(getattr(self, name))} entries, dims has {n}")
        for d, h, g in zip(self.dims, self.heads, self.groups):
            if d % h or d % g:
                raise ValueError(f"stage width {d} is not divisible by heads {h} and groups {g}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DaViTConfig":
        if name not in DAVIT_PRESETS:
            raise ValueError(f"unknown DaViT preset {name!r}; known: {sorted(DAVIT_PRESETS)}")
        return cls(**{**DAVIT_PRESETS[name], **overrides})

    def grid(self, height: int, width: int | None = None) -> tuple[int, int]:
        """The (h, w) token grid of the last stage for an input image of height x width."""
        h, w = height, height if width is None else width
        for k, s, p in zip(self.patch_size, self.patch_stride, self.patch_padding):
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return h, w


DAVIT_PRESETS = {  # keyword arguments of DaViTConfig, as every preset table in this project
    "base": dict(),                                                   # Florence-2-base (facts, section 2)
    "large": dict(dims=(256, 512, 1024, 2048), heads=(8, 16, 32, 64), groups=(8, 16, 32, 64)),
    # for tests and demos: 64x64 images give a 2x2 last grid, smaller than the window (so it is padded)
    "tiny": dict(dims=(16, 32, 48, 64), heads=(1, 2, 3, 4), groups=(1, 2, 3, 4), depths=(1, 1, 2, 1), window=3,
                 drop_path_rate=0.0),
}


# ----------------------------------------------------------------------------------------------
# Small parts

class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a whole sample with probability p and
    scale the kept ones by 1/(1-p), so the expected output is unchanged. Identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x / keep * torch.floor(mask + keep)

    def extra_repr(self):
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Strided conv that starts a stage. Stage 1: conv then LayerNorm; stages 2-4: LayerNorm then conv."""

    def __init__(self, c_in, c_out, kernel, stride, padding, prenorm, eps):
        super().__init__()
        self.prenorm = prenorm
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(c_in if prenorm else c_out, eps=eps)

    def _norm(self, x):  # LayerNorm over channels of a (B, C, H, W) map
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        if self.prenorm:
            return self.conv(self._norm(x))
        return self._norm(self.conv(x))


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def depthwise_conv(dim):
    """3x3 depthwise conv: DaViT's positional encoding, added residually before each sub-block."""
    return nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)


# ----------------------------------------------------------------------------------------------
# The two attentions

class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping window x window squares of the token grid.

    A grid that is not a multiple of the window is zero-padded at the right and bottom; as in the
    reference implementations there is no mask, so the padded tokens take part as keys."""

    def __init__(self, dim, heads, window, qkv_bias=True):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, height, width):                           # x: (B, H*W, C)
        B, _, C = x.shape
        w = self.window
        x = x.view(B, height, width, C)
        x = F.pad(x, (0, 0, 0, (-width) % w, 0, (-height) % w))    # pad W then H, at the end
        Hp, Wp = x.shape[1], x.shape[2]
        x = x.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3)    # (B, Hp/w, Wp/w, w, w, C)
        x = x.reshape(-1, w * w, C)                                 # (B * windows, w*w, C)

        qkv = self.qkv(x).view(x.shape[0], w * w, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)              # each (B * windows, heads, w*w, C/heads)
        x = F.scaled_dot_product_attention(q, k, v)                 # scale (C/heads)^-0.5
        x = self.proj(x.transpose(1, 2).reshape(-1, w * w, C))

        x = x.view(B, Hp // w, Wp // w, w, w, C).transpose(2, 3)    # back to (B, Hp/w, w, Wp/w, w, C)
        x = x.reshape(B, Hp, Wp, C)[:, :height, :width]             # drop the padding
        return x.reshape(B, height * width, C)


class ChannelAttention(nn.Module):
    """Self-attention between channels: the C channels are split into groups, and inside a group each
    channel (a vector over all N tokens) attends to the others. Scale N^-0.5 (N = tokens)."""

    def __init__(self, dim, groups, qkv_bias=True):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                           # x: (B, N, C)
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.groups, C // self.groups)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)              # each (B, groups, C/groups, N)
        x = F.scaled_dot_product_attention(q, k, v, scale=N ** -0.5)
        x = x.permute(0, 3, 1, 2).reshape(B, N, C)                  # (B, N, groups, C/groups) -> (B, N, C)
        return self.proj(x)


# ----------------------------------------------------------------------------------------------
# Blocks

class _SubBlock(nn.Module):
    """conv1 (pos. enc.) -> pre-LN attention -> conv2 (pos. enc.) -> pre-LN MLP, all residual.
    SpatialBlock and ChannelBlock differ only in the attention."""

    def __init__(self, dim, cfg: DaViTConfig, drop_path: float):
        super().__init__()
        self.conv1 = depthwise_conv(dim)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.conv2 = depthwise_conv(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.ffn = MLP(dim, cfg.mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def attend(self, x, height, width):
        raise NotImplementedError

    def forward(self, x):                                           # x: (B, C, H, W)
        B, C, H, W = x.shape
        x = x + self.conv1(x)
        t = x.flatten(2).transpose(1, 2)                            # (B, H*W, C)
        t = t + self.drop_path(self.attend(self.norm1(t), H, W))
        x = t.transpose(1, 2).reshape(B, C, H, W)
        x = x + self.conv2(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.ffn(self.norm2(t)))
        return t.transpose(1, 2).reshape(B, C, H, W)


class SpatialBlock(_SubBlock):
    def __init__(self, dim, heads, cfg: DaViTConfig, drop_path: float):
        super().__init__(dim, cfg, drop_path)
        self.window_attn = WindowAttention(dim, heads, cfg.window, cfg.qkv_bias)

    def attend(self, x, height, width):
        return self.window_attn(x, height, width)


class ChannelBlock(_SubBlock):
    def __init__(self, dim, groups, cfg: DaViTConfig, drop_path: float):
        super().__init__(dim, cfg, drop_path)
        self.channel_attn = ChannelAttention(dim, groups, cfg.qkv_bias)

    def attend(self, x, height, width):
        return self.channel_attn(x)


class DaViTBlock(nn.Module):
    def __init__(self, spatial_block: SpatialBlock, channel_block: ChannelBlock):
        super().__init__()
        self.spatial_block = spatial_block
        self.channel_block = channel_block

    def forward(self, x):
        return self.channel_block(self.spatial_block(x))


# ----------------------------------------------------------------------------------------------
# The backbone

class DaViT(nn.Module):
    def __init__(self, cfg: DaViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute each block in backward (training memory)
        # one drop-path rate per sub-block (2 per block), rising linearly from 0 to drop_path_rate
        rates = torch.linspace(0, cfg.drop_path_rate, 2 * sum(cfg.depths), device="cpu").tolist()
        self.convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        c_in, i = cfg.in_channels, 0
        for s, dim in enumerate(cfg.dims):
            self.convs.append(PatchEmbed(c_in, dim, cfg.patch_size[s], cfg.patch_stride[s], cfg.patch_padding[s],
                                         cfg.patch_prenorm[s], cfg.eps))
            stage = nn.ModuleList()
            for _ in range(cfg.depths[s]):
                stage.append(DaViTBlock(SpatialBlock(dim, cfg.heads[s], cfg, rates[i]),
                                        ChannelBlock(dim, cfg.groups[s], cfg, rates[i + 1])))
                i += 2
            self.blocks.append(stage)
            c_in = dim

    def forward(self, pixel_values):                                # (B, 3, H, W)
        x = pixel_values.to(self.convs[0].conv.weight.dtype)
        for conv, stage in zip(self.convs, self.blocks):
            x = conv(x)                                             # (B, C_s, H_s, W_s)
            for block in stage:
                if self.grad_checkpointing and self.training:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x                                                    # (B, C_last, h, w), e.g. (B, 1024, 24, 24)
