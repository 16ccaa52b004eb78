"""Data for Florence-VL: LLaVA conversations -> input ids and labels, images, batches, sampling.

    record {"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}
      -> tokenize_conversation: ids as the official code builds them (rendered template, cut at <image>),
         labels from token offsets, so exactly the assistant replies and their end tokens are supervised
      -> truncate: at most max_len tokens once the image placeholder is expanded
      -> image: RGB, resized (pretrain) or padded (finetune) to a square by florence_encoder.preprocess
      -> collate: right padding into (B, T) tensors; the -200 placeholder stays for the model to splice

The synthetic task that the default training run uses lives in synthetic.py.
"""
from __future__ import annotations

import json
import sys
import warnings
from array import array
from pathlib import Path
from typing import Callable

import torch
import tokenizers
import numpy as np
from PIL import Image, ImageOps

import tokenizer as tok

IMAGE_TOKEN = '<image>'
IMAGE_TOKEN_INDEX = -200  # stands for the visual tokens in input_ids (facts file, section 4)
IGNORE_INDEX = -100       # label of every token that is not supervised
ROLES = ('human', 'gpt')
TEMPLATE_NAMES = ('plain', 'llama3', 'phi3')


class DataError(ValueError):
    """A record that cannot be used; the message starts with 'file:line' or 'file[index]'."""


# ----------------------------------------------------------------------------------------------
# Images: the one place where a file becomes an RGB picture (training, --check and sample.py).

