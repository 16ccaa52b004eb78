"""Florence-2 as Florence-VL's vision encoder: image features V and the prompt-conditioned features V'_k.

    image ──preprocess──> (B, 3, 768, 768) ──DaViT──> (B, C, 24, 24)
          ──+ 2D position embedding, + temporal embedding (one frame)
          ──[mean token] ++ [576 grid tokens] ──image_projection, image_proj_norm──> V (B, 577, D)
    V ++ embed(prompt_k) ──BART encoder──> first 577 outputs = V'_k (B, 577, D),  k = 1..3

Florence-VL uses the outputs of Florence-2's encoder for three task prompts (detailed caption, OCR,
dense region caption) besides V itself; `multi_prompt_features` computes all four with one DaViT pass.
Only the encoder half of Florence-2's BART is here: the decoder is not needed for features.

Checkpoints come in two layouts, both loaded strictly by `FlorenceVision.from_pretrained`:
Microsoft's original remote-code names (`microsoft/Florence-2-*`, also what Florence-VL checkpoints
hold under their tower) and transformers' native names (`florence-community/Florence-2-*`). The
mapping tables are at the end of this file.
"""
from __future__ import annotations

import argparse
import functools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

import checkpoint as ckpt
from davit import DaViT, DaViTConfig

ASSETS = Path(__file__).resolve().parent / "assets" / "florence2"

