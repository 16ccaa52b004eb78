"""Fixture builders for tests/test_released.py, the repository side: the four released Florence-VL repos
(jiuhai/florence-vl-{3b,8b}-{sft,pretrain}) and the two tower repos that the sft configs name, at tiny sizes, file
for file (bf16 weight shards + index, config.json, generation_config.json, the tokenizer files, the pretrain
repos' vision_tower/ folder), written into fake Hugging Face hub caches (`write_caches`). The official side (the
templates and the strings the official code tokenizes, the reference venv's slow tokenizer, the official data
flow and its answers, the lm_head that keeps them far from ties, `build_world`) is tests/released_reference.py,
which imports this file; nothing here imports it.

Sources of the facts used here (cited again where they are used):
  [hub]   the model pages of jiuhai/florence-vl-{3b,8b}-{sft,pretrain} (stored copies), as summarised in the brief
  [conv]  M-Venkatachalam/Florence-VL llava/conversation.py (the templates' system prompts)
  [train] llava/train/train.py                            (tokenizer set-up, saving)
  [proj]  llava/model/multimodal_projector/builder.py     (encoder_mlp.0 / .1.1 / .2.1)
  [facts] ../shared/reference/florence-vl-facts.md        (key names, section 7's name table)

The tiny models keep the real token ids and file layouts; only widths, depths and vocabulary sizes shrink. The
weights are random and bf16-exact; the LLMs' lm_head is left to released_reference.design_lm_head, which shapes
it so that greedy decoding is far from ties. The 8B repos use the real Llama-3 special ids (128000.., <pad>
128256, vocab 128257); the 3B repos a small SentencePiece model with Phi-3's added tokens right after its last
piece, in Phi-3's order.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import reference_env

ROOT = Path(__file__).resolve().parents[1]
FLORENCE_ASSETS = ROOT / "assets" / "florence2"   # Florence-2's config / tokenizer files (MIT), in the repository

# ----------------------------------------------------------------------------------------------
# The four released repos and their towers [hub]

@dataclass(frozen=True)
class RepoSpec:
    repo_id: str
    family: str            # phi3 | llama
    stage: str             # sft | pretrain
    shards: int            # number of model-0000k-of-0000n.safetensors files
    mm_vision_tower: str   # config.json's value
    tower_repo: str | None  # the hub repo that mm_vision_tower names (None: a path on the authors' cluster)
    seed: int

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]

    @property
    def aspect(self) -> str:   # image_aspect_ratio: sft pads to square; pretrain keeps DataArguments' default
        return "pad" if self.stage == "sft" else "square"

    @property
    def template(self) -> str:  # the conversation template the reference answers with (the lead's plan)
        return "plain" if self.stage == "pretrain" else {"phi3": "phi3", "llama": "llama3"}[self.family]


# 3B-pretrain has 2 shards and 8B-sft 4 [hub]; 3B-sft and 8B-pretrain are the same models (2 and 4 assumed).
# The pretrain repos' mm_vision_tower is a path on the authors' cluster [hub] (these two paths are made up in
# that shape); the sft repos name the tower repos.
REPOS = {r.repo_id: r for r in (
    RepoSpec("jiuhai/florence-vl-3b-sft", "phi3", "sft", 2, "jiuhai/florence-phi-vision-tower",
             "jiuhai/florence-phi-vision-tower", seed=11),
    RepoSpec("jiuhai/florence-vl-3b-pretrain", "phi3", "pretrain", 2,
             "/fsx_0/user/jiuhai/model/phi3.5-florence-pretrain/vision_tower", None, seed=12),
    RepoSpec("jiuhai/florence-vl-8b-sft", "llama", "sft", 4, "jiuhai/florence-llama-vision-tower",
             "jiuhai/florence-llama-vision-tower", seed=13),
    RepoSpec("jiuhai/florence-vl-8b-pretrain", "llama", "pretrain", 4,
             "/fsx_0/user/jiuhai/model/llama3.1-florence-pretrain/vision_tower", None, seed=14),
)}
TOWER_REPOS = ("jiuhai/florence-phi-vision-tower", "jiuhai/florence-llama-vision-tower")

# ----------------------------------------------------------------------------------------------
# Tokens

# Phi-3.5-mini-instruct: 32000 SentencePiece pieces, then these at 32000.. (32064 embedding rows). Here the
# SentencePiece model has PHI3_SP_SIZE pieces and the added tokens follow it in the same order.
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
PHI3_SP_SIZE = 700
PHI3_LEN = PHI3_SP_SIZE + len(PHI3_ADDED)          # len(tokenizer): the official builder resizes the LLM to this
PHI3_VOCAB = -(-PHI3_LEN // 64) * 64               # the embedding rows, padded to a multiple of 64 as 32064 is
PHI3_END = PHI3_SP_SIZE + PHI3_ADDED.index("<|end|>")           # "32007": the official eval's only stop id
PHI3_ENDOFTEXT = PHI3_SP_SIZE                                   # "32000": eos / pad of the config


def llama3_special_tokens() -> list:
    """Llama-3.1's 256 special tokens, ids 128000..128255, in order."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return names + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(names))]


