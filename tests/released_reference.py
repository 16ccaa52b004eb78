"""Fixture builders for tests/test_released.py, the official side: the answers that the official code gives on
the four tiny released repos of tests/released.py, computed from transformers parts. Here: the conversation
templates and the strings the official code tokenizes, tokenized by the official slow tokenizer in the reference
venv (transformers 4.43.1, tests/reference_env.py); the official data flow (`Reference`: the image opened and
padded, Florence-2's features for the three task prompts, the projector, the splice, the LLM's greedy generate);
the lm_head that keeps every answer far from ties (`design_lm_head`); and `build_world`, which makes the
tokenizers, references and answers and then has tests/released.py write the repos with the designed weights
into the hub caches. This file imports tests/released.py (repo specs, token ids, tiny models, cache writing);
released.py imports nothing from here.

Sources of the facts used here (cited again where they are used):
  [conv]  M-Venkatachalam/Florence-VL llava/conversation.py (templates, SeparatorStyle.MPT / PLAIN)
  [mm]    llava/mm_utils.py                               (tokenizer_image_token, expand2square, process_images)
  [vqa]   llava/eval/model_vqa_loader.py                  (prompt, eos_token_id=[32007], decoding, answers file)
  [train] llava/train/train.py                            (preprocess_multimodal / _plain, the splice)
  [build] llava/model/builder.py                          (use_fast=False, resize_token_embeddings(len(tokenizer)))
  [enc]   llava/model/multimodal_encoder/florence_encoder.py (the (3, 14) task prompt ids, one batch, no mask)
  [proj]  llava/model/multimodal_projector/builder.py     (cat(V, V'), then encoder_mlp.0 / .1.1 / .2.1)
  [facts] ../shared/reference/florence-vl-facts.md        (the task prompt ids, the supervised tokens)

The weights are random (tests/released.py) but shaped so that greedy decoding is far from ties, in bf16 as well
as fp32 (see `design_lm_head`): every answer is one image-dependent decision (the first token) followed by a fixed
chain of tokens with large margins.
"""
from __future__ import annotations

import copy
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
from released import (FLORENCE_ASSETS, H, LLAMA3_BPE_SIZE, LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT, LLAMA3_VOCAB,
                      PHI3_ADDED, PHI3_END, PHI3_LEN, PHI3_SP_SIZE, QUESTION, REPOS, SYSTEMS, RepoSpec,
                      florence2_native, hf_llm, native_to_original, projector_weights, random_llm_body,
                      write_caches, write_llama3_tokenizer, write_phi3_tokenizer)

# ----------------------------------------------------------------------------------------------
# The official conversation templates [conv], the eval prompt [vqa] and the training preprocessing [train],
# written from their behaviour (SYSTEMS, the system prompts, and QUESTION are in released.py: the tiny
# tokenizers' corpus holds them)

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
# The tower's side of the official data flow (the tiny tower is released.py's TOWER): 577 visual tokens at
# 768x768, and the task prompts

N_VISUAL = 577
# the three task prompts, ids (3, 14) as florence_encoder.py hard-codes them [enc] (facts, section 1)
TASK_PROMPT_IDS = torch.tensor([
    [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
    [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
    [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
])


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
    weights = {}
    for r in world.repos.values():
        w = {k: v for k, v in r.reference.llm_full.state_dict().items() if "rotary" not in k}
        w.update({"model.mm_projector." + k: v for k, v in r.reference.projector.items()})
        weights[r.spec.repo_id] = w
    snapshots = write_caches(world.cache, world.cache_no_tower_repo, world.cache_no_tower, world.cache_no_tower_json,
                             weights, tok_dirs, tower_sd)
    for r in world.repos.values():
        r.snapshot = snapshots[r.spec.repo_id]
    return world