# ----------------------------------------------------------------------------------------------
# Preprocessing: what Florence-2's image processor does (CLIPImageProcessor, PIL backend), plus
# LLaVA's pad-to-square used by Florence-VL for instruction tuning.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def expand_to_square(image: Image.Image, fill=tuple(int(m * 255) for m in IMAGENET_MEAN)) -> Image.Image:
    """Center the image on a square canvas of its longer side (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h), max(w, h)), fill)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def preprocess(images, pad_to_square: bool = False, size: int = 768) -> torch.Tensor:
    """PIL images or paths (one or a list) -> float32 pixel values (B, 3, size, size).

    RGB (PIL's convert: alpha is dropped), optional pad to square, PIL bicubic resize to size x size,
    x/255, ImageNet mean/std. The arithmetic (uint8 -> float64 * 1/255 -> float32, then (x - mean) / std
    in float32) follows transformers' processor (PIL backend) step by step, so the result is identical."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image = image.convert("RGB")   # as Florence-VL's data loader does (Florence-2's processor expects RGB)
        if pad_to_square:
            image = expand_to_square(image)
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
        out.append(((x - mean) / std).transpose(2, 0, 1))                          # (3, S, S)
    return torch.from_numpy(np.stack(out))


# ----------------------------------------------------------------------------------------------
# Tokenizer and the three task prompts of Florence-VL

TASK_PROMPTS = (
    "Describe in detail what is shown in the image.",                 # <DETAILED_CAPTION>
    "What is the text in the image?",                                 # <OCR>
    "Locate the objects in the image, with their descriptions.",      # <DENSE_REGION_CAPTION>
)


@functools.lru_cache(maxsize=1)
def florence_tokenizer():
    """Florence-2's BART tokenizer (adds <s> ... </s>)."""
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(ASSETS / "tokenizer.json"))


def tokenize_prompts(prompts, pad_id: int = 1) -> torch.Tensor:
    """(K, L) token ids of the prompts, right-padded with pad_id to the longest."""
    ids = [e.ids for e in florence_tokenizer().encode_batch(list(prompts))]
    length = max(len(i) for i in ids)
    return torch.tensor([i + [pad_id] * (length - len(i)) for i in ids], dtype=torch.long)


def prompt_ids() -> torch.Tensor:
    """(3, 14) ids of TASK_PROMPTS as Florence-VL feeds them: <s> prompt </s>, padded with <pad> = 1."""
    return tokenize_prompts(TASK_PROMPTS)


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class FlorenceConfig:
    vision: DaViTConfig = field(default_factory=DaViTConfig)
    d_model: int = 768                  # BART width = projection_dim of the image features
    encoder_layers: int = 6
    encoder_heads: int = 12
    encoder_ffn_dim: int = 3072
    vocab_size: int = 51289
    max_position_embeddings: int = 1024  # BART learned positions (the table has 2 more rows: offset 2)
    pad_token_id: int = 1
    scale_embedding: bool = False        # Florence-2 does not scale token embeddings by sqrt(d_model)
    image_pos_embed_size: int = 50       # rows / columns of the learned 2D position table
    temporal_embed_size: int = 100       # frames of the cosine temporal table (images use frame 0)
    image_size: int = 768
    dropout: float = 0.1                 # BART dropouts (training only)
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    eps: float = 1e-5

    @classmethod
    def from_name(cls, name: str, **overrides) -> "FlorenceConfig":
        if name not in FLORENCE_PRESETS:
            raise ValueError(f"unknown Florence-2 preset {name!r}; known: {sorted(FLORENCE_PRESETS)}")
        kwargs = {**FLORENCE_PRESETS[name], **overrides}
        if isinstance(kwargs["vision"], str):
            kwargs["vision"] = DaViTConfig.from_name(kwargs["vision"])
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, config: dict) -> "FlorenceConfig":
        """Read a Florence-2 config.json: Microsoft's original (`dim_embed`, nested `image_pos_embed`, ...)
        or transformers' native one (`embed_dim`, `max_position_embeddings`, ...)."""
        v, t = config["vision_config"], config.get("text_config", {})
        original = "dim_embed" in v
        dims = v["dim_embed"] if original else v.get("embed_dim", (128, 256, 512, 1024))
        base = DaViTConfig()
        vision = DaViTConfig(
            dims=tuple(dims),
            heads=tuple(v.get("num_heads", base.heads)), groups=tuple(v.get("num_groups", base.groups)),
            depths=tuple(v.get("depths", base.depths)), window=v.get("window_size", base.window),
            patch_size=tuple(v.get("patch_size", base.patch_size)),
            patch_stride=tuple(v.get("patch_stride", base.patch_stride)),
            patch_padding=tuple(v.get("patch_padding", base.patch_padding)),
            patch_prenorm=tuple(v.get("patch_prenorm", base.patch_prenorm)),
            in_channels=v.get("in_channels", 3), mlp_ratio=v.get("mlp_ratio", 4.0), qkv_bias=v.get("qkv_bias", True),
            drop_path_rate=v.get("drop_path_rate", base.drop_path_rate))
        if original:
            pos_size = v.get("image_pos_embed", {}).get("max_pos_embeddings", 50)
            temporal_size = v.get("visual_temporal_embedding", {}).get("max_temporal_embeddings", 100)
        else:
            pos_size, temporal_size = v.get("max_position_embeddings", 50), v.get("max_temporal_embeddings", 100)
        projection_dim = v.get("projection_dim", config.get("projection_dim"))
        # Missing text fields take BartConfig's defaults, as transformers would.
        d_model = t.get("d_model", 1024)
        if projection_dim is not None and projection_dim != d_model:
            raise ValueError(f"projection_dim {projection_dim} != text d_model {d_model}")
        if t.get("activation_function", "gelu") != "gelu" or t.get("normalize_before", False) \
                or t.get("add_final_layer_norm", False):
            raise ValueError("only the Florence-2 BART variant is supported: gelu, post-LN, no final layer norm")
        return cls(vision=vision, d_model=d_model, encoder_layers=t.get("encoder_layers", 12),
                   encoder_heads=t.get("encoder_attention_heads", 16), encoder_ffn_dim=t.get("encoder_ffn_dim", 4096),
                   vocab_size=t.get("vocab_size", config.get("vocab_size", 50265)),
                   max_position_embeddings=t.get("max_position_embeddings", 1024),
                   pad_token_id=t.get("pad_token_id", 1), scale_embedding=t.get("scale_embedding", False),
                   image_pos_embed_size=pos_size, temporal_embed_size=temporal_size,
                   dropout=t.get("dropout", 0.1), attention_dropout=t.get("attention_dropout", 0.0),
                   activation_dropout=t.get("activation_dropout", 0.0))


    @classmethod
    def from_shapes(cls, shapes: dict) -> "FlorenceConfig":
        """The config of a tower whose config.json cannot be had, read from its weights' shapes
        ({name: shape}, Microsoft original names). Shapes give the widths, depths, kernel sizes, encoder
        layers and tables; head and group counts, window, strides and paddings are not in them, so they
        come from the preset whose stage widths match (an error if none does). Image size: 768, what every
        released Florence-2 processor uses."""
        def shape(key):
            if key not in shapes:
                raise ValueError(f"the tower's weights have no {key}")
            return tuple(shapes[key])

        stages = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"vision_tower\.convs\.(\d+)\.", k))})
        dims = tuple(shape(f"vision_tower.convs.{i}.proj.weight")[0] for i in stages)
        preset = next((name for name in FLORENCE_PRESETS if cls.from_name(name).vision.dims == dims), None)
        if preset is None:
            raise ValueError(f"stage widths {dims} match no Florence-2 preset ({sorted(FLORENCE_PRESETS)}): the "
                             "head counts cannot be read from the weights; give the tower's config.json")
        depths = tuple(len({m.group(1) for k in shapes if (m := re.match(rf"vision_tower\.blocks\.{i}\.(\d+)\.", k))})
                       for i in stages)
        layers = {int(m.group(1)) for k in shapes if (m := re.match(r"language_model\.model\.encoder\.layers\.(\d+)\.", k))}
        base = cls.from_name(preset)
        vision = replace(base.vision, depths=depths,
                         patch_size=tuple(shape(f"vision_tower.convs.{i}.proj.weight")[-1] for i in stages))
        return replace(base, vision=vision, d_model=shape("image_projection")[1], encoder_layers=len(layers),
                       encoder_ffn_dim=shape("language_model.model.encoder.layers.0.fc1.weight")[0],
                       vocab_size=shape("language_model.model.shared.weight")[0],
                       max_position_embeddings=shape("language_model.model.encoder.embed_positions.weight")[0] - 2,
                       image_pos_embed_size=shape("image_pos_embed.row_embeddings.weight")[0],
                       temporal_embed_size=shapes.get("visual_temporal_embed.pos_idx_to_embed",
                                                      (base.temporal_embed_size,))[0],
                       image_size=768)