LLAMA3_BOS, LLAMA3_EOS = 128000, (128001, 128008, 128009)
LLAMA3_EOT, LLAMA3_PAD, LLAMA3_VOCAB = 128009, 128256, 128257   # Florence-VL added <pad> [train]
LLAMA3_BPE_SIZE = 600      # merged byte-level BPE tokens actually learned; the rest up to 128000 are placeholders
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ----------------------------------------------------------------------------------------------
# A corpus for the tiny tokenizers (no "é": it must fall back to bytes). It holds the system prompts of the
# official conversation templates [conv] and the eval question; released_reference.py builds the templates and
# prompts around them.

SYSTEMS = {
    "phi3": "<|system|>\nYou are a helpful AI assistant.",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
              "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
              "user's questions.",
}
QUESTION = "What is shown in this image?"

WORDS = ("a an the red blue green yellow white black small large old new car cars dog dogs cat cats tree trees "
         "street road house houses sky cloud clouds sun water river boat boats man woman people child children sign "
         "shop shops window door wall table chair book books picture image photo scene park city building light "
         "lights grass field mountain hill snow bird birds flower flowers bike bus train station market food fruit "
         "apple apples bread cup plate open closed day night morning evening near next to behind in on under over "
         "with and or is are was were there this that these those what where which who how many colour color text "
         "word words written says shown see describe question answer sentence left right top bottom middle center "
         "corner front back two three four five one some any all busy quiet bright dark wooden stone glass metal "
         "parked standing sitting walking running flying floating hanging leaning painted printed large tall short "
         "wide narrow clear cloudy sunny rainy winter summer spring autumn").split()


def corpus(n: int = 3000, seed: int = 0) -> list:
    rng = random.Random(seed)
    lines = [SYSTEMS["phi3"], SYSTEMS["llama3"], QUESTION, "You are a helpful AI assistant.", "Describe the picture."]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.3:
            line += rng.choice(["\n", "\n\n", " "]) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        lines.append(line)
    return lines * 2 + [QUESTION, "What colour is the sky?", "The sky is blue and clear."] * 50


# ----------------------------------------------------------------------------------------------
# Phi-3.5's tokenizer files as the official training re-saved them (transformers 4.43, use_fast=False,
# model_max_length=2048, padding_side="right" [train]): tokenizer.model + tokenizer_config.json +
# special_tokens_map.json + added_tokens.json, no tokenizer.json [facts, section 5]

def _added(content, rstrip=False, special=True):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


PHI35_CHAT_TEMPLATE = (  # Phi-3.5-mini-instruct's, carried along by the re-save (not used by the official code)
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
    "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
    "{{ eos_token }}{% endif %}")