def load_image(path: str | Path) -> Image.Image:
    """An image file -> a fully decoded RGB image, upright (EXIF orientation applied).

    Greyscale, palette, RGBA (alpha dropped, as LLaVA's convert('RGB')), CMYK and 16-bit images are
    converted; a missing, empty, truncated or corrupt file, or one larger than Image.MAX_IMAGE_PIXELS
    (a decompression bomb), raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'cannot read image {path}: file not found')
    if path.stat().st_size == 0:
        raise DataError(f'cannot read image {path}: the file is empty (0 bytes)')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)  # over the limit: refuse, not warn
            with Image.open(path) as image:
                image.load()  # decode now: truncation shows here, not deep inside a batch
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f'cannot read image {path}: refused as a possible decompression bomb '
                        f'(over Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {e}') from e
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f'cannot read image {path}: {e}') from e


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit greyscale: scale to 8 bits (convert() clips)
        a = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), 'L')
    elif image.mode == 'F':
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), 'L')
    return image.convert('RGB')


# ----------------------------------------------------------------------------------------------
# Validation: one function that lists the problems of one record, so that a `--check` pass over a
# whole file and the loader at training time apply the same rules.

def validate_record(record, template: str | None = None, image_root: str | Path | None = None,
                    check_image_file: bool = False) -> list[str]:
    """Returns the problems of one LLaVA record ([] when it is usable)."""
    if not isinstance(record, dict):
        return [f'record is a {type(record).__name__}, expected a JSON object']
    conversations = record.get('conversations')
    if not isinstance(conversations, list) or not conversations:
        return ['missing or empty "conversations" list']
    problems = []
    image = record.get('image')
    if image is not None and not isinstance(image, str):
        problems.append('"image" must be one path (one image per sample)')
    n_image_tokens = 0
    for j, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and turn.get('from') in ROLES and isinstance(turn.get('value'), str)):
            problems.append(f'turn {j}: expected {{"from": "human"|"gpt", "value": str}}, got {turn!r:.80}')
            continue
        if not turn['value'].strip():
            problems.append(f'turn {j}: empty {turn["from"]} turn')
        expected = ROLES[j % 2]
        if turn['from'] != expected:
            problems.append(f'turn {j}: from {turn["from"]!r}, expected {expected!r} '
                            '(turns alternate, starting with human)')
        count = turn['value'].count(IMAGE_TOKEN)
        if count and turn['from'] == 'gpt':
            problems.append(f'turn {j}: {IMAGE_TOKEN} in a gpt reply')
        n_image_tokens += count
    if len(conversations) % 2:
        problems.append('odd number of turns: the last human turn has no gpt reply')
    if template == 'plain' and len(conversations) != 2:
        problems.append(f'the plain (pretrain) template takes one human and one gpt turn, got {len(conversations)} turns')
    if n_image_tokens > 1:
        problems.append(f'{n_image_tokens} {IMAGE_TOKEN} tokens; one image per sample is supported')
    if n_image_tokens and image is None:
        problems.append(f'{IMAGE_TOKEN} in the text but no "image" field')
    if check_image_file and isinstance(image, str):
        path = Path(image_root or '.') / image
        if not path.is_file():
            problems.append(f'image file not found: {path}')
        else:
            try:
                load_image(path)  # decoded in full: empty, truncated, corrupt, too large
            except DataError as e:
                problems.append(str(e))
    return problems


def record_warnings(record) -> list[str]:
    """What is usable but probably not meant (reported by --check, not an error)."""
    if not isinstance(record, dict) or not isinstance(record.get('conversations'), list):
        return []
    text = ''.join(t.get('value', '') for t in record['conversations'] if isinstance(t, dict)
                   and isinstance(t.get('value'), str))
    if record.get('image') is not None and IMAGE_TOKEN not in text:
        return [f'an image but no {IMAGE_TOKEN} in the text: it is put before the first human turn']
    return []


# ----------------------------------------------------------------------------------------------
# Tokenization, as the official code builds its ids. The released checkpoints were trained on them:
#   1. LLaVA's preprocess_multimodal moves <image> to the front of its turn: "<image>\n" + text.strip()
#   2. the conversation is rendered to one string (conversation.py; plain: "<image>" + caption + "\n")
#   3. tokenizer_image_token: the string is cut at <image>, each chunk is tokenized with the LLM
#      tokenizer's own call (which may prepend BOS to every chunk), the first chunk's BOS is kept and
#      the later chunks' dropped. Llama-3's tokenizer prepends <|begin_of_text|> and the llama3 template
#      starts with a literal one, so its ids begin 128000, 128000, 128006.
# Labels are not the official code's (it re-tokenizes split strings and, on a length mismatch, masks
# the whole sample: every multi-turn llama3 sample). Here each token is supervised exactly when its
# first character lies in an assistant reply or that reply's end token, read off the tokenizer's
# offsets: correct by construction, multi-turn included. (A token that starts before a reply and runs
# into it, e.g. "\n\n\n" when a llama3 reply starts with "\n", stays unsupervised.)
#
# style "clean" keeps two of this project's earlier choices instead: one BOS, and <image> where the
# record has it. Both styles put the image of a record without <image> before its first human turn
# (the official code silently drops such an image).

PROMPT_STYLES = ('official', 'clean')


def _as_tokenizer(tokenizer):
    return tok.Tokenizer(tokenizer) if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer


def _check_turns(conversations: list[dict], has_image: bool) -> None:
    n_image = sum(t['value'].count(IMAGE_TOKEN) for t in conversations)
    if not has_image and n_image:
        raise ValueError(f'{IMAGE_TOKEN} in the text of a sample without an image')
    if n_image > 1:
        raise ValueError(f'{n_image} {IMAGE_TOKEN} tokens; one image per sample is supported')
    for j, turn in enumerate(conversations):
        if turn['from'] not in ROLES:
            raise ValueError(f'unknown role {turn["from"]!r} (expected "human" or "gpt")')
        if turn['from'] != ROLES[j % 2]:
            raise ValueError(f'turn {j} is from {turn["from"]!r}: turns alternate, starting with human')
        if turn['from'] == 'gpt' and IMAGE_TOKEN in turn['value']:
            raise ValueError(f'{IMAGE_TOKEN} in a gpt reply')


def render(conversations: list[dict], template, has_image: bool, generation_prompt: bool = False,
           style: str = 'official') -> tuple[str, list[tuple[int, int]]]:
    """One conversation as the official code renders it, and the [start, end) character spans that are
    supervised (each reply with its end token). generation_prompt: the turns end with a human one and
    the text ends where the reply would begin."""
    if style not in PROMPT_STYLES:
        raise ValueError(f'unknown prompt style {style!r}; expected one of {PROMPT_STYLES}')
    _check_turns(conversations, has_image)
    name = template if isinstance(template, str) else template.name
    texts = [t['value'] for t in conversations]
    if has_image and not any(IMAGE_TOKEN in t for t in texts):
        texts[0] = IMAGE_TOKEN + '\n' + texts[0]
    elif has_image and style == 'official':
        texts = [(IMAGE_TOKEN + '\n' + t.replace(IMAGE_TOKEN, '').strip()).strip() if IMAGE_TOKEN in t else t
                 for t in texts]
    if name == 'plain':
        expected = 1 if generation_prompt else 2
        if len(texts) != expected:
            raise ValueError(f'the plain template takes {expected} turn(s) (human, gpt), got {len(texts)}')
        image = IMAGE_TOKEN if has_image else ''
        if not generation_prompt:  # preprocess_plain: the human turn becomes <image> alone
            return image + texts[1] + '\n', [(len(image), len(image) + len(texts[1]) + 1)]
        # at inference, the official PLAIN separator style: "<image>\n{question}\n"; no question: the
        # training prefix "<image>" alone, after which the model writes a caption
        question = texts[0].replace(IMAGE_TOKEN, '').strip()
        return (image + '\n' + question + '\n' if question else image), []
    t = tok.TEMPLATES[name] if isinstance(template, str) else template
    parts, spans, length = [t.system], [], len(t.system)
    for turn, text in zip(conversations, texts):
        role = t.user if turn['from'] == 'human' else t.assistant
        parts.append(role + text + t.end)
        if turn['from'] == 'gpt':
            spans.append((length + len(role), length + len(parts[-1])))
        length += len(parts[-1])
    if generation_prompt:
        if conversations[-1]['from'] != 'human':
            raise ValueError('a prompt ends with a human turn')
        parts.append(t.assistant)
    return ''.join(parts), spans


def tokenize_text(text: str, tokenizer, spans=(), style: str = 'official') -> tuple[list[int], list[int]]:
    """tokenizer_image_token over a rendered string, with labels: (ids, labels), <image> -> IMAGE_TOKEN_INDEX,
    a token supervised when it starts inside one of the spans."""
    tokenizer = _as_tokenizer(tokenizer)
    chunks, base = [], 0
    for part in text.split(IMAGE_TOKEN):
        chunks.append([(i, base + start) for i, start in tokenizer.encode_offsets(part, add_special_tokens=True)])
        base += len(part) + len(IMAGE_TOKEN)
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and chunks[0] and chunks[0][0][0] == bos else 0  # each chunk's own BOS
    pairs = chunks[0][:skip]
    for j, chunk in enumerate(chunks):
        pairs += ([(IMAGE_TOKEN_INDEX, -1)] if j else []) + chunk[skip:]
    if style == 'clean' and skip and len(pairs) > 1 and pairs[1][0] == bos:
        pairs = pairs[1:]  # the template's literal BOS stays, the tokenizer's automatic one goes
    ids = [i for i, _ in pairs]
    labels = [i if any(a <= start < b for a, b in spans) else IGNORE_INDEX for i, start in pairs]
    return ids, labels


def tokenize_conversation(conversations: list[dict], tokenizer, template: str | tok.ChatTemplate,
                          has_image: bool, style: str = 'official') -> tuple[list[int], list[int]]:
    """LLaVA turns -> (input_ids, labels), labels = ids on assistant replies and their end tokens,
    IGNORE_INDEX elsewhere. template: 'plain', 'llama3', 'phi3' or a tok.ChatTemplate."""
    text, spans = render(conversations, template, has_image, style=style)
    return tokenize_text(text, tokenizer, spans, style)


def tokenize_prompt(conversations: list[dict], tokenizer, template: str | tok.ChatTemplate,
                    has_image: bool, style: str = 'official') -> list[int]:
    """Prompt ids for generation: the turns so far (ending with a human turn), then the assistant
    prefix (chat templates), tokenized exactly as in training."""
    text, _ = render(conversations, template, has_image, generation_prompt=True, style=style)
    return tokenize_text(text, tokenizer, (), style)[0]


def expanded_length(input_ids: list[int], num_image_tokens: int) -> int:
    """Length the LLM sees: each placeholder becomes num_image_tokens visual tokens."""
    return len(input_ids) + (num_image_tokens - 1) * input_ids.count(IMAGE_TOKEN_INDEX)


def truncate(input_ids: list[int], labels: list[int], max_len: int | None,
             num_image_tokens: int) -> tuple[list[int], list[int]] | None:
    """Cuts the end so the expanded length is <= max_len. Returns None (drop the sample) when the
    cut would fall inside the visual tokens or leave nothing supervised."""
    if max_len is None or expanded_length(input_ids, num_image_tokens) <= max_len:
        return input_ids, labels
    keep, length = 0, 0
    for token in input_ids:
        width = num_image_tokens if token == IMAGE_TOKEN_INDEX else 1
        if length + width > max_len:
            break
        keep, length = keep + 1, length + width
    if IMAGE_TOKEN_INDEX in input_ids[keep:]:
        return None  # the image does not fit whole
    if all(label == IGNORE_INDEX for label in labels[:keep]):
        return None
    return input_ids[:keep], labels[:keep]


# ----------------------------------------------------------------------------------------------
# Datasets. A ConversationDataset turns record i into a training item; subclasses say where the
# records and images come from (LLaVA files here, the synthetic task in synthetic.py).

def florence_preprocess(images: list[Image.Image], pad_to_square: bool, size: int) -> torch.Tensor:
    # Imported late: data.py (tokenization, sampler) stays usable without the vision tower.
    from florence_encoder import preprocess
    return preprocess(images, pad_to_square=pad_to_square, size=size)


class ConversationDataset(torch.utils.data.Dataset):
    """Item i -> {'id': str, 'input_ids': (L,) long, 'labels': (L,) long,
    'pixel_values': (3, size, size) float or None, 'has_image': bool}, or None when dropped for length.

    pad_to_square: the recipe (facts, section 5) resizes to a square for pretraining (plain template)
    and pads to a square with the ImageNet-mean fill for instruction tuning; None picks by template.
    preprocess(images, pad_to_square=, size=) -> (B, 3, size, size); florence_encoder.preprocess by default."""

    max_warnings = 10  # drop warnings shown per dataset; every drop is counted in self.dropped

    def __init__(self, tokenizer, template: str | tok.ChatTemplate, *, num_image_tokens: int = 577,
                 max_len: int | None = 2048, size: int = 768, pad_to_square: bool | None = None,
                 preprocess: Callable[..., torch.Tensor] | None = None, style: str = 'official'):
        name = template if isinstance(template, str) else template.name
        if isinstance(template, str) and name not in TEMPLATE_NAMES:
            raise ValueError(f'unknown template {name!r}; expected one of {TEMPLATE_NAMES}')
        if style not in PROMPT_STYLES:
            raise ValueError(f'unknown prompt style {style!r}; expected one of {PROMPT_STYLES}')
        self.tokenizer, self.template, self.template_name = _as_tokenizer(tokenizer), template, name
        self.style = style
        self.num_image_tokens, self.max_len, self.size = num_image_tokens, max_len, size
        self.pad_to_square = name != 'plain' if pad_to_square is None else pad_to_square
        self.preprocess = preprocess or florence_preprocess
        self.dropped = 0  # per process: DataLoader workers count their own

    # --- what a subclass provides
    def record(self, i: int) -> dict:
        raise NotImplementedError

    def load_image(self, i: int, record: dict) -> Image.Image | None:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f'[{i}]'

    # --- shared
    def __getitem__(self, i: int) -> dict | None:
        record = self.record(i)
        problems = validate_record(record, self.template_name)
        if problems:
            raise DataError(f'{self.where(i)}: ' + '; '.join(problems))
        has_image = record.get('image') is not None
        try:
            ids, labels = tokenize_conversation(record['conversations'], self.tokenizer, self.template, has_image,
                                                self.style)
        except ValueError as e:
            raise DataError(f'{self.where(i)}: {e}') from e
        kept = truncate(ids, labels, self.max_len, self.num_image_tokens)
        if kept is None:
            self._drop(i, ids)
            return None
        ids, labels = kept
        pixel_values = None
        if has_image:
            image = self.load_image(i, record).convert('RGB')  # (load_image already gives RGB; a subclass may not)
            pixel_values = self.preprocess([image], pad_to_square=self.pad_to_square, size=self.size)[0]
        return {'id': str(record.get('id', i)), 'input_ids': torch.tensor(ids, dtype=torch.long),
                'labels': torch.tensor(labels, dtype=torch.long), 'pixel_values': pixel_values,
                'has_image': has_image}

    def _drop(self, i: int, ids: list[int]) -> None:
        self.dropped += 1
        if self.dropped <= self.max_warnings:
            more = ' (further drops are counted without a warning)' if self.dropped == self.max_warnings else ''
            warnings.warn(f'{self.where(i)}: dropped: {expanded_length(ids, self.num_image_tokens)} tokens '
                          f'> max_len {self.max_len}, and truncation would cut the image or every '
                          f'supervised token{more}', stacklevel=3)


class LLaVADataset(ConversationDataset):
    """LLaVA JSON (one list) or JSONL (one record per line) with images under image_root.

    JSONL is read lazily: the constructor indexes line offsets, item i reads one line. A JSON list is
    parsed once. The format is told by the first character ('[' means a JSON list)."""

    def __init__(self, path: str | Path, tokenizer, template, image_root: str | Path | None = None, **kwargs):
        super().__init__(tokenizer, template, **kwargs)
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        with open(self.path, 'rb') as f:
            head = f.read(4096).lstrip()
        self.records: list | None = None
        if head.startswith(b'['):
            raw = self.path.read_bytes()
            try:
                self.records = json.loads(raw.decode('utf-8'))
            except UnicodeDecodeError as e:
                line = raw.count(b'\n', 0, e.start) + 1
                raise DataError(f'{self.path}:{line}: not UTF-8 text '
                                f'(byte {raw[e.start]:#x} at offset {e.start})') from e
            except json.JSONDecodeError as e:
                raise DataError(f'{self.path}:{e.lineno}: invalid JSON: {e.msg}') from e
            if not isinstance(self.records, list):
                raise DataError(f'{self.path}: expected a JSON list of records')
        else:
            # Byte offset and 1-based line number of every non-blank line (int64 arrays: 16 bytes a record).
            self.offsets, self.lines = array('q'), array('q')
            with open(self.path, 'rb') as f:
                offset = 0
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        self.offsets.append(offset)
                        self.lines.append(number)
                    offset += len(line)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)

    def where(self, i: int) -> str:
        return f'{self.path}[{i}]' if self.records is not None else f'{self.path}:{self.lines[i]}'

    def record(self, i: int) -> dict:
        if self.records is not None:
            return self.records[i]
        with open(self.path, 'rb') as f:  # opened per read: safe in forked DataLoader workers
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            return json.loads(line.decode('utf-8'))
        except UnicodeDecodeError as e:
            raise DataError(f'{self.where(i)}: not UTF-8 text (byte {line[e.start]:#x} at column {e.start + 1})') from e
        except json.JSONDecodeError as e:
            raise DataError(f'{self.where(i)}: invalid JSON: {e.msg} (column {e.colno})') from e

    def load_image(self, i: int, record: dict) -> Image.Image:
        try:
            return load_image(self.image_root / record['image'])
        except DataError as e:
            raise DataError(f'{self.where(i)}: {e}') from e

    def check(self, check_image_files: bool = True, warnings_out: list | None = None) -> list[str]:
        """Every problem in the file, as 'where: problem' lines (for `data.py --check`); images are
        decoded in full. Warnings (usable but odd records) go to warnings_out when given.

        With a tokenizer and max_len, valid records are also tokenized as in training: one longer
        than max_len is a warning when truncation keeps it, a problem when it would be dropped."""
        out = []
        for i in range(len(self)):
            try:
                record = self.record(i)
            except DataError as e:
                out.append(str(e))
                continue
            problems = validate_record(record, self.template_name, self.image_root, check_image_files)
            notes = record_warnings(record)
            if not problems and self.tokenizer is not None and self.max_len is not None:
                problem, note = self._length_check(record)
                problems += [problem] if problem else []
                notes += [note] if note else []
            out += [f'{self.where(i)}: {p}' for p in problems]
            if warnings_out is not None:
                warnings_out += [f'{self.where(i)}: warning: {w}' for w in notes]
        return out

    def _length_check(self, record: dict) -> tuple[str | None, str | None]:
        """(problem, warning) about the length of a valid record, as __getitem__ would treat it."""
        try:
            ids, labels = tokenize_conversation(record['conversations'], self.tokenizer, self.template,
                                                record.get('image') is not None, self.style)
        except ValueError as e:
            return str(e), None
        length = expanded_length(ids, self.num_image_tokens)
        if length <= self.max_len:
            return None, None
        kept = truncate(ids, labels, self.max_len, self.num_image_tokens)
        if kept is None:
            return (f'{length} tokens > max_len {self.max_len}: the sample would be dropped (truncation would '
                    'cut the image or every supervised token)'), None
        supervised = sum(label != IGNORE_INDEX for label in labels)
        lost = supervised - sum(label != IGNORE_INDEX for label in kept[1])
        return None, (f'{length} tokens > max_len {self.max_len}: truncated to '
                      f'{expanded_length(kept[0], self.num_image_tokens)} tokens, {lost} of {supervised} '
                      'supervised tokens cut')


# ----------------------------------------------------------------------------------------------
# Batching

def right_pad(rows: list, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (lists or 1-D tensors) -> (B, T) long tensor right-padded with value, and the (B, T) long
    mask of the real entries. T = the longest row (0 for no rows)."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return out, mask


def collate(batch: list[dict | None], pad_id: int) -> dict:
    """Right-pads items into a batch; dropped items (None) are left out.

    Returns input_ids (B, T) long (the -200 placeholder kept: the model splices the visual tokens in),
    labels (B, T) (IGNORE_INDEX on padding), attention_mask (B, T) long, pixel_values (M, 3, S, S)
    for the M items that have an image in batch order (None when M = 0), has_image (B,) bool, ids.
    A batch whose items were all dropped has B = 0."""
    batch = [item for item in batch if item is not None]
    input_ids, attention_mask = right_pad([item['input_ids'] for item in batch], pad_id)
    labels, _ = right_pad([item['labels'] for item in batch], IGNORE_INDEX)
    images = [item['pixel_values'] for item in batch if item['has_image']]
    return {'input_ids': input_ids, 'labels': labels, 'attention_mask': attention_mask,
            'pixel_values': torch.stack(images) if images else None,
            'has_image': torch.tensor([item['has_image'] for item in batch], dtype=torch.bool),
            'ids': [item['id'] for item in batch]}


# ----------------------------------------------------------------------------------------------
# python data.py --check data.json --images root/

def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description='Validate a LLaVA JSON/JSONL file and its images up front: every '
                                'problem is printed with its line (JSONL) or index (JSON list). Exit 1 if any.')
    p.add_argument('--check', required=True, metavar='DATA', help='the LLaVA JSON/JSONL file')
    p.add_argument('--images', help='root folder of the images (default: the folder of the data file)')
    p.add_argument('--template', default='llama3', choices=TEMPLATE_NAMES,
                   help="the template it will be trained with ('plain' for pretraining: one human + one gpt turn)")
    p.add_argument('--no-images', action='store_true', help='do not open the image files')
    p.add_argument('--tokenizer', metavar='TOKENIZER_JSON',
                   help="the LLM's tokenizer.json (or its folder); with it, conversations longer than --max-len "
                        'are reported: a warning when truncated, a problem when dropped. Without it: no length check')
    p.add_argument('--max-len', type=int, default=2048, help="max sequence length, visual tokens included "
                                                              "(as train.py's --max-len)")
    p.add_argument('--prompt-style', choices=PROMPT_STYLES, default='official',
                   help="as train.py's --prompt-style (the length of a conversation depends on it)")
    p.add_argument('--num-image-tokens', type=int, default=577,
                   help='visual tokens one image takes (577: Florence-2 at 768 px)')
    args = p.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = tok.Tokenizer(args.tokenizer)
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            print(f'cannot read the tokenizer {args.tokenizer}: {e}', file=sys.stderr)
            return 1
    try:
        dataset = LLaVADataset(args.check, tokenizer, args.template, image_root=args.images, max_len=args.max_len,
                               num_image_tokens=args.num_image_tokens, style=args.prompt_style)
    except (DataError, OSError) as e:
        print(f'{e}\n1 problem: the file cannot be read', file=sys.stderr)
        return 1
    if tokenizer is None:
        print('note: no --tokenizer given: lengths are not checked against --max-len')
    notes: list[str] = []
    problems = dataset.check(check_image_files=not args.no_images, warnings_out=notes)
    for line in problems + notes:
        print(line)
    bad = len({line.split(': ', 1)[0] for line in problems})
    print(f'{dataset.path}: {len(dataset)} records, {len(problems)} problem(s) in {bad} record(s), '
          f'{len(notes)} warning(s)')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
