"""Florence-VL: Florence-2 features of depth and breadth, fused (DBFusion), projected, read by an LLM.

    image ─ FlorenceVision ─ [V, V'_1, V'_2, V'_3]   each (B, 577, D)    (florence_encoder.py)
          ─ DBFusion       ─ (B, 577, 4D)  channel concatenation          (this file)
          ─ mm_projector   ─ (B, 577, H)   mlp3x_gelu                     (this file)
    text with one <image> placeholder (id -200) ─ the 577 visual tokens are spliced in its place
          ─ LLM (Phi-3.5-mini or Llama-3.1-8B) ─ logits                   (model.py)

Checkpoints use the official LLaVA layout (`jiuhai/florence-vl-*`): the LLM under its Hugging Face
names, the projector at `model.mm_projector.encoder_mlp.*`, the Florence-2 tower at
`model.vision_tower.vision_tower.*` with Microsoft's original names, and its own config in
`vision_tower/config.json`. What we save loads where the official checkpoints load, and back.
"""
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (CheckpointError, check_state_dict, read_config, read_weights, resolve, save_sharded, shapes,
                        stream_tensors, tensor_shapes, weight_files, write_text_atomic)
from florence_encoder import FlorenceConfig, FlorenceVision, prompt_ids, to_original_state_dict, unused_original_key
from generate import generate
from model import LLM, LLMConfig, add_generation_eos, stored_dtype
from quantize import Int8Linear
from tokenizer import Tokenizer, TokenizerError, load_tokenizer

IMAGE_TOKEN_INDEX = -200  # the <image> placeholder in input_ids
IGNORE_INDEX = -100       # labels that are not supervised
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
LLAVA_ARCH = {"phi3": ("LlavaPhiForCausalLM", "llava_phi"), "llama": ("LlavaLlamaForCausalLM", "llava_llama")}
TEMPLATE_OF = {"phi3": "phi3", "llama": "llama3"}


@dataclass
class FlorenceVLConfig:
    vision: FlorenceConfig
    llm: LLMConfig
    fusion: str = "channel"            # channel | token | average | low (DBFusion below)
    prompts: tuple = (0, 1, 2)         # which task prompts feed the fusion: caption, OCR, region
    projector: str = "mlp3x_gelu"      # linear | mlpNx_gelu
    masked_prompts: bool = False       # official features attend to the prompt pads; True masks them
    image_aspect_ratio: str = "pad"    # pad (finetune) | square (pretrain): see data.py
    template: str | None = None        # plain | llama3 | phi3; None: the LLM family's chat template
    max_length: int | None = None      # tokenizer_model_max_length: the official model cuts longer inputs

    @classmethod
    def from_name(cls, name: str, **overrides) -> "FlorenceVLConfig":
        if name not in FLORENCE_VL_PRESETS:
            raise ValueError(f"unknown Florence-VL preset {name!r}; known: {sorted(FLORENCE_VL_PRESETS)}")
        kwargs = {**FLORENCE_VL_PRESETS[name], **overrides}
        if isinstance(kwargs["vision"], str):
            kwargs["vision"] = FlorenceConfig.from_name(kwargs["vision"])
        if isinstance(kwargs["llm"], str):
            kwargs["llm"] = LLMConfig.from_name(kwargs["llm"])
        return cls(**kwargs)


FLORENCE_VL_PRESETS = {  # keyword arguments of FlorenceVLConfig; vision / llm: preset names of their configs
    "florence-vl-3b": dict(vision="large", llm="phi3.5-mini"),
    "florence-vl-8b": dict(vision="large", llm="llama3.1-8b"),
    "tiny": dict(vision="tiny", llm="tiny-phi3"),  # Phi-3's layout: it speaks the phi3 template
}