def write_phi3_tokenizer(folder: Path):
    """tokenizer.model (a small SentencePiece BPE with Llama-2 / Phi-3's settings, trained in the reference
    environment) and the three JSON files. Added tokens: <unk> <s> (special, no rstrip), </s> (rstrip, NOT
    special), <|endoftext|> (special), then <|assistant|> .. <|user|> (special, rstrip)."""
    folder.mkdir(parents=True, exist_ok=True)
    reference_env.train_sentencepiece(folder, corpus(), vocab_size=PHI3_SP_SIZE)
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>", rstrip=True, special=False)}
    for i, name in enumerate(PHI3_ADDED):
        decoder[str(PHI3_SP_SIZE + i)] = _added(name, rstrip=name != "<|endoftext|>")
    config = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
              "chat_template": PHI35_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 2048, "pad_token": "<|endoftext|>",
              "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
              "unk_token": "<unk>", "use_default_system_prompt": False}
    _json(folder / "tokenizer_config.json", config)
    plain = lambda c: {k: v for k, v in _added(c).items() if k != "special"}  # noqa: E731
    _json(folder / "special_tokens_map.json", {"bos_token": plain("<s>"), "eos_token": plain("<|endoftext|>"),
                                               "pad_token": plain("<|endoftext|>"), "unk_token": plain("<unk>")})
    _json(folder / "added_tokens.json", {name: PHI3_SP_SIZE + i for i, name in enumerate(PHI3_ADDED)},
          sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Llama-3.1's tokenizer files as re-saved after adding <pad> [train]: tokenizer.json (byte-level BPE, its
# post-processor prepends <|begin_of_text|>), tokenizer_config.json, special_tokens_map.json

LLAMA31_CHAT_TEMPLATE = (  # abridged from Llama-3.1-8B-Instruct's (its system / tools parts left out)
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt "
    "%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


def write_llama3_tokenizer(folder: Path):
    """A byte-level BPE trained on the corpus (LLAMA3_BPE_SIZE tokens), padded with unreachable placeholder
    entries up to 128000 (tokenizers numbers added tokens after the model's vocabulary, whatever ids the JSON
    gives them, so the real ids need a 128000-entry vocabulary), Llama-3's 256 specials and <pad> = 128256."""
    import tokenizers
    from tokenizers import Regex, models, pre_tokenizers, trainers
    folder.mkdir(parents=True, exist_ok=True)
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=LLAMA3_BPE_SIZE, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    assert list(vocab.values()) == list(range(len(vocab)))
    for i in range(len(vocab), LLAMA3_BOS):
        vocab[f"<|unused_bpe_{i}|>"] = i   # two punctuation marks then letters: no pre-token is ever this string
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]   # the "a b" form of 0.19
    specials = llama3_special_tokens() + ["<pad>"]
    added = [{"id": LLAMA3_BOS + i, **_added(t)} for i, t in enumerate(specials)]
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|begin_of_text|>",
                                                                                       "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [LLAMA3_BOS],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    config = {"added_tokens_decoder": {str(a["id"]): _added(a["content"]) for a in added},
              "bos_token": "<|begin_of_text|>", "chat_template": LLAMA31_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 2048, "pad_token": "<pad>",
              "padding_side": "right", "tokenizer_class": "PreTrainedTokenizerFast"}
    _json(folder / "tokenizer_config.json", config)
    plain = lambda c: {k: v for k, v in _added(c).items() if k != "special"}  # noqa: E731
    _json(folder / "special_tokens_map.json", {"bos_token": plain("<|begin_of_text|>"),
                                               "eos_token": plain("<|eot_id|>"), "pad_token": plain("<pad>")})


# ----------------------------------------------------------------------------------------------
# The tiny Florence-2 tower: the shapes of our FlorenceConfig.from_name("tiny") (DaViT widths 16..64, heads =
# groups = 1..4, window 3; a 2-layer BART encoder of width 32, 2 heads), with a position table long enough for
# 768x768 images (577 tokens + 14 prompt tokens) and the real 51289-token vocabulary. A loader that finds no
# tower config reads what the weights show and must take head counts and window from the preset that the stage
# widths match (tiny here, large in the releases).

TOWER = dict(dims=(16, 32, 48, 64), heads=(1, 2, 3, 4), depths=(1, 1, 2, 1), window=3, d_model=32,
             layers=2, heads_text=2, ffn=64, max_positions=1024, vocab=51289, image_size=768)