FLORENCE_PRESETS = {  # keyword arguments of FlorenceConfig; vision: a DAVIT_PRESETS name
    # base: max_position_embeddings 1024 is BART's default (not checked against the hub config); loading
    # always reads the checkpoint's config.json, so a preset only matters for random init
    "base": dict(vision="base"),
    "large": dict(vision="large", d_model=1024, encoder_layers=12, encoder_heads=16, encoder_ffn_dim=4096,
                  max_position_embeddings=4096),
    "tiny": dict(vision="tiny", d_model=32, encoder_layers=2, encoder_heads=2, encoder_ffn_dim=64,
                 max_position_embeddings=64, image_size=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
}


# ----------------------------------------------------------------------------------------------
# Image features V

class PositionEmbedding2D(nn.Module):
    """Learned absolute 2D positions: a column table and a row table, concatenated [column, row]."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.row_embeddings = nn.Embedding(size, dim // 2)
        self.column_embeddings = nn.Embedding(size, dim - dim // 2)

    def forward(self, height: int, width: int) -> torch.Tensor:
        size = self.row_embeddings.num_embeddings
        if height > size or width > size:
            raise ValueError(f"token grid {height}x{width} exceeds the {size}x{size} position table")
        col = self.column_embeddings.weight[:width]                  # (w, C - C//2)
        row = self.row_embeddings.weight[:height]                    # (h, C//2)
        return torch.cat([col[None].expand(height, -1, -1), row[:, None].expand(-1, width, -1)], -1)  # (h, w, C)


def cosine_table(frames: int, dim: int) -> torch.Tensor:
    """(frames, dim) sinusoidal table: sin in even channels, cos in odd ones, frequencies 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / half))
    angles = torch.arange(frames, dtype=torch.float32)[:, None] * freqs[None]
    table = torch.empty(frames, dim)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    return table


# ----------------------------------------------------------------------------------------------
# The BART encoder (Florence-2's text encoder, here fed [image tokens ++ prompt tokens])

class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask=None):                                 # x: (B, S, D); mask: (B, 1, 1, S) bool
        B, S, D = x.shape
        q, k, v = (p(x).view(B, S, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # each (B, heads, S, D/heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(x.transpose(1, 2).reshape(B, S, D))


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: FlorenceConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = SelfAttention(cfg.d_model, cfg.encoder_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)

    def forward(self, x, mask=None):
        drop = functools.partial(F.dropout, p=self.cfg.dropout, training=self.training)
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, mask)))
        h = F.dropout(F.gelu(self.fc1(x)), p=self.cfg.activation_dropout, training=self.training)
        return self.final_layer_norm(x + drop(self.fc2(h)))