class DBFusion(nn.Module):
    """Depth-breadth fusion of the feature sets [V, V'_1, ..., V'_K], each (B, N, D).

    channel: concatenate on channels -> (B, N, (K+1)D)   (the paper's choice)
    token:   concatenate on tokens   -> (B, (K+1)N, D)   (K+1 times the LLM tokens)
    average: mean of the sets        -> (B, N, D)
    low:     V alone                 -> (B, N, D)        (ablation: depth without breadth)
    """
    MODES = ("channel", "token", "average", "low")

    def __init__(self, mode: str = "channel", num_prompts: int = 3):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown fusion {mode!r}; choose one of {self.MODES}")
        self.mode, self.num_sets = mode, 1 if mode == "low" else 1 + num_prompts

    def out_dim(self, d: int) -> int:
        return d * self.num_sets if self.mode == "channel" else d

    def num_tokens(self, n: int) -> int:
        return n * self.num_sets if self.mode == "token" else n

    def forward(self, features: list) -> torch.Tensor:
        if len(features) != self.num_sets:
            raise ValueError(f"{self.mode} fusion expects {self.num_sets} feature sets, got {len(features)}")
        if self.mode == "channel":
            return torch.cat(features, dim=-1)
        if self.mode == "token":
            return torch.cat(features, dim=1)
        if self.mode == "average":
            return torch.stack(features).mean(0)
        return features[0]


class MLPProjector(nn.Module):
    """mlpNx_gelu with the official parameter names: encoder_mlp.0 is the first Linear, then each
    encoder_mlp.i (i >= 1) is a (GELU, Linear) pair, so its Linear is encoder_mlp.i.1."""

    def __init__(self, in_dim: int, hidden: int, depth: int):
        super().__init__()
        pairs = [nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden)) for _ in range(depth - 1)]
        self.encoder_mlp = nn.Sequential(nn.Linear(in_dim, hidden), *pairs)

    def forward(self, x):
        return self.encoder_mlp(x)


def build_projector(kind: str, in_dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, hidden)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector {kind!r}: use 'linear' or 'mlpNx_gelu' (e.g. mlp3x_gelu)")
    return MLPProjector(in_dim, hidden, int(m.group(1)))


@dataclass
class Output:
    logits: torch.Tensor | None = None   # (B, T, vocab), only when no labels are given
    loss: torch.Tensor | None = None     # mean cross-entropy over the supervised tokens
    loss_sum: torch.Tensor | None = None  # its sum, for normalising across micro-steps and ranks