def florence2_native(seed: int):
    """A transformers Florence2ForConditionalGeneration (native names) with bf16-exact random weights: norms
    1 + 0.2 N(0,1), biases 0.1 N(0,1), embeddings 0.5 N(0,1), matrices N(0, 0.25 / fan_in) (a smaller scale than
    tests/helpers.randomize_ keeps the tower's bf16 error to ~1% while images still differ clearly)."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration
    t = TOWER
    vision = dict(embed_dim=list(t["dims"]), num_heads=list(t["heads"]), num_groups=list(t["heads"]),
                  depths=list(t["depths"]), window_size=t["window"], patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2],
                  patch_padding=[3, 1, 1, 1], patch_prenorm=[False, True, True, True], drop_path_rate=0.0,
                  projection_dim=t["d_model"], max_position_embeddings=50, max_temporal_embeddings=100)
    text = dict(model_type="bart", vocab_size=t["vocab"], d_model=t["d_model"], encoder_layers=t["layers"],
                encoder_attention_heads=t["heads_text"], encoder_ffn_dim=t["ffn"], decoder_layers=t["layers"],
                decoder_attention_heads=t["heads_text"], decoder_ffn_dim=t["ffn"],
                max_position_embeddings=t["max_positions"], dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, scale_embedding=False)
    # image_token_id: transformers' placeholder; never used here (the reference builds the encoder input itself)
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=t["vocab"])
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name or "shared" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.5 * p[0].numel() ** -0.5)
            p.copy_(p.bfloat16().float())
        for b in model.buffers():
            b.copy_(b.bfloat16().float())   # the checkpoint holds the cosine table in bf16 too
    return model


def native_to_original(sd: dict) -> dict:
    """transformers-native Florence-2 names -> Microsoft's original ones (facts, section 7), the whole model:
    DaViT, projection, the BART encoder, decoder and LM head, the tied copies of `shared` as separate tensors,
    and final_logits_bias (zeros)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            k = "vision_tower." + k[len("model.vision_tower."):]
            k = re.sub(r"convs\.(\d+)\.conv\.", r"convs.\1.proj.", k)
            k = re.sub(r"\.(conv[12])\.(weight|bias)$", r".\1.fn.dw.\2", k)
            k = k.replace("spatial_block.norm1.", "spatial_block.window_attn.norm.")
            k = k.replace("channel_block.norm1.", "channel_block.channel_attn.norm.")
            k = re.sub(r"(window_attn|channel_attn)\.(qkv|proj)\.", r"\1.fn.\2.", k)
            k = k.replace("_block.norm2.", "_block.ffn.norm.")
            k = re.sub(r"ffn\.(fc[12])\.", r"ffn.fn.net.\1.", k)
        elif k == "model.multi_modal_projector.image_projection.weight":
            k, v = "image_projection", v.t()                      # (in, out), used as x @ W
        elif k.startswith("model.multi_modal_projector."):
            k = k[len("model.multi_modal_projector."):].replace("image_position_embed.", "image_pos_embed.")
        elif k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        else:
            raise KeyError(f"unexpected Florence-2 key {k}")
        out[k] = v.contiguous().clone()
    shared = out["language_model.model.shared.weight"]
    for copy_name in ("language_model.model.encoder.embed_tokens.weight",
                      "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight"):
        out[copy_name] = shared.clone()
    out["language_model.final_logits_bias"] = torch.zeros(1, shared.shape[0])
    return out


def original_order(keys) -> list:
    """The order of the original module tree: DaViT, image projection / norm / position / temporal, then the
    language model (shared, encoder, decoder, lm_head, final_logits_bias)."""
    rank = [("vision_tower.", 0), ("image_projection", 1), ("image_proj_norm.", 2), ("image_pos_embed.", 3),
            ("visual_temporal_embed.", 4), ("language_model.model.shared", 5), ("language_model.model.encoder.", 6),
            ("language_model.model.decoder.", 7), ("language_model.lm_head", 8), ("language_model.final", 9)]
    return sorted(keys, key=lambda k: next(r for p, r in rank if k.startswith(p)))   # stable within a group


