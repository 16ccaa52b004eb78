"""The tokenizer and chat templates of Florence-VL's language model.

    Tokenizer(folder)               a tokenizer.json (Llama-3.1; any fast tokenizer)
    SentencePieceTokenizer(folder)  tokenizer.model + tokenizer_config.json as transformers 4.43.1's slow
                                    LlamaTokenizer reads them (the ids Florence-VL-3B was trained on)
    load_tokenizer(folder)          whichever of the two a folder holds
    TEMPLATES / render_chat         the official llama3 and phi3 conversation templates
    StreamDecoder                   ids -> text, one token at a time, safe for multi-byte characters
Both tokenizers: encode, encode_offsets ((id, start): start = index in the text of the first character a
token covers), decode, token_to_id, vocab_size, bos_token_id, end_ids, stream().
"""
from __future__ import annotations

import codecs
import heapq
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import tokenizers


class TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be read, or asks for something not implemented here."""


# ----------------------------------------------------------------------------------------------
# Chat templates (facts file, section 4): system block, then per message role + text + end token.

@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str     # the whole system block including its end token
    user: str       # role prefix before a user message
    assistant: str  # role prefix before an assistant message
    end: str        # end token after each message


TEMPLATES: dict[str, ChatTemplate] = {
    'llama3': ChatTemplate(
        name='llama3',
        system='<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
               'A chat between a curious user and an artificial intelligence assistant. '
               "The assistant gives helpful, detailed, and polite answers to the user's questions."
               '<|eot_id|>',
        user='<|start_header_id|>user<|end_header_id|>\n\n',
        assistant='<|start_header_id|>assistant<|end_header_id|>\n\n',
        end='<|eot_id|>',
    ),
    'phi3': ChatTemplate(
        name='phi3',
        system='<|system|>\nYou are a helpful AI assistant.<|end|>',
        user='\n<|user|>\n',
        assistant='\n<|assistant|>\n',
        end='<|end|>',
    ),
}


def render_chat(template: ChatTemplate | str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """messages: [{'role': 'user'|'assistant', 'content': str}, ...] -> the prompt string.

    With add_generation_prompt the string ends with the assistant role prefix, ready to generate."""
    t = TEMPLATES[template] if isinstance(template, str) else template
    roles = {'user': t.user, 'assistant': t.assistant}
    parts = [t.system]
    for m in messages:
        if m['role'] not in roles:
            raise ValueError(f"unknown role {m['role']!r} (expected 'user' or 'assistant')")
        parts.append(roles[m['role']] + m['content'] + t.end)
    if add_generation_prompt:
        parts.append(t.assistant)
    return ''.join(parts)


# ----------------------------------------------------------------------------------------------
# Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` (tokenizer.json of the HF repo).

# Tokens that end a reply in either family; whichever exist in the vocabulary are used.
END_TOKENS = ('<|eot_id|>', '<|end_of_text|>', '<|end|>', '<|endoftext|>')

# transformers' clean_up_tokenization: the spaces a word-piece decoder leaves before punctuation and English
# contractions, removed in this order. A space is only ever removed, so a streamed decode holds back the
# last CLEAN_UP_REACH - 1 characters (see StreamDecoder).
CLEAN_UP = ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
CLEAN_UP_REACH = max(len(a) for a, _ in CLEAN_UP)


def clean_up_spaces(text: str) -> str:
    for a, b in CLEAN_UP:
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer | str | Path):
        folder = None
        if isinstance(tok, (str, Path)):
            path = Path(tok) / 'tokenizer.json' if Path(tok).is_dir() else Path(tok)
            tok, folder = tokenizers.Tokenizer.from_file(str(path)), path.parent
        self.tok, self.folder = tok, folder
        self.end_ids = [i for i in (tok.token_to_id(t) for t in END_TOKENS) if i is not None]
        self.bos_token_id = self._bos_id(folder)
        # Llama-3.1's tokenizer_config says true, and transformers 4.43 (the official code) then cleans up
        # decoded text (transformers 5 no longer does for BPE tokenizers)
        config = _read_json(folder / 'tokenizer_config.json') if folder else {}
        self.clean_up_spaces = bool(config.get('clean_up_tokenization_spaces', False))

    def _bos_id(self, folder: Path | None) -> int | None:
        # transformers names the BOS in tokenizer_config.json (special_tokens_map.json in older folders);
        # without either file, the BOS is the one special token the post-processor puts before the text
        for name in ('tokenizer_config.json', 'special_tokens_map.json'):
            cfg = _read_json(folder / name) if folder else {}
            if 'bos_token' in cfg:
                bos = _content(cfg['bos_token'])
                return None if bos is None else self.tok.token_to_id(bos)
        enc = self.tok.encode('a', add_special_tokens=True)
        lead = next((k for k, special in enumerate(enc.special_tokens_mask) if not special), len(enc.ids))
        return enc.ids[0] if lead == 1 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Special tokens written in the text (<|eot_id|>, ...) are always matched as single ids;
        # add_special_tokens only controls the post-processor (e.g. a prepended <|begin_of_text|>).
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str, add_special_tokens: bool = False) -> list[tuple[int, int]]:
        """(id, start) per token; the post-processor's tokens have start 0 (their offsets are (0, 0))."""
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return [(i, start) for i, (start, _) in zip(enc.ids, enc.offsets)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_spaces(text) if self.clean_up_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def stream(self, skip_special_tokens: bool = True, strip: bool = False) -> StreamDecoder:
        """A streaming-safe incremental decoder: put one id, get the new text."""
        return StreamDecoder(self, skip_special_tokens, strip)

    def save(self, folder: str | Path) -> None:
        """tokenizer.json, and the config files it was read with (they name the BOS)."""
        self.tok.save(str(Path(folder) / 'tokenizer.json'))
        _copy_files(self.folder, Path(folder), ('tokenizer_config.json', 'special_tokens_map.json'))


class StreamDecoder:
    """Incremental detokenization: put ids one at a time, get back only the newly completed text.

    Decoding token by token breaks multi-byte characters split across tokens (byte-level BPE), drops the
    leading space of SentencePiece pieces and misses clean-up rules that look at two tokens. So each step
    decodes the whole reply so far and emits what was not emitted yet, holding text back while it could
    still change: an incomplete character (U+FFFD) at the end, and with a tokenizer that cleans up spaces
    the last CLEAN_UP_REACH - 1 characters. strip=True gives what the official evaluation prints,
    decode(...).strip(): leading whitespace never emitted, trailing whitespace only once text follows it.
    (One decode of the reply per token: microseconds for a fast tokenizer, well under a millisecond for
    the SentencePiece one at a few hundred tokens.)"""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, strip: bool = False):
        self.tokenizer, self.skip, self.strip = tokenizer, skip_special_tokens, strip
        self.ids: list[int] = []
        self.emitted = ''

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self.flush(final=False)

    def flush(self, final: bool = True) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if self.strip:
            text = text.lstrip()
        end = len(text)
        if not final:
            while end and text[end - 1] == '\ufffd':
                end -= 1
            if getattr(self.tokenizer, 'clean_up_spaces', False):
                end -= CLEAN_UP_REACH - 1
        ready = text[:max(end, 0)]
        if self.strip:
            ready = ready.rstrip()
        if len(ready) <= len(self.emitted):
            return ''
        new, self.emitted = ready[len(self.emitted):], ready
        return new


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f'cannot read {path}: {e}') from None