class FlorenceVL(nn.Module):
    def __init__(self, cfg: FlorenceVLConfig, tokenizer: Tokenizer | None = None, template: str | None = None,
                 vision: FlorenceVision | None = None, llm: LLM | None = None):
        """vision / llm: already built (loaded) parts; otherwise randomly initialised from cfg."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template or cfg.template or TEMPLATE_OF[cfg.llm.family]
        self.vision = vision if vision is not None else FlorenceVision(cfg.vision)
        num_prompts = 0 if cfg.fusion == "low" else len(cfg.prompts)
        self.fusion = DBFusion(cfg.fusion, num_prompts)
        self.mm_projector = build_projector(cfg.projector, self.fusion.out_dim(cfg.vision.d_model), cfg.llm.hidden_size)
        self.llm = llm if llm is not None else LLM(cfg.llm)
        ids = prompt_ids()[list(cfg.prompts)] if num_prompts else torch.zeros(0, 1, dtype=torch.long)
        self.register_buffer("prompt_ids", ids, persistent=False)  # (K, 14)

    # ---- vision -> visual tokens -------------------------------------------------------------------
    @property
    def num_visual_tokens(self) -> int:
        return self.fusion.num_tokens(self.vision.num_image_tokens)

    def tower_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vision.parameters())

    def fused_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) -> DBFusion of V and the prompted encoder outputs: (M, N, 4D) for channel fusion."""
        if self.fusion.mode == "low":
            features = [self.vision.image_features(pixel_values)]
        else:
            features = self.vision.multi_prompt_features(pixel_values, prompt_ids=self.prompt_ids,
                                                         masked=self.cfg.masked_prompts)
        return self.fusion(features)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) -> (M, num_visual_tokens, H)."""
        # A frozen tower (stage 2) runs without building a graph: no activations kept for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_trainable()):
            fused = self.fused_features(pixel_values)
        return self.mm_projector(fused)   # (M, N, H)

    def splice(self, input_ids, attention_mask, labels, image_tokens):
        """Put the visual tokens where each sample's <image> placeholder stands; right-pad the batch.

        input_ids (B, T) with at most one -200 per sample; image_tokens (M, Nv, H) for the M samples
        that have a placeholder, in batch order. Returns embeds (B, T', H), mask (B, T'), labels (B, T')."""
        embed = self.llm.embed_tokens
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        has_image = (input_ids == IMAGE_TOKEN_INDEX).sum(1)
        if (has_image > 1).any():
            raise ValueError(f"samples {has_image.gt(1).nonzero().flatten().tolist()} have more than one <image>")
        M = int(has_image.sum())
        n_img = 0 if image_tokens is None else image_tokens.shape[0]
        if M != n_img:
            raise ValueError(f"{M} samples have an <image> placeholder but {n_img} images were given")
        text = embed(input_ids.clamp(min=0))  # the placeholder's row is replaced below
        rows, row_labels, k = [], [], 0
        for b in range(B):
            keep = attention_mask[b].bool()
            ids, emb = input_ids[b][keep], text[b][keep]
            lab = labels[b][keep] if labels is not None else None
            if has_image[b]:
                p = int((ids == IMAGE_TOKEN_INDEX).nonzero())
                img = image_tokens[k].to(emb.dtype)
                k += 1
                emb = torch.cat([emb[:p], img, emb[p + 1:]])
                if lab is not None:
                    lab = torch.cat([lab[:p], lab.new_full((img.shape[0],), IGNORE_INDEX), lab[p + 1:]])
            rows.append(emb)
            row_labels.append(lab)
        T = max(r.shape[0] for r in rows)
        embeds = text.new_zeros(B, T, text.shape[-1])
        mask = attention_mask.new_zeros(B, T)
        new_labels = input_ids.new_full((B, T), IGNORE_INDEX) if labels is not None else None
        for b, r in enumerate(rows):
            embeds[b, :r.shape[0]] = r
            mask[b, :r.shape[0]] = 1
            if new_labels is not None:
                new_labels[b, :r.shape[0]] = row_labels[b]
        return embeds, mask, new_labels

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, labels=None):
        image_tokens = self.encode_images(pixel_values) if pixel_values is not None and len(pixel_values) else None
        return self.splice(input_ids, attention_mask, labels, image_tokens)

    # ---- training / scoring --------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None) -> Output:
        """Logits when no labels are given; otherwise the shifted cross-entropy over the supervised tokens.

        With labels, the lm_head runs only on the positions that are supervised: the (B, T, vocab)
        logits of a 32k-128k vocabulary are the largest tensor of a step and mostly unused."""
        embeds, mask, labels = self.prepare_inputs(input_ids, attention_mask, pixel_values, labels)
        if labels is None:
            return Output(logits=self.llm(inputs_embeds=embeds, attention_mask=mask))
        loss_sum, n = self.supervised_loss(embeds, mask, labels)
        return Output(loss=loss_sum / max(n, 1), loss_sum=loss_sum)

    def supervised_loss(self, embeds, mask, labels) -> tuple[torch.Tensor, int]:
        """(sum of the shifted cross-entropy over the supervised tokens, their number) for spliced inputs."""
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)  # (B, T, H)
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.llm.lm_head(hidden[:, :-1][supervised])  # (n, vocab)
        return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), int(supervised.sum())

    @torch.no_grad()
    def prompt_inputs(self, input_ids, attention_mask=None, pixel_values=None):
        """(embeds, mask) of prompts to answer: spliced, then cut to cfg.max_length (the checkpoint's
        tokenizer_model_max_length) as the official model cuts them, with a warning that names the cut."""
        embeds, mask, _ = self.prepare_inputs(input_ids, attention_mask, pixel_values)
        limit = self.cfg.max_length
        if limit is not None and embeds.shape[1] > limit:
            warnings.warn(f"a prompt of {int(mask.sum(1).max())} tokens ({self.num_visual_tokens} of them visual) "
                          f"is longer than tokenizer_model_max_length {limit} in the checkpoint's config.json: "
                          f"cut to its first {limit} tokens, as the official model does (its end is lost)",
                          stacklevel=2)
            embeds, mask = embeds[:, :limit], mask[:, :limit]
        return embeds, mask

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        """Answer a batch of prompts (with or without images); kwargs go to generate.generate."""
        embeds, mask = self.prompt_inputs(input_ids, attention_mask, pixel_values)
        return generate(self.llm, inputs_embeds=embeds, attention_mask=mask, **kwargs)

    # ---- training stages -----------------------------------------------------------------------------
    def set_stage(self, stage: str):
        """pretrain: everything trains. finetune: projector + LLM train; the tower is frozen (and kept
        in eval mode, so its drop path is off), as in the official recipe."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"unknown stage {stage!r}: pretrain or finetune")
        self.requires_grad_(True)
        if stage == "finetune":
            self.vision.requires_grad_(False)
        return self

    def set_activation_checkpointing(self, on: bool = True):
        """Recompute in backward, instead of keeping, the activations of each LLM block, DaViT block and
        encoder layer (the tower's dominate a stage-1 step at 768 px)."""
        self.llm.grad_checkpointing = self.vision.vision_tower.grad_checkpointing = on
        self.vision.encoder.grad_checkpointing = on
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.tower_trainable():
            self.vision.eval()
        return self

    # ---- checkpoints: the official LLaVA layout ----------------------------------------------------
    def llava_state_dict(self, state_dict: dict | None = None) -> dict:
        """All weights under the official names (see the module docstring). state_dict: our-named tensors
        to convert instead of this module's own (train.py passes the gathered ones under FSDP)."""
        ours = self.state_dict() if state_dict is None else state_dict
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in ours.items() if k.startswith(prefix)}
        sd = dict(self.llm.hf_state_dict(part("llm.")))
        sd.update({PROJECTOR_PREFIX + k: v for k, v in part("mm_projector.").items()})
        sd.update({TOWER_PREFIX + k: v for k, v in to_original_state_dict(part("vision."), self.cfg.vision).items()})
        return sd

    def save_pretrained(self, folder, state_dict: dict | None = None, max_shard_bytes: int = 5 * 10**9):
        """config.json (LLaVA fields + the LLM's), model.safetensors (or, past max_shard_bytes, shards and
        model.safetensors.index.json, as the hub layout), vision_tower/config.json (Florence-2's own, original
        spelling) and the tokenizer. Each file is written atomically, one tensor at a time."""
        lora = any(".lora_" in name for name, _ in self.llm.named_parameters())  # lora.py's LoRALinear pairs
        if lora or any(isinstance(m, Int8Linear) for m in self.llm.modules()):
            raise ValueError("an int8 or LoRA-wrapped LLM is not saved in the official layout: save the model loaded "
                             "without --quantize, or merge the LoRA adapter first (lora.merge_lora_)")
        folder = Path(folder)
        (folder / "vision_tower").mkdir(parents=True, exist_ok=True)
        _write_json(folder / "vision_tower" / "config.json", florence_config_json(self.cfg.vision))
        _write_json(folder / "vision_tower" / "preprocessor_config.json", preprocessor_config_json(self.cfg.vision))
        if self.tokenizer is not None:
            self.tokenizer.save(folder)
        weights = self.llava_state_dict(state_dict)
        save_sharded(weights, folder, max_shard_bytes)
        config = llava_config_json(self.cfg)
        config["torch_dtype"] = str(weights["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        _write_json(folder / "config.json", config)  # last: its presence marks a complete save

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, tower=None, quantize=None) -> "FlorenceVL":
        """A Florence-VL checkpoint (`jiuhai/florence-vl-{3b,8b}-{pretrain,sft}` or one we saved).

        The released repos hold the whole Florence-2 model in their main weights
        (`model.vision_tower.vision_tower.*`): then only the tower's config.json is needed, from the
        checkpoint's vision_tower/, or the repo that mm_vision_tower names (its *.json alone is fetched),
        or, when neither can be had, the tower's sizes are read from the weights' shapes. `tower` (a
        Florence-2 folder or hub id) overrides both, and gives the weights when the main ones lack them.
        The LLM is filled tensor by tensor (no second copy); quantize='int8' makes its Linears int8 as they
        are read (quantize.py). dtype None: as config.json says it is stored."""
        folder = resolve(path_or_repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} is a LoRA adapter (adapter_config.json, no config.json): load it with "
                                  f"lora.from_pretrained, which puts it on its base model (sample.py and eval.py do)")
        hf = read_config(folder)
        if "mm_projector_type" not in hf:
            raise CheckpointError(f"{folder}/config.json has no mm_projector_type: not a Florence-VL (LLaVA) checkpoint")
        files = weight_files(folder)
        tower_shapes = {k.removeprefix(TOWER_PREFIX): s for k, s in tensor_shapes(files).items()
                        if k.startswith(TOWER_PREFIX)}
        vision_cfg, tower_note = _tower_config(folder, hf, tower, tower_shapes)
        try:
            cfg = config_from_llava_json(hf, vision_cfg)
        except (ValueError, NotImplementedError, KeyError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{folder}/config.json: unsupported model "
                                  f"(architectures {hf.get('architectures')}, model_type {hf.get('model_type')!r}): "
                                  f"{e!r}") from e
        add_generation_eos(cfg.llm, folder)
        try:
            tokenizer = load_tokenizer(folder)
        except TokenizerError:
            tokenizer = None  # sample.py and eval.py say what is missing; training can bring its own
        if tokenizer is not None and tokenizer.vocab_size > cfg.llm.vocab_size:
            name = "tokenizer.json" if isinstance(tokenizer, Tokenizer) else "tokenizer.model"
            raise CheckpointError(f"{folder / name} does not match the model: {tokenizer.vocab_size} tokens, but the "
                                  f"embedding has {cfg.llm.vocab_size} rows (vocab_size in {folder}/config.json)")
        dtype = dtype or stored_dtype(hf)
        tower_sd, projector_sd = {}, {}

        def llm_tensors():  # one tensor at a time: the tower's and projector's set aside, the LLM's yielded
            unused = lambda k: k.startswith(TOWER_PREFIX) and unused_original_key(k.removeprefix(TOWER_PREFIX))
            lazy = lambda k: quantize is not None and not k.startswith((TOWER_PREFIX, PROJECTOR_PREFIX))
            for k, t in stream_tensors(files, skip=unused, lazy=lazy):  # Florence-2's decoder is never read
                if k.startswith(TOWER_PREFIX):
                    tower_sd[k.removeprefix(TOWER_PREFIX)] = t
                elif k.startswith(PROJECTOR_PREFIX):
                    projector_sd[k.removeprefix(PROJECTOR_PREFIX)] = t
                else:
                    yield {k: t}

        with torch.device("meta"):
            llm = LLM(cfg.llm)
        llm.load_hf_shards(llm_tensors(), f"{folder} (LLM weights)", dtype, quantize)
        where = "its weights"
        if not tower_sd:  # the tower lives in its own Florence-2 checkpoint
            tower_folder = _tower_weights_folder(path_or_repo_id, folder, hf, tower)
            tower_sd = {k: v for f in weight_files(tower_folder) for k, v in read_weights(f).items()}
            where = str(tower_folder)
        vision = FlorenceVision.from_state_dict(cfg.vision, tower_sd, dtype=dtype,
                                                what=f"Florence-2 tower in {where} ({tower_note})")
        model = cls(cfg, tokenizer, vision=vision, llm=llm).to(dtype)
        check_state_dict(shapes(model.mm_projector.state_dict()), shapes(projector_sd), f"{folder} (mm_projector)")
        model.mm_projector.load_state_dict(projector_sd)
        model.tower_note = tower_note
        return model.eval()

    @classmethod
    def from_parts(cls, florence, llm, tokenizer=None, dtype=None, **overrides) -> "FlorenceVL":
        """Training stage 1 starts here: a Florence-2 checkpoint + an LLM checkpoint + a fresh projector."""
        vision = FlorenceVision.from_pretrained(florence, dtype=dtype)
        llm_model = LLM.from_pretrained(llm, dtype=dtype)
        llm_folder = resolve(llm, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
        if tokenizer is None:
            tokenizer = load_tokenizer(llm_folder)  # as the official training: the slow one when there is one
        cfg = FlorenceVLConfig(vision=vision.cfg, llm=llm_model.cfg, **overrides)
        return cls(cfg, tokenizer, vision=vision, llm=llm_model).to(dtype or torch.float32)


# ---- config.json files ---------------------------------------------------------------------------------
def _write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def florence_config_json(c: FlorenceConfig) -> dict:
    """Florence-2's config.json in Microsoft's original spelling (what `vision_tower/` holds)."""
    v = c.vision
    return {
        "architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": c.pad_token_id, "projection_dim": c.d_model,
        "text_config": {
            "vocab_size": c.vocab_size, "d_model": c.d_model, "encoder_layers": c.encoder_layers,
            "encoder_attention_heads": c.encoder_heads, "encoder_ffn_dim": c.encoder_ffn_dim,
            "max_position_embeddings": c.max_position_embeddings, "pad_token_id": c.pad_token_id,
            "scale_embedding": c.scale_embedding, "activation_function": "gelu", "normalize_before": False,
            "add_final_layer_norm": False, "dropout": c.dropout, "attention_dropout": c.attention_dropout,
            "activation_dropout": c.activation_dropout},
        "vision_config": {
            "model_type": "davit", "dim_embed": list(v.dims), "num_heads": list(v.heads), "num_groups": list(v.groups),
            "depths": list(v.depths), "window_size": v.window, "patch_size": list(v.patch_size),
            "patch_stride": list(v.patch_stride), "patch_padding": list(v.patch_padding),
            "patch_prenorm": list(v.patch_prenorm), "in_channels": v.in_channels, "mlp_ratio": v.mlp_ratio,
            "qkv_bias": v.qkv_bias, "drop_path_rate": v.drop_path_rate, "projection_dim": c.d_model,
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": c.image_pos_embed_size},
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": c.temporal_embed_size},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"]},
    }