def tower_parameters_only(original: dict) -> dict:
    """What the official save writes to vision_tower/pytorch_model.bin: torch.save of the tower's
    named_parameters() [train], so no buffers (final_logits_bias, the cosine table) and each tied parameter once,
    under its first name (language_model.model.shared.weight)."""
    drop = ("language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
            "language_model.lm_head.weight", "language_model.final_logits_bias",
            "visual_temporal_embed.pos_idx_to_embed")
    return {k: v for k, v in original.items() if k not in drop}


def tower_config_json() -> dict:
    """Florence-2's config.json in Microsoft's spelling (custom code florence2), with the tiny sizes."""
    cfg = json.loads((FLORENCE_ASSETS / "config.json").read_text())
    t = TOWER
    cfg["projection_dim"] = t["d_model"]
    cfg["text_config"].update(d_model=t["d_model"], encoder_layers=t["layers"], decoder_layers=t["layers"],
                              num_hidden_layers=t["layers"], encoder_attention_heads=t["heads_text"],
                              decoder_attention_heads=t["heads_text"], encoder_ffn_dim=t["ffn"],
                              decoder_ffn_dim=t["ffn"], max_position_embeddings=t["max_positions"])
    cfg["vision_config"].update(dim_embed=list(t["dims"]), num_heads=list(t["heads"]), num_groups=list(t["heads"]),
                                depths=list(t["depths"]), window_size=t["window"], projection_dim=t["d_model"])
    cfg["torch_dtype"] = "bfloat16"
    cfg["transformers_version"] = "4.43.1"
    return cfg