class BartEncoder(nn.Module):
    def __init__(self, cfg: FlorenceConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def embed(self, input_ids):                                      # (B, L) -> (B, L, D)
        scale = math.sqrt(self.cfg.d_model) if self.cfg.scale_embedding else 1.0
        return self.embed_tokens(input_ids) * scale

    def forward(self, inputs_embeds, attention_mask=None):           # (B, S, D), (B, S) 1 = attend
        S = inputs_embeds.shape[1]
        if S > self.cfg.max_position_embeddings:
            raise ValueError(f"{S} encoder positions, the table has {self.cfg.max_position_embeddings}")
        x = inputs_embeds + self.embed_positions.weight[2:2 + S]     # BART's learned positions start at row 2
        x = F.dropout(self.layernorm_embedding(x), p=self.cfg.dropout, training=self.training)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # masks keys only
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x                                                     # (B, S, D)


# ----------------------------------------------------------------------------------------------
# The tower

class FlorenceVision(nn.Module):
    """DaViT + image projection + BART encoder: everything of Florence-2 that Florence-VL uses."""

    def __init__(self, cfg: FlorenceConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.vision.dims[-1]
        self.vision_tower = DaViT(cfg.vision)
        self.image_pos_embed = PositionEmbedding2D(cfg.image_pos_embed_size, C)
        self.register_buffer("visual_temporal_embed", cosine_table(cfg.temporal_embed_size, C))
        self.image_projection = nn.Linear(C, cfg.d_model, bias=False)
        self.image_proj_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.encoder = BartEncoder(cfg)

    @property
    def num_image_tokens(self) -> int:
        """Tokens of V for a cfg.image_size square image: 1 mean token + the last DaViT grid (577 at 768)."""
        h, w = self.cfg.vision.grid(self.cfg.image_size)
        return 1 + h * w

    def image_features(self, pixel_values) -> torch.Tensor:
        """V: (B, 3, H, W) -> (B, 1 + h*w, D)."""
        x = self.vision_tower(pixel_values)                          # (B, C, h, w)
        B, C, h, w = x.shape
        x = x.permute(0, 2, 3, 1) + self.image_pos_embed(h, w)       # (B, h, w, C)
        x = x.reshape(B, h * w, C) + self.visual_temporal_embed[0]   # an image is a video of one frame
        # Florence-2's image_feature_source ["spatial_avg_pool", "temporal_avg_pool"]: the mean over space
        # (one token), then the mean over time of each grid token (itself, for one frame).
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)       # (B, 1 + h*w, C)
        return self.image_proj_norm(self.image_projection(x))        # (B, 1 + h*w, D)

    def _encode(self, V, input_ids, attention_mask=None):
        x = torch.cat([V, self.encoder.embed(input_ids).to(V.dtype)], dim=1)  # (B, 1+N+L, D)
        if attention_mask is not None and attention_mask.shape[1] == input_ids.shape[1]:
            attention_mask = torch.cat([attention_mask.new_ones(V.shape[:2]), attention_mask], dim=1)
        return self.encoder(x, attention_mask)

    def encode(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """Encoder last hidden state for [V ++ embedded input_ids]: (B, 1+N+L, D).

        attention_mask: None (everything attended, as Florence-VL does), or (B, L) for the prompt tokens
        (image tokens are always attended, as in Florence-2), or (B, 1+N+L) for the whole sequence."""
        return self._encode(self.image_features(pixel_values), input_ids, attention_mask)

    def multi_prompt_features(self, pixel_values, prompt_ids=None, masked=False) -> list:
        """[V, V'_1, ..., V'_K], each (B, 1+N, D): V'_k = the image-token outputs of the encoder for prompt k.

        One DaViT pass; the B*K (image, prompt) pairs go through the encoder as one batch. By default the
        three task prompts padded to 14 with pad id 1 and no attention mask, so the pads are attended, as
        in the official Florence-VL code (its checkpoints were trained on these features). masked=True
        hides the pads instead. prompt_ids: an optional (K, L) tensor, e.g. a subset for ablations."""
        V = self.image_features(pixel_values)                        # (B, 1+N, D)
        if prompt_ids is None:
            prompt_ids = tokenize_prompts(TASK_PROMPTS, pad_id=self.cfg.pad_token_id)
        prompt_ids = prompt_ids.to(V.device)
        (B, T, D), K = V.shape, prompt_ids.shape[0]
        ids = prompt_ids.repeat(B, 1)                                # (B*K, L), image-major
        mask = (ids != self.cfg.pad_token_id).long() if masked else None
        out = self._encode(V.repeat_interleave(K, dim=0), ids, mask)[:, :T]  # (B*K, 1+N, D)
        out = out.view(B, K, T, D)
        return [V] + [out[:, k] for k in range(K)]

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None) -> "FlorenceVision":
        """A Florence-2 checkpoint folder or hub id, in either layout, loaded strictly (see from_state_dict)."""
        folder = ckpt.resolve(path_or_repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        cfg = FlorenceConfig.from_hf_config(ckpt.read_config(folder))
        sd = {}
        for f in ckpt.weight_files(folder):
            sd.update(ckpt.read_weights(f))
        return cls.from_state_dict(cfg, sd, dtype=dtype, what=str(path_or_repo_id))

    @classmethod
    def from_state_dict(cls, cfg: FlorenceConfig, sd: dict, dtype=None, what="checkpoint") -> "FlorenceVision":
        """Build the tower from a state dict with original, native or our names (detected). The decoder and
        LM head are skipped; any other missing, unexpected or misshaped key raises CheckpointError listing
        them. dtype: None = float32. Returned in eval mode."""
        layout = detect_layout(sd)
        ours = dict(sd) if layout == "ours" else to_ours(sd, cfg, layout)
        # a derived buffer: some checkpoints do not store it
        ours.setdefault("visual_temporal_embed", cosine_table(cfg.temporal_embed_size, cfg.vision.dims[-1]))
        with torch.device("meta"):                                   # no time spent on a random init
            model = cls(cfg)
        ckpt.check_state_dict(ckpt.shapes(model.state_dict()), ckpt.shapes(ours), f"{what} ({layout} names)")
        dtype = dtype or torch.float32
        model.load_state_dict({k: v.to(dtype).contiguous() for k, v in ours.items()}, strict=True, assign=True)
        return model.eval()


# ----------------------------------------------------------------------------------------------
# Checkpoint names: one table, every key spelled out (as model.py's hf_layout), read in both directions.
# Our names are transformers' native ones without its wrappers; Microsoft's original names carry the
# remote code's PreNorm / Residual wrappers inside DaViT ("fn", "dw", "net").

def florence_layout(cfg: FlorenceConfig) -> dict[str, tuple[str, str]]:
    """our tensor -> (its Microsoft original name, its transformers-native name)."""
    table, proj, lm = {}, "model.multi_modal_projector.", ("language_model.model.", "model.language_model.")
    for i, depth in enumerate(cfg.vision.depths):
        for p in ("weight", "bias"):
            for ours, original in ((f"convs.{i}.conv", f"convs.{i}.proj"), (f"convs.{i}.norm", f"convs.{i}.norm")):
                table[f"vision_tower.{ours}.{p}"] = (f"vision_tower.{original}.{p}", f"model.vision_tower.{ours}.{p}")
        for b in range(depth):
            for kind, attn in (("spatial", "window_attn"), ("channel", "channel_attn")):
                block = f"vision_tower.blocks.{i}.{b}.{kind}_block."
                for ours, original in (("conv1", "conv1.fn.dw"), ("norm1", f"{attn}.norm"),
                                       (f"{attn}.qkv", f"{attn}.fn.qkv"), (f"{attn}.proj", f"{attn}.fn.proj"),
                                       ("conv2", "conv2.fn.dw"), ("norm2", "ffn.norm"),
                                       ("ffn.fc1", "ffn.fn.net.fc1"), ("ffn.fc2", "ffn.fn.net.fc2")):
                    for p in ("weight", "bias"):
                        table[f"{block}{ours}.{p}"] = (f"{block}{original}.{p}", f"model.{block}{ours}.{p}")
    for name in ("row_embeddings", "column_embeddings"):
        table[f"image_pos_embed.{name}.weight"] = (f"image_pos_embed.{name}.weight",
                                                    f"{proj}image_position_embed.{name}.weight")
    table["visual_temporal_embed"] = ("visual_temporal_embed.pos_idx_to_embed",
                                      f"{proj}visual_temporal_embed.pos_idx_to_embed")
    table["image_projection.weight"] = ("image_projection", f"{proj}image_projection.weight")  # see TRANSPOSED
    for p in ("weight", "bias"):
        table[f"image_proj_norm.{p}"] = (f"image_proj_norm.{p}", f"{proj}image_proj_norm.{p}")
    table["encoder.embed_tokens.weight"] = (f"{lm[0]}shared.weight", f"{lm[1]}shared.weight")
    parts = ["embed_positions.weight"] + [f"layernorm_embedding.{p}" for p in ("weight", "bias")] + [
        f"layers.{n}.{part}.{p}" for n in range(cfg.encoder_layers) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "self_attn_layer_norm",
            "fc1", "fc2", "final_layer_norm") for p in ("weight", "bias")]
    for part in parts:
        table[f"encoder.{part}"] = (f"{lm[0]}encoder.{part}", f"{lm[1]}encoder.{part}")
    return table


LAYOUTS = ("original", "native")
# The original image_projection is a bare (in, out) matrix used as x @ W; ours is nn.Linear's (out, in).
TRANSPOSED_IN_ORIGINAL = {"image_projection.weight"}
# What checkpoints hold beyond the table: Florence-2's decoder and LM head (not part of the tower: skipped),
# and a copy of the token table (`shared`) that some store too: used only when `shared` itself is absent.
UNUSED = {"original": ("language_model.model.decoder.", "language_model.lm_head.", "language_model.final_logits_bias"),
          "native": ("model.language_model.decoder.", "lm_head.")}
TIED_COPY = {"original": "language_model.model.encoder.embed_tokens.weight",
             "native": "model.language_model.encoder.embed_tokens.weight"}


def unused_original_key(key: str) -> bool:
    """A key of a Florence-2 checkpoint (Microsoft names) that the tower does not use: the decoder and LM head."""
    return key.startswith(UNUSED["original"])


def to_ours(sd: dict, cfg: FlorenceConfig, layout: str) -> dict:
    """A Florence-2 state dict in the original or native layout -> our names. Keys outside the table that are
    not known to be unused are kept as they are, so that the strict check reports them."""
    column = LAYOUTS.index(layout)
    ours_of = {names[column]: ours for ours, names in florence_layout(cfg).items()}
    out, tied = {}, None
    for k, v in sd.items():
        if k in ours_of:
            name = ours_of[k]
            out[name] = v.t() if layout == "original" and name in TRANSPOSED_IN_ORIGINAL else v
        elif k == TIED_COPY[layout]:
            tied = v
        elif not k.startswith(UNUSED[layout]):
            out[k] = v
    if "encoder.embed_tokens.weight" not in out and tied is not None:
        out["encoder.embed_tokens.weight"] = tied
    return out


def to_original_state_dict(ours: dict, cfg: FlorenceConfig) -> dict:
    """Our names -> Microsoft original names (the tower only: no decoder, no LM head)."""
    table = florence_layout(cfg)
    unknown = sorted(set(ours) - set(table))
    if unknown:
        raise ckpt.CheckpointError(f"not FlorenceVision keys of this config: {unknown[:5]}")
    return {table[k][0]: v.t().contiguous() if k in TRANSPOSED_IN_ORIGINAL else v for k, v in ours.items()}


def detect_layout(sd: dict) -> str:
    if any(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in sd):
        return "native"
    if "image_projection" in sd or any(k.startswith("language_model.") for k in sd):
        return "original"
    if "image_projection.weight" in sd or any(k.startswith("encoder.") for k in sd):
        return "ours"
    raise ckpt.CheckpointError("cannot tell the layout of this Florence-2 state dict (first keys: "
                               + ", ".join(list(sd)[:5]) + ")")


# ----------------------------------------------------------------------------------------------
# Demo: python florence_encoder.py --image ../shared/florence2/image.png [--model PATH_OR_HUB_ID]

def main():
    parser = argparse.ArgumentParser(description="Florence-2 features of one image as Florence-VL uses them: "
                                                 "V and V'_1..3 (one per task prompt).")
    parser.add_argument("--image", required=True, help="path of an image file")
    parser.add_argument("--model", default=None, help="Florence-2 checkpoint: local folder or hub id, original or "
                                                      "transformers layout (default: the random `tiny` preset)")
    parser.add_argument("--pad-to-square", action="store_true", help="pad with the ImageNet mean before resizing")
    args = parser.parse_args()

    if args.model:
        model = FlorenceVision.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = FlorenceVision(FlorenceConfig.from_name("tiny")).eval()
    pixels = preprocess(args.image, pad_to_square=args.pad_to_square, size=model.cfg.image_size)
    with torch.no_grad():
        features = model.multi_prompt_features(pixels)
    names = ["V"] + [f"V'_{k + 1}" for k in range(len(TASK_PROMPTS))]
    prompts = ["(image features)"] + [f"({p!r})" for p in TASK_PROMPTS]
    print(f"pixel values {tuple(pixels.shape)}, {model.num_image_tokens} image tokens")
    for name, prompt, f in zip(names, prompts, features):
        print(f"{name:5s} {str(tuple(f.shape)):16s}" + (f" norm {f.norm():10.3f}" if args.model else "") + f" {prompt}")


if __name__ == "__main__":
    main()