def preprocessor_config_json(c: FlorenceConfig) -> dict:
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
            "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "size": {"height": c.image_size, "width": c.image_size}}


def llm_config_json(c: LLMConfig) -> dict:
    """The LLM's fields of a Hugging Face config.json (Phi3Config / LlamaConfig spelling)."""
    out = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
           "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
           "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta, "hidden_act": "silu",
           "attention_bias": False, "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
           "eos_token_id": list(c.eos_token_ids)}
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    if c.rope_type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.low_freq_factor,
                               "high_freq_factor": c.high_freq_factor,
                               "original_max_position_embeddings": c.original_max_position_embeddings}
    elif c.rope_type == "longrope":
        out["original_max_position_embeddings"] = c.original_max_position_embeddings
        out["rope_scaling"] = {"type": "longrope", "short_factor": list(c.short_factor),
                               "long_factor": list(c.long_factor), "factor": c.rope_factor,
                               "attention_factor": c.attention_factor}
    return out


def llava_config_json(cfg: FlorenceVLConfig) -> dict:
    arch, model_type = LLAVA_ARCH[cfg.llm.family]
    out = {"architectures": [arch], "model_type": model_type, **llm_config_json(cfg.llm),
           "mm_projector_type": cfg.projector, "mm_hidden_size": cfg.vision.d_model, "mm_vision_tower": "vision_tower",
           "image_aspect_ratio": cfg.image_aspect_ratio, "mm_vision_select_layer": -1, "use_mm_proj": True,
           # what the official configs do not say: the DBFusion choice of this model and its template
           "florence_vl": {"fusion": cfg.fusion, "prompts": list(cfg.prompts), "masked_prompts": cfg.masked_prompts,
                           "template": cfg.template}}
    if cfg.max_length is not None:
        out["tokenizer_model_max_length"] = cfg.max_length
    return out