def florence_tokenizer_files() -> dict:
    """name -> bytes of Florence-2's tokenizer files (vocab.json and merges.txt written from tokenizer.json)."""
    tok = json.loads((FLORENCE_ASSETS / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
                "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer.json": (FLORENCE_ASSETS / "tokenizer.json").read_bytes(),
            "tokenizer_config.json": (FLORENCE_ASSETS / "tokenizer_config.json").read_bytes(),
            "vocab.json": json.dumps(tok["model"]["vocab"], ensure_ascii=False).encode(),
            "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
            "special_tokens_map.json": json.dumps(specials, indent=2).encode()}


# ----------------------------------------------------------------------------------------------
# Tiny LLMs with the real config fields

H = 64   # LLM width of both tiny families


def llm_config_fields(family: str) -> dict:
    """The LLM half of config.json, in transformers 4.43's spelling (rope_scaling, rope_theta at the top)."""
    if family == "phi3":   # Phi-3.5-mini-instruct's fields, tiny sizes; LongRoPE with the real context lengths
        g = torch.Generator().manual_seed(1)
        half = H // 4 // 2
        return {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
                "eos_token_id": PHI3_ENDOFTEXT, "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02,
                "intermediate_size": 128, "max_position_embeddings": 131072, "num_attention_heads": 4,
                "num_hidden_layers": 2, "num_key_value_heads": 4, "original_max_position_embeddings": 4096,
                "pad_token_id": PHI3_ENDOFTEXT, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
                "rope_scaling": {"long_factor": [round(x, 4) for x in (1 + 7 * torch.rand(half, generator=g)).tolist()],
                                 "short_factor": [round(x, 4) for x in (1 + torch.rand(half, generator=g)).tolist()],
                                 "type": "longrope"},
                "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": PHI3_VOCAB}
    return {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": LLAMA3_BOS,
            "eos_token_id": list(LLAMA3_EOS), "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02,
            "intermediate_size": 160, "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 4,
            "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": LLAMA3_PAD, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": LLAMA3_VOCAB}


def hf_llm(family: str, vocab_size: int | None = None):
    """The transformers 5 model of those fields (eager attention), vocab_size overridable."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
    f = dict(llm_config_fields(family))
    rope = dict(f.pop("rope_scaling"))
    kind = rope.pop("type", None) or rope.pop("rope_type")
    rope.update(rope_type=kind, rope_theta=f.pop("rope_theta"))
    if vocab_size is not None:
        f["vocab_size"] = vocab_size
    keep = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings", "vocab_size", "original_max_position_embeddings", "sliding_window"}
    kwargs = {k: v for k, v in f.items() if k in keep}
    if kwargs.get("pad_token_id", 0) >= kwargs["vocab_size"]:
        kwargs["pad_token_id"] = None
    cls, cfg_cls = (Phi3ForCausalLM, Phi3Config) if family == "phi3" else (LlamaForCausalLM, LlamaConfig)
    cfg = cfg_cls(rope_parameters=rope, **kwargs)
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


def random_llm_body(family: str, seed: int):
    """Random bf16-exact weights (lm_head left for design_lm_head): norms 1 + 0.2 N(0,1), embeddings N(0,1),
    q/k N(0, 1/fan_in), v/o N(0, 2.25/fan_in), MLP N(0, 0.25/fan_in). The scales are a compromise measured on
    this tower: a last prompt position that the visual tokens move by several times its bf16 error, without the
    chaos of larger weights."""
    model = hf_llm(family)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in name:
                p.normal_(0, 1)
            elif "lm_head" in name:
                p.zero_()
            elif "qkv_proj" in name:   # Phi-3: q, k, v rows stacked
                q = model.config.num_attention_heads * (H // model.config.num_attention_heads)
                p.normal_(0, p.shape[1] ** -0.5)
                p[2 * q:] *= 1.5
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0, p.shape[1] ** -0.5)
            elif "v_proj" in name or "o_proj" in name:
                p.normal_(0, 1.5 * p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.5 * p.shape[1] ** -0.5)
            p.copy_(p.bfloat16().float())
    return model


def projector_weights(seed: int) -> dict:
    """mlp3x_gelu under the official names [proj]: encoder_mlp.0 (4D -> H), .1.1 and .2.1 (H -> H)."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, fan_in in (("encoder_mlp.0", 4 * TOWER["d_model"]), ("encoder_mlp.1.1", H), ("encoder_mlp.2.1", H)):
        w[name + ".weight"] = (torch.randn(H, fan_in, generator=g) * 1.5 / fan_in ** 0.5).bfloat16().float()
        w[name + ".bias"] = (0.1 * torch.randn(H, generator=g)).bfloat16().float()
    return w


# ----------------------------------------------------------------------------------------------
# Writing repos in the hub cache layout: models--owner--name/{blobs, snapshots/<commit>, refs/main,
# trees/<commit>.json}. The tree listing (huggingface_hub >= 2 caches it) names every file of the repo, also
# those that were not downloaded: offline, snapshot_download then refuses a request for a missing file.

def _json(path: Path, obj, sort_keys=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def write_cache_repo(cache: Path, repo_id: str, files: dict, listed_only: dict | None = None) -> Path:
    """files: path in repo -> bytes (downloaded); listed_only: path -> size (in the repo, not downloaded).
    Returns the snapshot folder."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit_of(repo_id)
    snapshot = repo_dir / "snapshots" / commit
    entries = {}
    for name, data in sorted(files.items()):
        sha = hashlib.sha256(data).hexdigest()
        lfs = name.endswith((".safetensors", ".bin", ".model"))
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo_dir / "blobs" / (sha if lfs else blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*([".."] * (len(Path(name).parts) + 1))) / "blobs" / blob.name)
        entries[name] = {"size": len(data), "blob_id": blob_id, **({"lfs_sha256": sha, "lfs_size": len(data)}
                                                                    if lfs else {})}
    for name, size in (listed_only or {}).items():
        fake = hashlib.sha256(f"{repo_id}/{name}".encode()).hexdigest()
        entries[name] = {"size": size, "blob_id": fake[:40], **({"lfs_sha256": fake, "lfs_size": size}
                                                                if name.endswith((".bin", ".safetensors")) else {})}
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    _json(repo_dir / "trees" / f"{commit}.json", {"format_version": 1, "files": dict(sorted(entries.items()))})
    return snapshot


def shard(sd: dict, n: int) -> tuple:
    """save_pretrained's sharding, by bytes in state-dict order: ({file: {key: tensor}}, index.json dict)."""
    total = sum(v.numel() * v.element_size() for v in sd.values())
    cap = -(-total // n)
    files, current, size = [], {}, 0
    for k, v in sd.items():
        b = v.numel() * v.element_size()
        if current and size + b > cap and len(files) < n - 1:
            files.append(current)
            current, size = {}, 0
        current[k], size = v, size + b
    files.append(current)
    assert len(files) == n, f"{n} shards wanted, {len(files)} made"
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for i, f in enumerate(files) for k in f}}
    return dict(zip(names, files)), index


def safetensors_bytes(sd: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in sd.items()}, metadata={"format": "pt"})


def llava_config(spec: RepoSpec) -> dict:
    """config.json: the LLM's fields, then what LLaVA's training adds [train] (tokenizer_model_max_length,
    tokenizer_padding_side, tune_*, use_mm_proj, use_cache false and the dtype are inferred from
    llava/train/train.py, not seen on the hub pages)."""
    arch, model_type = {"phi3": ("LlavaPhiForCausalLM", "llava_phi"), "llama": ("LlavaLlamaForCausalLM",
                                                                               "llava_llama")}[spec.family]
    cfg = {"_name_or_path": f"/fsx_0/user/jiuhai/checkpoints/{spec.name}", "architectures": [arch]}
    if spec.family == "phi3":
        cfg["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config",
                           "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    cfg.update(llm_config_fields(spec.family))
    cfg.update({"freeze_mm_mlp_adapter": False, "image_aspect_ratio": spec.aspect, "mm_hidden_size": TOWER["d_model"],
                "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp3x_gelu",
                "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2, "mm_vision_tower": spec.mm_vision_tower, "model_type": model_type,
                "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
                "transformers_version": "4.43.1", "tune_entire_model": spec.stage == "pretrain",
                "tune_mm_mlp_adapter": False, "use_cache": False, "use_mm_proj": True})
    return dict(sorted(cfg.items()))


def generation_config(family: str) -> dict:
    """What save_pretrained writes from the base model's generation_config (inferred: transformers saves it with
    every model that can generate)."""
    if family == "phi3":
        return {"_from_model_config": True, "bos_token_id": 1,
                "eos_token_id": [PHI3_END, PHI3_SP_SIZE + 1, PHI3_ENDOFTEXT], "pad_token_id": PHI3_ENDOFTEXT,
                "transformers_version": "4.43.1"}
    return {"bos_token_id": LLAMA3_BOS, "do_sample": True, "eos_token_id": list(LLAMA3_EOS), "temperature": 0.6,
            "top_p": 0.9, "transformers_version": "4.43.1"}


GITATTRIBUTES = (b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.model filter=lfs diff=lfs merge=lfs -text\n"
                 b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                 b"tokenizer.json filter=lfs diff=lfs merge=lfs -text\n")
MODELING_STUB = (b"# The authors' modified Florence-2 modeling code (custom code, trust_remote_code) stands here\n"
                 b"# in the release. Stand-in: a loader must neither need nor run it.\n"
                 b"raise RuntimeError('custom code was run')\n")


def repo_files(spec: RepoSpec, weights: dict, tokenizer_dir: Path, tower_original: dict, with_tower: bool = True,
               shards: int | None = None) -> dict:
    """path -> bytes of one released repo. weights: the LLM's and projector's HF-named tensors (bf16)."""
    files = {".gitattributes": GITATTRIBUTES, "README.md": _readme(spec).encode(),
             "config.json": (json.dumps(llava_config(spec), indent=2) + "\n").encode(),
             "generation_config.json": (json.dumps(generation_config(spec.family), indent=2) + "\n").encode()}
    for f in sorted(tokenizer_dir.iterdir()):
        files[f.name] = f.read_bytes()
    # the state-dict order of LlavaPhiForCausalLM / LlavaLlamaForCausalLM: the decoder's embed_tokens, layers and
    # norm, then the modules LlavaMetaModel adds (vision_tower, mm_projector), then lm_head
    state = {k: v for k, v in weights.items() if not k.startswith(("lm_head.", "model.mm_projector."))}
    if with_tower:
        state.update({"model.vision_tower.vision_tower." + k: tower_original[k]
                      for k in original_order(tower_original)})
    state.update({k: v for k, v in weights.items() if k.startswith("model.mm_projector.")})
    state["lm_head.weight"] = weights["lm_head.weight"]
    shards, index = shard({k: v.to(torch.bfloat16) for k, v in state.items()}, shards or spec.shards)
    for name, sd in shards.items():
        files[name] = safetensors_bytes(sd)
    files["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    if spec.stage == "pretrain":   # "The repository also includes the Pretrained Vision Tower" [hub]
        files.update(tower_folder_files(prefix="vision_tower/"))
        buf = _torch_save_bytes({k: v.to(torch.bfloat16) for k, v in tower_parameters_only(tower_original).items()})
        files["vision_tower/pytorch_model.bin"] = buf
        files["vision_tower/modeling_florence2.py"] = MODELING_STUB
    return files


def tower_folder_files(prefix: str = "") -> dict:
    pre = json.loads((FLORENCE_ASSETS / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": TOWER["image_size"], "width": TOWER["image_size"]}
    out = {"config.json": (json.dumps(tower_config_json(), indent=2) + "\n").encode(),
           "preprocessor_config.json": (json.dumps(pre, indent=2) + "\n").encode(), **florence_tokenizer_files()}
    return {prefix + k: v for k, v in out.items()}


def tower_repo_files() -> tuple:
    """(downloaded, listed_only) of a tower repo: only its *.json files are in the cache; the weights
    (~1.5 GB pytorch_model.bin), merges.txt and the custom code are listed by the hub but not downloaded."""
    everything = tower_folder_files()
    downloaded = {k: v for k, v in everything.items() if k.endswith(".json")}
    listed = {k: len(v) for k, v in everything.items() if not k.endswith(".json")}
    listed.update({"pytorch_model.bin": 1_543_000_000, "modeling_florence2.py": 125_000,
                   "configuration_florence2.py": 15_000, "processing_florence2.py": 46_000, "README.md": 1_000,
                   ".gitattributes": 1_500})
    return downloaded, listed


def _torch_save_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _readme(spec: RepoSpec) -> str:
    text = f"---\nlicense: mit\n---\n# {spec.name} (a tiny random stand-in built by tests/released.py)\n"
    if spec.stage == "pretrain":
        text += "\nThe repository also includes the Pretrained Vision Tower (vision_tower/).\n"
    return text


# ----------------------------------------------------------------------------------------------
# The caches: every repo, and the variants without the tower

def write_caches(cache: Path, cache_no_tower_repo: Path, cache_no_tower: Path, cache_no_tower_json: Path,
                 weights: dict, tokenizer_dirs: dict, tower_original: dict) -> dict:
    """cache: the four repos and both tower repos (*.json only); cache_no_tower_repo: the four repos (links into
    `cache`), no tower repo; cache_no_tower: 8b-sft without the tower in its shards, no tower repo;
    cache_no_tower_json: the same 8b-sft, the tower repo with *.json only. weights: repo id -> the LLM's and
    projector's HF-named tensors; tokenizer_dirs: family -> folder; tower_original: repo id -> the Florence-2
    tower under its original names. Returns repo id -> snapshot folder."""
    snapshots = {}
    for repo_id, w in weights.items():
        spec = REPOS[repo_id]
        files = repo_files(spec, w, tokenizer_dirs[spec.family], tower_original[repo_id])
        snapshots[repo_id] = write_cache_repo(cache, repo_id, files)
        if repo_id == "jiuhai/florence-vl-8b-sft":
            bare = repo_files(spec, w, tokenizer_dirs[spec.family], tower_original[repo_id], with_tower=False,
                              shards=2)   # without the tower, the two vocabulary matrices make two shards
            write_cache_repo(cache_no_tower, repo_id, bare)
            write_cache_repo(cache_no_tower_json, repo_id, bare)
    downloaded, listed = tower_repo_files()
    for repo_id in TOWER_REPOS:
        write_cache_repo(cache, repo_id, downloaded, listed)
    write_cache_repo(cache_no_tower_json, "jiuhai/florence-llama-vision-tower", downloaded, listed)
    cache_no_tower_repo.mkdir()
    for repo_id in REPOS:
        name = "models--" + repo_id.replace("/", "--")
        (cache_no_tower_repo / name).symlink_to(cache / name)
    return snapshots