def _content(token) -> str | None:
    """A token as tokenizer_config.json spells it: a string, or an AddedToken dict with its content."""
    return token.get('content') if isinstance(token, dict) else token


# ----------------------------------------------------------------------------------------------
# tokenizer.model: a SentencePiece ModelProto, read from the protobuf wire format by hand. Field numbers
# from google/sentencepiece, src/sentencepiece_model.proto:
#   ModelProto      pieces 1, trainer_spec 2, normalizer_spec 3, denormalizer_spec 5
#   SentencePiece   piece 1, score 2 (float), type 3 (default NORMAL)
#   TrainerSpec     model_type 3 (UNIGRAM 1 = default, BPE 2), treat_whitespace_as_suffix 24,
#                   byte_fallback 35, unk_surface 44 (default ' \u2047 ')
#   NormalizerSpec  name 1, precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4,
#                   escape_whitespaces 5 (the three bools default to true)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]  # IndexError when truncated
        value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
        if b < 0x80:
            return value, i


def _fields(buf: bytes) -> dict[int, list]:
    """field number -> its values in file order (ints for varints, bytes otherwise)."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key & 7 == 0:
            value, i = _varint(buf, i)
        else:  # length-delimited (strings, bytes, messages) or fixed 64 / 32 bits; KeyError: groups
            n, i = _varint(buf, i) if key & 7 == 2 else ({1: 8, 5: 4}[key & 7], i)
            value, i = buf[i:i + n], i + n
        if i > len(buf):
            raise ValueError('truncated')
        fields.setdefault(key >> 3, []).append(value)
    return fields


def read_sentencepiece_model(path: str | Path) -> dict:
    """The parts of a tokenizer.model that segmentation depends on; pieces: (piece, score, type), index = id."""
    def last(fields, number, default):  # proto2: the last value of a scalar field wins
        return fields[number][-1] if number in fields else default
    try:
        top = _fields(Path(path).read_bytes())
        trainer, norm, denorm = (_fields(b''.join(top.get(k, []))) for k in (2, 3, 5))  # repeats merge
        pieces = [(last(f, 1, b'').decode(), struct.unpack('<f', last(f, 2, bytes(4)))[0], last(f, 3, NORMAL))
                  for f in map(_fields, top.get(1, []))]
        return dict(pieces=pieces, model_type=last(trainer, 3, UNIGRAM), byte_fallback=bool(last(trainer, 35, 0)),
                    whitespace_as_suffix=bool(last(trainer, 24, 0)),
                    unk_surface=last(trainer, 44, ' \u2047 '.encode()).decode(),
                    normalizer=last(norm, 1, b'').decode(), charsmap=last(norm, 2, b'') + last(denorm, 2, b''),
                    add_dummy_prefix=bool(last(norm, 3, 1)), remove_extra_whitespaces=bool(last(norm, 4, 1)),
                    escape_whitespaces=bool(last(norm, 5, 1)))
    except (OSError, ValueError, IndexError, KeyError, struct.error) as e:
        raise TokenizerError(f'cannot read {path} as a SentencePiece model: {e!r}') from None


def _check_supported(model: dict, path) -> None:
    types = [t for _, _, t in model['pieces']]
    problems = [msg for bad, msg in [
        (model['model_type'] != BPE, f"model_type {model['model_type']} (only BPE = 2 is implemented)"),
        (not model['byte_fallback'], 'byte_fallback false'),
        (bool(model['charsmap']), f"normalizer {model['normalizer']!r}: a precompiled charsmap (only identity)"),
        (model['remove_extra_whitespaces'], 'remove_extra_whitespaces true'),
        (model['whitespace_as_suffix'], 'treat_whitespace_as_suffix true'),
        (USER_DEFINED in types or UNUSED in types, 'USER_DEFINED or UNUSED pieces'),
        (types.count(UNKNOWN) != 1 or types.count(BYTE) != 256, 'not one UNKNOWN and 256 BYTE pieces')] if bad]
    if problems:
        raise TokenizerError(f'{path}: not supported: ' + '; '.join(problems))


# sentencepiece decodes byte pieces one character at a time: a byte that starts no valid UTF-8 character
# becomes one U+FFFD (Python's 'replace' gives one for a whole truncated sequence)
codecs.register_error('sentencepiece_bytes', lambda e: ('\ufffd', e.start + 1))


# ----------------------------------------------------------------------------------------------
# sentencepiece's BPE segmentation (src/bpe_model.cc) and decoding (src/sentencepiece_processor.cc).

class SentencePieceBPE:
    """Pieces of a text as sentencepiece 0.1.99 gives them, for a BPE model with byte fallback.

    The text ('▁' for ' ', a dummy '▁' in front if asked) starts as one symbol per character; the adjacent
    pair that concatenates to the piece with the highest score (the leftmost one on a tie) is merged until
    no pair makes a piece; a symbol that is no piece becomes its UTF-8 byte pieces. Not a `tokenizers`
    BPE: its merges have fixed ranks, and no fixed rank breaks ties by position (two pieces with equal
    scores; two splits of one piece); it is also no faster here (no pre-tokenizer: no word cache)."""

    def __init__(self, path: str | Path):
        self.model = read_sentencepiece_model(path)
        _check_supported(self.model, path)
        self.pieces = [p for p, _, _ in self.model['pieces']]
        self.types = [t for _, _, t in self.model['pieces']]
        self.scores = {p: s for p, s, t in self.model['pieces'] if t == NORMAL}  # only these are merged into
        # sentencepiece looks up control, unknown and byte pieces before the normal ones
        self.ids = {p: i for i, p in sorted(enumerate(self.pieces), key=lambda x: self.types[x[0]] != NORMAL)}
        self.unk_id = self.types.index(UNKNOWN)
        # No merge joins a '▁' to another character before it unless a piece holds such a pair, so the text
        # cuts there into words that segment on their own, and words repeat: cache them
        joins = any(re.search('[^▁]▁', p) for p in self.scores)
        self.words = re.compile('(?s).+' if joins else '▁*[^▁]+|▁+')
        self.cache: dict[str, list[tuple[str, int]]] = {}

    def encode(self, text: str, add_dummy_prefix: bool) -> list[tuple[str, int]]:
        """(piece, start) pairs, start = index in `text` (a piece on the dummy prefix alone starts at 0)."""
        if not text:
            return []
        pre = int(add_dummy_prefix)
        norm = '▁' * pre + (text.replace(' ', '▁') if self.model['escape_whitespaces'] else text)
        return [(p, max(w.start() + i - pre, 0)) for w in self.words.finditer(norm) for p, i in self._word(w[0])]

    def _word(self, word: str) -> list[tuple[str, int]]:
        if word in self.cache:
            return self.cache[word]
        sym = list(word)  # symbol i starts at character i; a symbol merged into its left neighbour becomes ''
        nxt, prv = list(range(1, len(word))) + [-1], list(range(-1, len(word) - 1))
        agenda = []  # (-score, left, right, length): a heap, best score first, then leftmost

        def add_pair(left, right):
            score = self.scores.get(sym[left] + sym[right]) if left >= 0 and right >= 0 else None
            if score is not None:
                heapq.heappush(agenda, (-score, left, right, len(sym[left]) + len(sym[right])))

        for i in range(len(word) - 1):
            add_pair(i, i + 1)
        while agenda:
            _, left, right, length = heapq.heappop(agenda)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != length:
                continue  # a side has changed since this pair was queued
            sym[left], sym[right], nxt[left] = sym[left] + sym[right], '', nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            add_pair(prv[left], left)
            add_pair(left, nxt[left])
        out = []  # the symbols left, in order (merges keep the left index), a non-piece as its bytes
        for i, s in enumerate(sym):
            if s:
                unknown = self.types[self.ids.get(s, self.unk_id)] == UNKNOWN
                out += [(f'<0x{b:02X}>', i) for b in s.encode()] if unknown else [(s, i)]
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[word] = out
        return out

    def decode(self, pieces: list[str], dummy_prefix: bool) -> str:
        """DecodePieces: runs of byte pieces as UTF-8, control pieces invisible, '▁' -> ' ', and with a dummy
        prefix the '▁' of the first piece that starts the text dropped."""
        text, data, first, stripped = '', bytearray(), True, False
        for p in pieces:
            i = self.ids.get(p, self.unk_id)
            if self.types[i] == BYTE:
                data.append(int(p[3:5], 16))
                continue
            text, data = text + data.decode('utf-8', 'sentencepiece_bytes'), bytearray()
            first = first and not stripped and not text
            stripped = dummy_prefix and first and self.types[i] == NORMAL and p.startswith('▁')
            if self.types[i] == UNKNOWN:  # unk_surface for <unk>, any other string that is no piece as itself
                text += self.model['unk_surface'] if p == self.pieces[i] else p
            elif self.types[i] != CONTROL:
                text += (p[1:] if stripped else p).replace('▁', ' ')
        return text + data.decode('utf-8', 'sentencepiece_bytes')


# ----------------------------------------------------------------------------------------------
# transformers 4.43.1's slow LlamaTokenizer on top of it.

class SentencePieceTokenizer:
    """A tokenizer.model folder as transformers 4.43.1 loads it with AutoTokenizer(..., use_fast=False):
    the ids Florence-VL-3B was trained on (its checkpoints ship no tokenizer.json).

    The text is split at added tokens (leftmost-longest match); one with rstrip (lstrip) strips all
    whitespace after (before) it; sentencepiece segments the rest. legacy=False puts a '▁' in front
    (add_prefix_space), turns the model's dummy prefix off, and segments a part that starts with a space as
    unk_token + part, dropping unk_token's pieces again (so that ' Hi' still gives '▁Hi'). Settings are
    tokenizer_config.json's: with an added_tokens_decoder there, 4.43.1 does not read special_tokens_map.json
    or added_tokens.json."""

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        cfg = _read_json(folder / 'tokenizer_config.json')
        unsupported = [k for k in ('sp_model_kwargs', 'split_special_tokens', 'clean_up_tokenization_spaces')
                       if cfg.get(k)]
        if 'added_tokens_decoder' not in cfg or unsupported:
            raise TokenizerError(f'{folder / "tokenizer_config.json"}: missing, or without added_tokens_decoder '
                                 f'(transformers < 4.34), or with {unsupported}: not supported')
        self.sp = SentencePieceBPE(folder / 'tokenizer.model')
        self.legacy = cfg.get('legacy') is None or bool(cfg['legacy'])  # unset: legacy (and a warning)
        self.add_prefix_space = cfg.get('add_prefix_space', True)  # the class default; an explicit null is falsy
        self.add_bos, self.add_eos = cfg.get('add_bos_token', True), cfg.get('add_eos_token', False)
        self.dummy_prefix = self.legacy and self.sp.model['add_dummy_prefix']
        self._added_tokens(cfg, folder)
        self.unk = self.special['unk_token']
        self.unk_len = len(self.sp.encode(self.unk or '', False))
        self.bos_token_id, self.eos_token_id = (self._token_id(self.special[k]) if self.special[k] else None
                                                for k in ('bos_token', 'eos_token'))
        self.end_ids = [i for i in (self.token_to_id(t) for t in END_TOKENS) if i is not None]

    def _added_tokens(self, cfg: dict, folder: Path) -> None:
        defaults = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}  # LlamaTokenizer's
        self.special = {k: _content(cfg.get(k, defaults.get(k))) for k in
                        ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')}
        additional = [_content(t) for t in cfg.get('additional_special_tokens') or []]
        # all_special_tokens: what skip_special_tokens drops, and what decode copies as it is
        self.all_special = list(dict.fromkeys([t for t in self.special.values() if t] + additional))
        self.added, self.strip = {}, {}  # content -> id, content -> (lstrip, rstrip)
        for idx, tok in sorted((int(k), v) for k, v in cfg['added_tokens_decoder'].items()):
            if tok.get('single_word'):
                raise TokenizerError(f'{folder}: added token {tok["content"]!r} has single_word: not supported')
            self.added[tok['content']], self.strip[tok['content']] = idx, (tok.get('lstrip'), tok.get('rstrip'))
        # special tokens missing there are added too: at their piece's id, else after the vocabulary
        vocab = {**{p: i for i, p in enumerate(self.sp.pieces) if i not in self.added.values()}, **self.added}
        free = len(vocab)
        for tok in self.all_special:
            if tok not in self.added:
                self.added[tok], self.strip[tok] = vocab.get(tok, free), (False, False)
                free += tok not in vocab
        self.vocab_size = len(set(vocab) | set(self.added))  # len(tokenizer)
        self.id_to_added = {i: t for t, i in self.added.items()}
        self.special_ids = {self._token_id(t) for t in self.all_special}
        # added tokens that decode keeps apart from the sentencepiece text around them
        self.apart = set(self.added) - set(self.all_special) | {t for t in additional
                                                                 if self._token_id(t) >= len(self.sp.pieces)}
        names = sorted(self.added, key=len, reverse=True)  # the regex takes the first alternative that matches
        self.added_re = re.compile('|'.join(map(re.escape, names)) or '(?!)')

    def _token_id(self, token: str) -> int:
        return self.added.get(token, self.sp.ids.get(token, self.sp.unk_id))

    def token_to_id(self, token: str) -> int | None:
        return self.added.get(token, self.sp.ids.get(token))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens=True: what `tokenizer(text).input_ids` gives (BOS / EOS as the config says)."""
        return [i for i, _ in self.encode_offsets(text, add_special_tokens)]

    def encode_offsets(self, text: str, add_special_tokens: bool = False) -> list[tuple[int, int]]:
        """(id, start) per token; an added BOS starts at 0, an added EOS at len(text)."""
        out = [(self._token_id(t), start) for t, start in self._tokenize(text)]
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            out.insert(0, (self.bos_token_id, 0))
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            out.append((self.eos_token_id, len(text)))
        return out

    def _tokenize(self, text: str) -> list[tuple[str, int]]:
        """LlamaTokenizer.tokenize as (token, start) pairs, start = index in `text`."""
        shift = 0
        if not self.legacy and text:
            text = text.replace('▁', ' ')
            if self.add_prefix_space:
                text, shift = '▁' + text, 1  # a virtual character: a token on it alone starts at 0
        tokens = []
        for start, part, added in self._split(text):
            tokens += [(part, start)] if added else [(p, start + i) for p, i in self._segment(part)]
        # that '▁' is dropped again when a special token follows (not for other added tokens: '▁<|system|>')
        if not self.legacy and len(tokens) > 1 and tokens[0][0] == '▁' and tokens[1][0] in self.all_special:
            tokens = tokens[1:]
        return [(t, max(start - shift, 0)) for t, start in tokens]

    def _split(self, text: str) -> list[list]:
        """[start, part, is_added_token] in order; empty parts (whitespace stripped away) left out."""
        parts, pos = [], 0
        for m in self.added_re.finditer(text):
            if m.start() > pos:
                parts.append([pos, text[pos:m.start()], False])
            parts.append([m.start(), m[0], True])
            pos = m.end()
        if pos < len(text):
            parts.append([pos, text[pos:], False])
        for i, (_, part, added) in enumerate(parts):
            lstrip, rstrip = self.strip[part] if added else (False, False)
            if rstrip and i + 1 < len(parts):
                after = parts[i + 1]
                after[0], after[1] = after[0] + len(after[1]) - len(after[1].lstrip()), after[1].lstrip()
            if lstrip and i > 0:
                parts[i - 1][1] = parts[i - 1][1].rstrip()
        return [p for p in parts if p[1]]

    def _segment(self, part: str) -> list[tuple[str, int]]:
        if self.legacy or not part.startswith(('▁', ' ')):
            return self.sp.encode(part, self.dummy_prefix)
        pieces = self.sp.encode(self.unk + part, False)
        pieces = pieces[self.unk_len:] if len(pieces) >= self.unk_len else pieces
        return [(p, max(start - len(self.unk), 0)) for p, start in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """PreTrainedTokenizer._decode: runs of pieces and special tokens as one string each, added tokens that
        are not special alone, joined by ' ' (4.43.1's spaces_between_special_tokens=True, config or not)."""
        texts, run = [], []
        for i in map(int, ids):
            if skip_special_tokens and i in self.special_ids:
                continue
            if not (i in self.id_to_added or 0 <= i < len(self.sp.pieces)):
                raise TokenizerError(f'token id {i} is out of range (vocab_size {self.vocab_size})')
            t = self.id_to_added.get(i) or self.sp.pieces[i]
            if t not in self.apart:
                run.append(t)
                continue
            if run:  # an empty string is dropped here but kept at the end
                texts += [s for s in [self._tokens_to_string(run)] if s]
            texts, run = texts + [t], []
        return ' '.join(texts + ([self._tokens_to_string(run)] if run else []))

    stream = Tokenizer.stream

    def save(self, folder: str | Path) -> None:
        """The files it was read from, as they are (the slow tokenizer writes no tokenizer.json)."""
        _copy_files(self.folder, Path(folder), ('tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
                                                'added_tokens.json'))

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """LlamaTokenizer.convert_tokens_to_string: special tokens copied, the pieces between decoded."""
        if tokens[0].startswith('▁') and self.add_prefix_space:
            tokens = [tokens[0][1:]] + tokens[1:]
        out, run, prev_special = '', [], False
        for i, t in enumerate(tokens):
            if t in self.all_special:
                space = ' ' if self.legacy and i and not prev_special else ''
                out, run, prev_special = out + space + self.sp.decode(run, self.dummy_prefix) + t, [], True
            else:
                out += ' ' if prev_special and i == 1 and self.add_prefix_space and not t.startswith('▁') else ''
                run, prev_special = run + [t], False
        return out + self.sp.decode(run, self.dummy_prefix)


def load_tokenizer(folder: str | Path) -> Tokenizer | SentencePieceTokenizer:
    """A model folder's tokenizer as the official code loads it (AutoTokenizer with use_fast=False):
    tokenizer.model when there is one (the slow SentencePiece tokenizer; Phi-3.5's hub repo has both files,
    and its converted fast tokenizer gives other ids: no '▁' before <|system|>, ...), else tokenizer.json
    (Llama-3 has no slow tokenizer)."""
    folder = Path(folder)
    if (folder / 'tokenizer.model').is_file() and (folder / 'tokenizer_config.json').is_file():
        return SentencePieceTokenizer(folder)
    if (folder / 'tokenizer.json').is_file():
        return Tokenizer(folder)
    raise TokenizerError(f'{folder}: no tokenizer (looked for tokenizer.model with tokenizer_config.json, '
                         'then tokenizer.json)')


def _copy_files(src: Path | None, dst: Path, names) -> None:
    for name in names:
        if src is not None and (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