def config_from_llava_json(hf: dict, vision: FlorenceConfig) -> FlorenceVLConfig:
    ours = hf.get("florence_vl", {})  # absent in the official checkpoints: their settings are the defaults
    # The official pretrain stage trains with the plain template on images resized to a square
    # (image_aspect_ratio "square"), instruction tuning with the chat template on padded ones ("pad").
    template = ours.get("template") or ("plain" if hf.get("image_aspect_ratio") == "square" else None)
    return FlorenceVLConfig(vision=vision, llm=LLMConfig.from_hf_config(hf), fusion=ours.get("fusion", "channel"),
                            prompts=tuple(ours.get("prompts", (0, 1, 2))), projector=hf["mm_projector_type"],
                            masked_prompts=ours.get("masked_prompts", False),
                            image_aspect_ratio=hf.get("image_aspect_ratio", "pad"), template=template,
                            max_length=hf.get("tokenizer_model_max_length"))


def _tower_sources(folder: Path, hf: dict, tower=None) -> list:
    """(what, where) places for the tower's config, in the order they are tried."""
    if tower is not None:
        return [("--tower", tower)]
    out = [("the checkpoint's vision_tower/", folder / "vision_tower")]
    if hf.get("mm_vision_tower"):
        out.append(("mm_vision_tower in config.json", hf["mm_vision_tower"]))
    return out


