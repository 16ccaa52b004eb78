"""Fixture builders for tests/test_released.py: the four released Florence-VL repos at tiny sizes, served from a
fake Hugging Face hub cache, and the answers the official code gives on them, computed from transformers parts.

Sources of the facts used here (cited again where they are used):
  [hub]   the model pages of jiuhai/florence-vl-{3b,8b}-{sft,pretrain} (stored copies), as summarised in the brief
  [conv]  M-Venkatachalam/Florence-VL llava/conversation.py (templates, SeparatorStyle.MPT / PLAIN)
  [mm]    llava/mm_utils.py                               (tokenizer_image_token, expand2square, process_images)
  [vqa]   llava/eval/model_vqa_loader.py                  (prompt, eos_token_id=[32007], decoding, answers file)
  [train] llava/train/train.py                            (preprocess_multimodal / _plain, tokenizer set-up, saving)
  [build] llava/model/builder.py                          (use_fast=False, resize_token_embeddings(len(tokenizer)))
  [enc]   llava/model/multimodal_encoder/florence_encoder.py (the (3, 14) task prompt ids, one batch, no mask)
  [proj]  llava/model/multimodal_projector/builder.py     (cat(V, V'), then encoder_mlp.0 / .1.1 / .2.1)
  [facts] ../shared/reference/florence-vl-facts.md        (key names, section 7's name table)

The tiny models keep the real token ids and file layouts; only widths, depths and vocabulary sizes shrink. The
weights are random but shaped so that greedy decoding is far from ties, in bf16 as well as fp32 (see
`design_lm_head`): every answer is one image-dependent decision (the first token) followed by a fixed chain of
tokens with large margins. The 8B repos use the real Llama-3 special ids (128000.., <pad> 128256, vocab 128257);
the 3B repos a small SentencePiece model with Phi-3's added tokens right after its last piece, in Phi-3's order.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import reference_env
from helpers import IMAGE_TOKEN_INDEX

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
# The official conversation templates [conv], the eval prompt [vqa] and the training preprocessing [train],
# written from their behaviour

SYSTEMS = {
    "phi3": "<|system|>\nYou are a helpful AI assistant.",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
              "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
              "user's questions.",
}
ROLES = {"phi3": ("\n<|user|>\n", "\n<|assistant|>\n"),
         "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")}
SEPS = {"phi3": "<|end|>", "llama3": "<|eot_id|>"}


def get_prompt(template: str, messages: list) -> str:
    """Conversation.get_prompt for [(role_index, message or None), ...]: MPT style (phi3, llama3) is
    system + sep + per message role + message + sep, a None message giving the bare role; PLAIN (plain) is the
    messages alone, each followed by seps[i % 2] = ('\\n', None): a plain assistant message is a TypeError there."""
    if template == "plain":
        out, seps = "", ("\n", None)
        for i, (_, message) in enumerate(messages):
            if message:
                out += message + seps[i % 2]
        return out
    out = SYSTEMS[template] + SEPS[template]
    for role, message in messages:
        out += ROLES[template][role] + message + SEPS[template] if message else ROLES[template][role]
    return out


def move_image_first(value: str) -> str:
    """preprocess_multimodal on one turn that holds <image>: "<image>\\n" + the rest, stripped [train]."""
    return ("<image>\n" + value.replace("<image>", "").strip()).strip() if "<image>" in value else value


def eval_prompt(template: str, question: str) -> str:
    """model_vqa_loader: qs = "<image>\\n" + text; the user turn, an empty assistant turn, get_prompt() [vqa]."""
    return get_prompt(template, [(0, "<image>\n" + question), (1, None)])


def history_prompt(template: str, conversations: list) -> str:
    """A prompt after some turns, built as the eval builds one (the turns, then an empty assistant turn), with
    <image> moved to the front of its turn as in training (what tokenize_prompt promises)."""
    messages = [(0 if t["from"] == "human" else 1, move_image_first(t["value"])) for t in conversations]
    return get_prompt(template, messages + [(1, None)])


def training_text(template: str, conversations: list) -> str:
    """The string that the official training tokenizes (has_image=True) [train]: preprocess_multimodal, then
    preprocess_plain ("<image>" + caption + "\\n") or conv.get_prompt() of all turns."""
    if template == "plain":
        assert len(conversations) == 2 and "<image>" in conversations[0]["value"]
        return "<image>" + conversations[1]["value"] + "\n"
    return get_prompt(template, [(0 if t["from"] == "human" else 1, move_image_first(t["value"]))
                                 for t in conversations])


def supervised_prefixes(template: str, conversations: list) -> list:
    """(start, end) strings around each reply of a chat template: the tokens of prefix `end` minus those of
    prefix `start` are the reply and its end token, the only supervised ones (facts, section 4)."""
    out, messages = [], []
    for t in conversations:
        role = 0 if t["from"] == "human" else 1
        if role == 1:
            before = get_prompt(template, messages + [(1, None)])
            out.append((before, before + t["value"] + SEPS[template]))
        messages.append((role, move_image_first(t["value"])))
    return out


# decoded by the official stack: Llama-3.1's tokenizer_config has clean_up_tokenization_spaces true, which
# transformers 4.43 applies (" ," -> ",", " ?" -> "?", " ' s" ...); the 3B's has it false
DECODE_PROBE = "Red car , blue sky . Is it ? It ' s fine , isn't it ! Yes"
QUESTION = "What is shown in this image?"
QUESTION_2 = "Describe the café sign in one sentence."    # é: byte fallback (3B), two byte-level tokens (8B)

# Conversations for the tokenization tests: one turn; several turns; <image> at the end of the question
RECORDS = {
    "single": [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "A red car near a tree."}],
    "multi": [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "A red car."},
              {"from": "human", "value": "What colour is the sky?"},
              {"from": "gpt", "value": "The sky is blue and clear."}],
    "image_last": [{"from": "human", "value": QUESTION_2 + "\n<image>"},
                   {"from": "gpt", "value": "It says open all day."}],
}
PLAIN_RECORD = [{"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": "A busy street with shops and people."}]
PROMPTS = {  # conversations ending with a human turn, for tokenize_prompt
    "single": [{"from": "human", "value": "<image>\n" + QUESTION}],
    "history": [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "A red car."},
                {"from": "human", "value": QUESTION_2}],
    "image_last": [{"from": "human", "value": QUESTION_2 + "\n<image>"}],
}


def piecewise_prompt(template: str, question: str) -> list:
    """The eval prompt of `question` cut into its template pieces (system block, role prefixes, message text,
    <image>): a negative control, tokenized piece by piece."""
    user, assistant = ROLES[template]
    return [SYSTEMS[template] + SEPS[template], user, "<image>", "\n" + question, SEPS[template], assistant]


def reference_strings(family: str) -> dict:
    """key -> the string the official code tokenizes with tokenizer_image_token (and, for the negative controls,
    deliberately wrong ones)."""
    chat = {"phi3": "phi3", "llama": "llama3"}[family]
    out = {}
    for template in (chat, "plain"):
        for q in (QUESTION, QUESTION_2):
            out[f"eval/{template}/{q}"] = eval_prompt(template, q)
    for name, conv in PROMPTS.items():
        out[f"prompt/{chat}/{name}"] = history_prompt(chat, conv)
    out["prompt/plain/single"] = eval_prompt("plain", QUESTION)
    for name, conv in RECORDS.items():
        out[f"train/{chat}/{name}"] = training_text(chat, conv)
        for i, (a, b) in enumerate(supervised_prefixes(chat, conv)):
            out[f"span/{chat}/{name}/{i}/start"], out[f"span/{chat}/{name}/{i}/end"] = a, b
    out["train/plain/plain"] = training_text("plain", PLAIN_RECORD)
    out["train/plain/image_only"] = "<image>"   # preprocess_plain masks len(tokenizer_image_token("<image>"))
    out["probe/decode"] = DECODE_PROBE
    # negative controls: <image> left where the user wrote it; (piecewise) the template pieces tokenized one by one
    # and concatenated, which differs from the official whole-string tokenization for SentencePiece
    out[f"wrong/{chat}/image_in_place"] = get_prompt(chat, [(0 if t["from"] == "human" else 1, t["value"])
                                                            for t in RECORDS["image_last"]])
    return out


# ----------------------------------------------------------------------------------------------
# A corpus for the tiny tokenizers (no "é": it must fall back to bytes)

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
# Reference tokenization in the official stack (transformers 4.43.1, tokenizers 0.19.1, sentencepiece 0.1.99):
# AutoTokenizer.from_pretrained(folder, use_fast=False) [build] -- the slow LlamaTokenizer for the 3B files,
# PreTrainedTokenizerFast for the 8B ones (Llama-3 has no slow tokenizer)

REFERENCE_TOKENIZE = r"""
import json, sys
from transformers import AutoTokenizer
jobs, out = json.load(sys.stdin), []
for job in jobs:
    tok = AutoTokenizer.from_pretrained(job["folder"], use_fast=False)

    def image_token_ids(prompt):
        # mm_utils.tokenizer_image_token: each chunk around <image> tokenized on its own; a leading BOS of the
        # first chunk kept once, the first `offset` ids of every chunk (their BOS) dropped, -200 in between
        chunks = [tok(c).input_ids for c in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend(([-200] * (offset + 1))[offset:])
            ids.extend(chunk[offset:])
        return ids

    res = {"class": type(tok).__name__, "len": len(tok), "bos": tok.bos_token_id,
           "specials": {t: tok.convert_tokens_to_ids(t) for t in job.get("specials", [])},
           "ids": {k: image_token_ids(s) for k, s in job.get("strings", {}).items()},
           "piecewise": {k: [i for p in pieces for i in ([-200] if p == "<image>" else
                                                         tok(p, add_special_tokens=False).input_ids)]
                         for k, pieces in job.get("piecewise", {}).items()},
           "decoded": [tok.batch_decode([ids], skip_special_tokens=True)[0].strip().replace(" <|end|>", "")
                       for ids in job.get("decode", [])]}
    if job.get("pieces"):
        res["pieces"] = tok.convert_ids_to_tokens(list(range(job["pieces"])))
    out.append(res)
print(json.dumps(out))
"""


def reference_tokenize(jobs: list) -> list:
    """One reference-environment process for all jobs: [{folder, strings: {key: str}, decode: [[ids]],
    specials: [token], pieces: n}] -> [{class, len, bos, specials, ids: {key: ids}, decoded: [str], pieces}].
    decoded: batch_decode(skip_special_tokens=True)[0].strip().replace(" <|end|>", "") [vqa]."""
    return reference_env.run(REFERENCE_TOKENIZE, [{k: (str(v) if k == "folder" else v) for k, v in j.items()}
                                                  for j in jobs], timeout=600)


# ----------------------------------------------------------------------------------------------
# The tiny Florence-2 tower: the shapes of our FlorenceConfig.from_name("tiny") (DaViT widths 16..64, heads =
# groups = 1..4, window 3; a 2-layer BART encoder of width 32, 2 heads), with a position table long enough for
# 768x768 images (577 tokens + 14 prompt tokens) and the real 51289-token vocabulary. A loader that finds no
# tower config reads what the weights show and must take head counts and window from the preset that the stage
# widths match (tiny here, large in the releases).

TOWER = dict(dims=(16, 32, 48, 64), heads=(1, 2, 3, 4), depths=(1, 1, 2, 1), window=3, d_model=32,
             layers=2, heads_text=2, ffn=64, max_positions=1024, vocab=51289, image_size=768)
N_VISUAL = 577
# the three task prompts, ids (3, 14) as florence_encoder.py hard-codes them [enc] (facts, section 1)
TASK_PROMPT_IDS = torch.tensor([
    [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
    [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
    [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
])


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
# The reference: the official data flow from transformers parts

def open_image(path, exif: bool = True) -> Image.Image:
    """Image.open(...).convert('RGB') as the official loaders do; exif: ImageOps.exif_transpose first (what a
    user of sample.py means by the picture; the official eval does not apply it)."""
    with Image.open(path) as im:
        im.load()
        return (ImageOps.exif_transpose(im) if exif else im).convert("RGB")


def expand2square(image: Image.Image, fill) -> Image.Image:
    """mm_utils.expand2square [mm]: centred on a square of the longer side, the rest filled."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, fill)
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


class Reference:
    """One repo's reference: its Florence-2 (native), projector weights and LLM (transformers 5)."""

    def __init__(self, spec: RepoSpec, florence, projector: dict, llm, processor, tokenizer_len: int):
        self.spec, self.florence, self.projector, self.processor = spec, florence, projector, processor
        self.florence16 = copy.deepcopy(florence).to(torch.bfloat16)
        self.tokenizer_len = tokenizer_len
        self._visual = {}   # (id(image), bf16) -> visual tokens; the images are kept alive by the caller
        self.set_llm(llm)

    def set_llm(self, llm):
        """The official builder calls model.resize_token_embeddings(len(tokenizer)) [build]: the 3B LLM answers
        over its first len(tokenizer) rows only (32011 of 32064 in the release)."""
        self.llm_full = llm
        tokenizer_len = self.tokenizer_len
        if tokenizer_len < llm.config.vocab_size:
            small = hf_llm(self.spec.family, tokenizer_len)
            sd = {k: (v[:tokenizer_len] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
                  for k, v in llm.state_dict().items()}
            small.load_state_dict(sd)
            llm = small
        self.llm = llm
        self.llm16 = copy.deepcopy(llm).to(torch.bfloat16)

    # image -> pixels [mm] process_images: pad -> expand2square(ImageNet mean * 255) then the processor;
    # otherwise the processor alone (CLIPImageProcessor: bicubic resize to 768x768, rescale, normalise)
    def pixels(self, image: Image.Image, aspect: str | None = None) -> torch.Tensor:
        if (aspect or self.spec.aspect) == "pad":
            image = expand2square(image, tuple(int(m * 255) for m in self.processor.image_mean))
        return self.processor(images=[image], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """[V, V'_1, V'_2, V'_3] on channels, (577, 4D): V the image features; V'_k the first 577 outputs of the
        BART encoder run on [V ++ embeddings of prompt k], the three prompts as one batch, no attention mask [enc]."""
        model = self.florence16 if bf16 else self.florence
        pixels = pixels.to(torch.bfloat16 if bf16 else torch.float32)
        V = model.model.get_image_features(pixels).pooler_output                       # (1, 577, D)
        prompts = model.get_input_embeddings()(TASK_PROMPT_IDS)                          # (3, 14, D)
        encoder = model.model.language_model.encoder
        out = encoder(inputs_embeds=torch.cat([V.expand(3, -1, -1), prompts], 1)).last_hidden_state[:, :V.shape[1]]
        return torch.cat([V[0], out[0], out[1], out[2]], -1).float()

    def visual(self, features: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """The projector, written plainly (Linear, GELU, Linear, GELU, Linear) [proj]."""
        dt = torch.bfloat16 if bf16 else torch.float32
        w = {k: v.to(dt) for k, v in self.projector.items()}
        x = F.linear(features.to(dt), w["encoder_mlp.0.weight"], w["encoder_mlp.0.bias"])
        x = F.linear(F.gelu(x), w["encoder_mlp.1.1.weight"], w["encoder_mlp.1.1.bias"])
        return F.linear(F.gelu(x), w["encoder_mlp.2.1.weight"], w["encoder_mlp.2.1.bias"])

    @torch.no_grad()
    def embeds(self, case: tuple, bf16: bool = False, extra_ids=()) -> torch.Tensor:
        """LLaVA's splice [train]: the -200 placeholder replaced by the 577 visual tokens; (1, T, H).
        case: (prompt ids, image, aspect mode or None for the repo's)."""
        prompt_ids, image, aspect = case
        llm = self.llm16 if bf16 else self.llm
        embed = llm.get_input_embeddings()
        p = prompt_ids.index(IMAGE_TOKEN_INDEX)
        key = (id(image), bf16, aspect)
        if key not in self._visual:
            self._visual[key] = self.visual(self.features(self.pixels(image, aspect), bf16), bf16)
        visual = self._visual[key].to(embed.weight.dtype)
        before = torch.tensor(prompt_ids[:p], dtype=torch.long)
        after = torch.tensor(prompt_ids[p + 1:] + list(extra_ids), dtype=torch.long)
        return torch.cat([embed(before), visual, embed(after)])[None]

    @torch.no_grad()
    def last_hidden(self, case: tuple, bf16: bool = False) -> torch.Tensor:
        """The final-norm output at the last prompt position, (H,): what the lm_head reads for the first token."""
        llm = self.llm16 if bf16 else self.llm
        return llm.model(inputs_embeds=self.embeds(case, bf16)).last_hidden_state[0, -1].float()

    @torch.no_grad()
    def generate(self, case: tuple, stop_ids) -> list:
        """Greedy, max_new_tokens 128 (the official default) [vqa], from inputs_embeds; the new ids, the stop id
        included when one ended the answer (as transformers returns them)."""
        out = self.llm.generate(inputs_embeds=self.embeds(case), attention_mask=None, do_sample=False,
                                max_new_tokens=128, eos_token_id=list(stop_ids), pad_token_id=list(stop_ids)[0],
                                num_beams=1, temperature=None, top_p=None, top_k=None)
        return out[0].tolist()

    @torch.no_grad()
    def margins(self, case: tuple, new_ids: list) -> dict:
        """Teacher-forced over the answer: per step the fp32 top-1 minus top-2 logit, the largest |logit| change
        in the bf16 reference (bf16 tower, projector and LLM on the same tokens), and whether the full
        (unresized) vocabulary would have chosen the same token."""
        T = len(case[0]) - 1 + N_VISUAL
        steps = slice(T - 1, T - 1 + len(new_ids))
        l32 = self.llm(inputs_embeds=self.embeds(case, extra_ids=new_ids[:-1])).logits[0, steps]
        l16 = self.llm16(inputs_embeds=self.embeds(case, True, new_ids[:-1])).logits[0, steps].float()
        full = self.llm_full(inputs_embeds=self.embeds(case, extra_ids=new_ids[:-1])).logits[0, steps]
        top = l32.topk(2, -1).values
        return {"gap": (top[:, 0] - top[:, 1]).tolist(), "bf16_change": (l32 - l16).abs().max(-1).values.tolist(),
                "argmax": l32.argmax(-1).tolist(), "full_argmax": full.argmax(-1).tolist()}


# ----------------------------------------------------------------------------------------------
# The lm_head: one image-dependent decision, then chains

MIN_MARGIN = 0.5       # logits; fp32 implementations differ by ~1e-5, so this only guards against ties
MARGIN_FACTOR = 4.0    # x the bf16 reference's largest logit change at that step
CHAIN = 12.0           # lm_head scale of the chain rows (x the unit answer-token directions)


@dataclass
class Design:
    first: tuple          # the two first tokens (decision +1, -1)
    chains: dict          # token -> next token
    stop: int | None      # the stop id the chains end in (None: they end in a cycle, answers run 128 tokens)
    labels: dict = field(default_factory=dict)   # case -> +1 / -1
    ratio: float = 0.0    # the decision's smallest margin / bf16 change over the bf16 cases


def design_lm_head(ref: Reference, cases: dict, bf16_cases: tuple, opposite: tuple, tokens: list, stop,
                   last_token_ids) -> Design:
    """Set the embedding rows of the answer tokens and the lm_head so that

      first token: f+ or f-, decided by u . n (n: the final-norm output at the last prompt position), u solved
                   so that u . n = +-1 on every case (the two cases of each `opposite` pair on opposite
                   sides), the sign pattern chosen for the largest margin / bf16-change ratio (preferring
                   patterns where the bf16 cases do not all agree); both rows also get a common +6 so that
                   they beat every other row;
      after it:    a fixed chain (sft: f+ -> a -> b -> stop, f- -> c -> stop; pretrain: into a 3-token cycle, so
                   the answer runs to max_new_tokens, as a plain-template model that never says <|end|> does):
                   row(next) += CHAIN * e(token), the answer tokens' embeddings orthonormal (x sqrt(H)) and
                   orthogonal to every case's n, so the chain wins by tens of logits and the chain rows give
                   exactly 0 at the first step;
      other rows:  N(0, 0.02^2 / H): never chosen.

    cases: name -> (prompt_ids, image). tokens: 7 ordinary token ids that no prompt uses."""
    llm = ref.llm_full
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    with torch.no_grad():
        for t in last_token_ids:   # the last prompt token's own embedding small: n carries more of the image
            embed[t] = (embed[t] * 0.1).bfloat16().float()
    ref.set_llm(llm)
    n32 = {c: ref.last_hidden(cases[c]) for c in cases}
    n16 = {c: ref.last_hidden(cases[c], bf16=True) for c in bf16_cases}
    names = list(cases)
    N = torch.stack([n32[c] for c in names])                                        # (C, H)
    mean = N.mean(0)

    # answer-token embeddings: orthonormal, orthogonal to every n (fp32 and bf16)
    span = torch.linalg.qr(torch.cat([N, torch.stack(list(n16.values()))]).T).Q      # (H, r)
    g = torch.Generator().manual_seed(ref.spec.seed)
    rest = torch.randn(H, len(tokens), generator=g)
    rest = rest - span @ (span.T @ rest)
    directions = torch.linalg.qr(rest).Q.T                                           # (7, H), rows orthonormal

    # the decision u: u . n_c = y_c for all cases, every sign pattern that keeps the opposite pairs apart
    # (y and -y are the same design with f+ and f- swapped: the first case is +1. Scores within 0.1% count as
    # equal and the first pattern wins, so that float noise between runs cannot change the choice.)
    pairs = [(names.index(a), names.index(b)) for a, b in opposite]
    candidates = []
    for pattern in range(2 ** (len(names) - 1)):
        y = torch.tensor([1.0] + [1.0 if pattern >> i & 1 else -1.0 for i in range(len(names) - 1)])
        if any(y[a] == y[b] for a, b in pairs):
            continue
        u = torch.linalg.lstsq(N, y[:, None]).solution[:, 0]
        ratio = min(abs(float(u @ n32[c])) / max(abs(float(u @ (n32[c] - n16[c]))), 1e-12) for c in bf16_cases)
        # prefer answers that differ among the bf16 cases (an eval run then has two different answers), if that
        # costs little of the ratio
        mixed = len({float(y[names.index(c)]) for c in bf16_cases}) > 1
        candidates.append((ratio * (1.0 if mixed else 0.5), ratio, u, y))
    top = max(c[0] for c in candidates)
    _, ratio, u, y = next(c for c in candidates if c[0] >= 0.999 * top)

    first, chain_tokens = tokens[:2], tokens[2:]
    if ref.spec.stage == "sft":
        a1, a2, c1 = chain_tokens[:3]
        chains = {first[0]: a1, a1: a2, a2: stop, first[1]: c1, c1: stop}
    else:
        z1, z2, z3 = chain_tokens[:3]
        a1 = chain_tokens[3]
        chains = {first[0]: a1, a1: z1, first[1]: z1, z1: z2, z2: z3, z3: z1}
    m_hat = mean / mean.norm()
    with torch.no_grad():
        head.copy_(0.02 * H ** -0.5 * torch.randn(head.shape, generator=g))
        for t, d in zip(tokens, directions):
            embed[t] = d * H ** 0.5
        head[first[0]] = 6.0 / mean.norm() * m_hat + 3.0 * u   # both first tokens ~6 above the rest
        head[first[1]] = head[first[0]] - 6.0 * u
        for t, nxt in chains.items():
            head[nxt] += CHAIN * directions[tokens.index(t)]
        embed.copy_(embed.bfloat16().float())
        head.copy_(head.bfloat16().float())
    ref.set_llm(llm)
    return Design(first=tuple(first), chains=chains, stop=stop, labels=dict(zip(names, y.tolist())), ratio=ratio)


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
# Test images

def make_images(folder: Path, photo: Path) -> dict:
    """photo.png (a copy of the shared Florence-2 photo), exif.jpg (a non-square JPEG whose pixels are stored
    turned a quarter to the left, with EXIF Orientation 6: shown upright after a quarter turn clockwise) and
    upright.png (exif.jpg decoded and turned upright, losslessly: the same pixels without the tag)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(photo, folder / "photo.png")
    upright = Image.open(photo).convert("RGB").crop((120, 40, 760, 520))               # 640x480, landscape
    stored = upright.transpose(Image.Transpose.ROTATE_90)                               # 480x640, on its side
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "exif.jpg", quality=92, exif=exif.tobytes())
    with Image.open(folder / "exif.jpg") as im:
        assert im.getexif().get(0x0112) == 6 and im.size == (480, 640)
    turned = open_image(folder / "exif.jpg")
    assert turned.size == (640, 480)
    turned.save(folder / "upright.png")
    return {"photo": folder / "photo.png", "exif": folder / "exif.jpg", "upright": folder / "upright.png"}


# ----------------------------------------------------------------------------------------------
# Everything at once: tokenizers, four repos, their references and answers, the caches

CASES = {   # case -> (image, question, EXIF applied, template, aspect mode); None: the repo's own
    "photo": ("photo", QUESTION, True, None, None),
    "upright": ("exif", QUESTION, True, None, None),           # exif.jpg as sample.py should see it
    "photo_q2": ("photo", QUESTION_2, True, None, None),
    # negative controls, answered differently by construction: exif.jpg without its orientation applied; the
    # photo with the other template (chat <-> plain); the photo with the other aspect mode (pad <-> square)
    "sideways": ("exif", QUESTION, False, None, None),
    "other_template": ("photo", QUESTION, True, "other", None),
    "other_aspect": ("photo", QUESTION, True, None, "other"),
}
OPPOSITE = (("upright", "sideways"), ("photo", "other_template"), ("photo", "other_aspect"))
BF16_CASES = ("photo", "upright", "photo_q2")   # the cases some run of our code answers in bf16


@dataclass
class RepoWorld:
    spec: RepoSpec
    reference: Reference
    design: Design
    prompt_ids: dict      # case -> ids
    answer_ids: dict      # case -> generated ids (stop id included)
    answers: dict         # case -> text, decoded as the official eval does
    margins: dict         # case -> Reference.margins(...)
    snapshot: Path | None = None


@dataclass
class World:
    root: Path
    cache: Path                  # all six repos (the towers: *.json only)
    cache_no_tower_repo: Path    # the four main repos, no tower repo
    cache_no_tower: Path         # 8b-sft without the tower in its shards, no tower repo
    cache_no_tower_json: Path    # the same 8b-sft, the tower repo with *.json only
    images: dict
    tokenizer_dirs: dict         # family -> folder
    tokenization: dict           # family -> the reference job's result
    repos: dict = field(default_factory=dict)   # repo id -> RepoWorld
    decode_probe: dict = field(default_factory=dict)   # family -> (ids of DECODE_PROBE, the official decoding)


def answer_tokens(family: str, pieces: list, used: set, seed: int) -> list:
    """7 word-initial pieces of 3+ lowercase letters that no prompt uses."""
    mark = "\u2581" if family == "phi3" else "\u0120"
    ok = [i for i, p in enumerate(pieces) if re.fullmatch(mark + "[a-z]{3,}", p) and i not in used]
    return random.Random(seed).sample(ok, 7)


def build_world(root: Path, photo: Path) -> World:
    from transformers import AutoTokenizer, CLIPImageProcessorPil
    root.mkdir(parents=True, exist_ok=True)
    images = make_images(root / "images", photo)
    tok_dirs = {"phi3": root / "tokenizers" / "phi3", "llama": root / "tokenizers" / "llama"}
    write_phi3_tokenizer(tok_dirs["phi3"])
    write_llama3_tokenizer(tok_dirs["llama"])
    strings = {f: reference_strings(f) for f in tok_dirs}
    chat = {"phi3": "phi3", "llama": "llama3"}
    jobs = [{"folder": tok_dirs[f], "strings": strings[f],
             "piecewise": {f"piecewise/{chat[f]}/single": piecewise_prompt(chat[f], QUESTION)},
             "specials": list(PHI3_ADDED) + ["<s>", "</s>", "<unk>"] if f == "phi3" else
             ["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<pad>", "<|start_header_id|>"],
             "pieces": PHI3_LEN if f == "phi3" else 0} for f in tok_dirs]
    tokenization = dict(zip(tok_dirs, reference_tokenize(jobs)))
    phi, llama = tokenization["phi3"], tokenization["llama"]
    assert phi["class"] == "LlamaTokenizer" and phi["len"] == PHI3_LEN, phi["class"]
    assert phi["specials"] == {**{t: PHI3_SP_SIZE + i for i, t in enumerate(PHI3_ADDED)}, "<s>": 1, "</s>": 2,
                               "<unk>": 0}
    assert llama["class"] == "PreTrainedTokenizerFast" and llama["len"] == LLAMA3_VOCAB and llama["bos"] == LLAMA3_BOS
    assert llama["specials"] == {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009, "<|end_of_text|>": 128001,
                                 "<|eom_id|>": 128008, "<pad>": 128256, "<|start_header_id|>": 128006}
    # the 8B ids again with transformers 5's fast tokenizer (the main environment): the same
    fast = AutoTokenizer.from_pretrained(tok_dirs["llama"])
    for key, s in strings["llama"].items():
        chunks = [fast(c).input_ids for c in s.split("<image>")]
        ids = [chunks[0][0]] + [i for j, c in enumerate(chunks) for i in ([IMAGE_TOKEN_INDEX] if j else []) + c[1:]]
        assert ids == llama["ids"][key], key
    llama_pieces = fast.convert_ids_to_tokens(list(range(LLAMA3_BPE_SIZE)))

    processor = CLIPImageProcessorPil.from_pretrained(FLORENCE_ASSETS)
    opened = {"photo": open_image(images["photo"]), "exif": open_image(images["exif"]),
              "exif_raw": open_image(images["exif"], exif=False)}
    world = World(root=root, cache=root / "hub", cache_no_tower_repo=root / "hub-no-tower-repo",
                  cache_no_tower=root / "hub-no-tower", cache_no_tower_json=root / "hub-no-tower-json",
                  images=images, tokenizer_dirs=tok_dirs, tokenization=tokenization)
    tower_sd = {}
    for spec in REPOS.values():
        florence = florence2_native(spec.seed)
        tower_sd[spec.repo_id] = native_to_original(florence.state_dict())
        projector = projector_weights(spec.seed)
        llm = random_llm_body(spec.family, spec.seed)
        tok = tokenization[spec.family]
        ref = Reference(spec, florence, projector, llm, processor, tok["len"])
        cases = {}
        for case, (image, question, exif, template, aspect) in CASES.items():
            if template == "other":
                template = {"plain": {"phi3": "phi3", "llama": "llama3"}[spec.family]}.get(spec.template, "plain")
            if aspect == "other":
                aspect = {"pad": "square", "square": "pad"}[spec.aspect]
            cases[case] = (tok["ids"][f"eval/{template or spec.template}/{question}"],
                           opened[image if exif else "exif_raw"], aspect)
        prompt_ids = {c: case[0] for c, case in cases.items()}
        used = {i for ids in tok["ids"].values() for i in ids}
        pieces = tok["pieces"] if spec.family == "phi3" else llama_pieces
        tokens = answer_tokens(spec.family, pieces, used, spec.seed)
        stop = PHI3_END if spec.family == "phi3" else LLAMA3_EOT
        last = {ids[-1] for ids in prompt_ids.values()}
        design = design_lm_head(ref, cases, BF16_CASES, OPPOSITE, tokens, stop if spec.stage == "sft" else None,
                                last)
        # stop ids: the Phi eval's eos_token_id=[32007] [vqa]; Llama: its config / generation_config list
        stops = [PHI3_END] if spec.family == "phi3" else list(LLAMA3_EOS)
        answer_ids = {c: ref.generate(cases[c], stops) for c in CASES}
        margins = {c: ref.margins(cases[c], answer_ids[c]) for c in BF16_CASES}
        world.repos[spec.repo_id] = RepoWorld(spec, ref, design, prompt_ids, answer_ids, {}, margins)

    decode_jobs = [{"folder": tok_dirs[f], "decode": [r.answer_ids[c] for r in world.repos.values()
                                                      if r.spec.family == f for c in CASES]
                    + [tokenization[f]["ids"]["probe/decode"]]} for f in tok_dirs]
    decoded = dict(zip(tok_dirs, (job["decoded"] for job in reference_tokenize(decode_jobs))))
    for f in tok_dirs:
        world.decode_probe[f] = (tokenization[f]["ids"]["probe/decode"], decoded[f][-1])
        texts = iter(decoded[f])
        for r in world.repos.values():
            if r.spec.family == f:
                r.answers = {c: next(texts) for c in CASES}
    for r in world.repos.values():   # transformers 5 decodes the 8B answers the same way
        if r.spec.family == "llama":
            for c in CASES:
                assert fast.batch_decode([r.answer_ids[c]], skip_special_tokens=True)[0].strip() == r.answers[c]

    # the caches
    for r in world.repos.values():
        weights = {k: v for k, v in r.reference.llm_full.state_dict().items() if "rotary" not in k}
        weights.update({"model.mm_projector." + k: v for k, v in r.reference.projector.items()})
        files = repo_files(r.spec, weights, tok_dirs[r.spec.family], tower_sd[r.spec.repo_id])
        r.snapshot = write_cache_repo(world.cache, r.spec.repo_id, files)
        if r.spec.repo_id == "jiuhai/florence-vl-8b-sft":
            bare = repo_files(r.spec, weights, tok_dirs[r.spec.family], tower_sd[r.spec.repo_id], with_tower=False,
                              shards=2)   # without the tower, the two vocabulary matrices make two shards
            write_cache_repo(world.cache_no_tower, r.spec.repo_id, bare)
            write_cache_repo(world.cache_no_tower_json, r.spec.repo_id, bare)
    downloaded, listed = tower_repo_files()
    for repo_id in TOWER_REPOS:
        write_cache_repo(world.cache, repo_id, downloaded, listed)
    write_cache_repo(world.cache_no_tower_json, "jiuhai/florence-llama-vision-tower", downloaded, listed)
    world.cache_no_tower_repo.mkdir()
    for repo_id in REPOS:
        name = "models--" + repo_id.replace("/", "--")
        (world.cache_no_tower_repo / name).symlink_to(world.cache / name)
    return world