def _read_tower_config(tower_folder: Path) -> FlorenceConfig:
    cfg = FlorenceConfig.from_hf_config(read_config(tower_folder))
    pre = tower_folder / "preprocessor_config.json"
    if pre.is_file():
        cfg.image_size = json.loads(pre.read_text()).get("size", {}).get("height", cfg.image_size)
    return cfg


def _tower_config(folder: Path, hf: dict, tower, weight_shapes: dict) -> tuple:
    """(FlorenceConfig, where it came from). Only *.json files are fetched for it."""
    tried = []
    for what, where in _tower_sources(folder, hf, tower):
        try:
            if isinstance(where, Path) and not (where / "config.json").is_file():
                raise CheckpointError(f"{where} has no config.json")
            cfg, note = _read_tower_config(resolve(where, allow_patterns=["*.json"])), f"config from {what} {where}"
            break
        except (CheckpointError, ValueError, KeyError) as e:
            tried.append(f"  {what} ({where}): {e}")
    else:
        if tower is not None or not weight_shapes:
            raise CheckpointError(f"{folder}: no config for the Florence-2 tower; looked at:\n" + "\n".join(tried)
                                  + "\n  give one with --tower FOLDER_OR_HUB_ID (a Florence-2 checkpoint)")
        try:
            cfg = FlorenceConfig.from_shapes(weight_shapes)
        except ValueError as e:
            raise CheckpointError(f"{folder}: no config for the Florence-2 tower, and its weights do not tell the "
                                  f"sizes ({e}); looked at:\n" + "\n".join(tried)) from e
        note = "sizes read from the weights' shapes (no config found: " + "; ".join(t.strip() for t in tried) + ")"
    if cfg.d_model != hf["mm_hidden_size"]:
        raise CheckpointError(f"the tower's width {cfg.d_model} != mm_hidden_size {hf['mm_hidden_size']} in {folder}")
    return cfg, note


def _tower_weights_folder(path_or_repo_id, folder: Path, hf: dict, tower=None) -> Path:
    """Where the tower's weights are when the main weights lack them: --tower, the checkpoint's
    vision_tower/ (fetched now, for a hub repo), or mm_vision_tower."""
    patterns = ["*.json", "*.safetensors", "*.bin"]
    tried = []
    for what, where in _tower_sources(folder, hf, tower):
        try:
            if isinstance(where, Path):  # the checkpoint's own subfolder, fetched now for a hub repo
                where = resolve(path_or_repo_id, allow_patterns=["vision_tower/*"]) / "vision_tower"
                if not where.is_dir():
                    raise CheckpointError("not there")
            found = resolve(where, allow_patterns=patterns)
            weight_files(found)  # raises when there are none
            return found
        except CheckpointError as e:
            tried.append(f"  {what} ({where}): {e}")
    raise CheckpointError(f"{folder}: its weights hold no Florence-2 tower ({TOWER_PREFIX}*) and none was found; "
                          "looked at:\n" + "\n".join(tried) + "\n  give one with --tower FOLDER_OR_HUB_ID")
