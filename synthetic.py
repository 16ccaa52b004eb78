"""An embedded synthetic task: images drawn with Pillow on the fly, LLaVA-style conversations about
them, and a tokenizer trained on their text. Nothing is downloaded and no file is needed.

A scene is one or two coloured shapes and one word, each in its own cell of a 3x3 grid:

    "Describe the image."                -> "a red circle at the top left, a blue square at the
                                             bottom right and the word cat"      (what is there)
    "What word is written in the image?" -> "cat"                                (what text)
    "Where is the red circle?"           -> "top left"                           (where)
    "What is at the top left?"           -> "a red circle"                       (what is where)

The answer spaces are small and every answer depends on the image, so a tiny model trained from
scratch for a few minutes can reach high held-out exact-match accuracy while a text-only model
cannot. Scenes are split by a hash of their content: no held-out scene ever occurs in training.
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass

import tokenizers
from PIL import Image, ImageDraw, ImageFont
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokenizer import Tokenizer
from data import IMAGE_TOKEN, ConversationDataset

COLORS = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (30, 70, 220), 'yellow': (235, 190, 0)}
SHAPES = ('circle', 'square', 'triangle', 'diamond')
WORDS = ('cat', 'dog', 'sun', 'box', 'pen', 'key', 'map', 'hat')
ROWS, COLS = ('top', 'middle', 'bottom'), ('left', 'center', 'right')
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
KINDS = ('caption', 'ocr', 'where', 'what')
HELDOUT_ONE_IN = 10  # share of scenes reserved for the held-out split

CAPTION_QUESTION = 'Describe the image.'
OCR_QUESTION = 'What word is written in the image?'


def cell_name(cell: int) -> str:
    """0..8, row-major -> 'top left' ... 'bottom right'."""
    return f'{ROWS[cell // 3]} {COLS[cell % 3]}'


# ----------------------------------------------------------------------------------------------
# Scenes

@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    cell: int

    @property
    def name(self) -> str:
        return f'{self.color} {self.shape}'


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in cell order; distinct (colour, shape) so "Where is the X?" is unambiguous
    word: str
    word_cell: int

    def caption(self) -> str:
        parts = [f'a {s.name} at the {cell_name(s.cell)}' for s in self.shapes]
        return ', '.join(parts) + f' and the word {self.word}'

    def split(self) -> str:
        # sha256 of the content, not Python's hash(): the same on every machine and every run.
        digest = hashlib.sha256(repr((self.shapes, self.word, self.word_cell)).encode()).digest()
        return 'heldout' if int.from_bytes(digest[:8], 'big') % HELDOUT_ONE_IN == 0 else 'train'

    def qa(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """One (question, answer) of the given kind."""
        if kind == 'caption':
            return CAPTION_QUESTION, self.caption()
        if kind == 'ocr':
            return OCR_QUESTION, self.word
        if kind == 'where':
            target = rng.choice(list(self.shapes) + [None])  # None: the word
            if target is None:
                return 'Where is the word?', cell_name(self.word_cell)
            return f'Where is the {target.name}?', cell_name(target.cell)
        if kind == 'what':
            target = rng.choice(list(self.shapes) + [None])
            if target is None:
                return f'What is at the {cell_name(self.word_cell)}?', f'the word {self.word}'
            return f'What is at the {cell_name(target.cell)}?', f'a {target.name}'
        raise ValueError(f'unknown question kind {kind!r}')


def random_scene(rng: random.Random) -> Scene:
    n_shapes = rng.choice((1, 2))
    cells = rng.sample(range(9), n_shapes + 1)  # the last cell holds the word
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_shapes)
    shapes = sorted((Shape(s, c, cell) for (c, s), cell in zip(kinds, cells)), key=lambda s: s.cell)
    return Scene(tuple(shapes), rng.choice(WORDS), cells[-1])


# ----------------------------------------------------------------------------------------------
# Rendering. Shapes are drawn without anti-aliasing, so each pixel is the background or exactly its
# shape's colour (the tests read the answers back from the pixels); text is black, anti-aliased.

def _cell_box(cell: int, size: int) -> tuple[float, float, float]:
    """Centre x, centre y and side of a grid cell in pixels."""
    side = size / 3
    return (cell % 3 + 0.5) * side, (cell // 3 + 0.5) * side, side


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, size: int, dx: float, dy: float, scale: float):
    cx, cy, side = _cell_box(shape.cell, size)
    cx, cy, r = cx + dx, cy + dy, 0.32 * side * scale  # r: half the shape's extent
    fill = COLORS[shape.color]
    if shape.shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.shape == 'square':
        h = 0.85 * r  # a slightly smaller square so its area is near the circle's
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.shape == 'triangle':  # apex up; the cell centre stays well inside
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape.shape == 'diamond':
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f'unknown shape {shape.shape!r}')


def _ink(word: str, font, stroke: int = 0) -> Image.Image:
    """The word drawn black on white, cropped to its ink."""
    box = ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), word, font=font, stroke_width=stroke)
    canvas = Image.new('RGB', (box[2] + 2, box[3] + 2), BACKGROUND)
    ImageDraw.Draw(canvas).text((1, 1), word, fill=INK, font=font, stroke_width=stroke, stroke_fill=INK)
    return canvas.crop(canvas.convert('L').point(lambda v: 255 - v).getbbox())


def word_image(word: str, height: int, bitmap: bool = False) -> Image.Image:
    """The word in bold black on white, cropped to its ink, about `height` pixels tall.

    Pillow's default font at a given size needs FreeType (Pillow >= 10.1); without it (or with
    bitmap=True) the small built-in bitmap font is drawn and scaled up."""
    if not bitmap:
        try:
            font = ImageFont.load_default(size=height)
        except (TypeError, ImportError, OSError):
            bitmap = True
    if not bitmap:
        return _ink(word, font, stroke=max(1, round(height / 20)))  # thin strokes vanish at small sizes
    small = _ink(word, ImageFont.load_default_imagefont() if hasattr(ImageFont, 'load_default_imagefont')
                 else ImageFont.load_default())
    scale = max(1, round(0.8 * height / small.height))
    return small.resize((small.width * scale, small.height * scale), Image.NEAREST)


def render(scene: Scene, size: int = 128, jitter: float = 0.0, rng: random.Random | None = None,
           bitmap_font: bool = False) -> Image.Image:
    """The scene as a size x size RGB image. jitter: each object moves by up to jitter * cell side
    and shapes scale by 1 +- jitter (needs rng); 0 draws every object exactly at its cell centre.
    Up to 0.1 every object stays inside its own cell."""
    if not 0 <= jitter <= 0.1:
        raise ValueError(f'jitter {jitter} outside [0, 0.1]: objects would leave their cells')
    if jitter and rng is None:
        raise ValueError('jitter needs an rng')
    image = Image.new('RGB', (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = size / 3

    def offset() -> float:
        return rng.uniform(-jitter, jitter) * side if jitter else 0.0

    for shape in scene.shapes:
        dx, dy = offset(), offset()
        _draw_shape(draw, shape, size, dx, dy, 1 + offset() / side)
    word = word_image(scene.word, max(6, round(0.5 * side)), bitmap=bitmap_font)
    if word.width > 0.8 * side:  # keep the word inside its cell, jitter included
        word = word.resize((int(0.8 * side), max(1, round(word.height * 0.8 * side / word.width))), Image.BILINEAR)
    cx, cy, _ = _cell_box(scene.word_cell, size)
    image.paste(word, (round(cx + offset() - word.width / 2), round(cy + offset() - word.height / 2)))
    return image


# ----------------------------------------------------------------------------------------------
# Dense labels for the tiny default's vision stage (train.py, stage 0): what each cell of the 3x3 grid
# holds. The real runs start from a pretrained Florence-2 that already names regions; these labels let
# the random tiny tower learn the same kind of skill first.

CELL_CLASSES = ('empty', *(f'a {c} {s}' for c in COLORS for s in SHAPES), *(f'the word {w}' for w in WORDS))


def cell_labels(scene: Scene) -> list[int]:
    """Index into CELL_CLASSES of each of the 9 cells, row-major."""
    labels = [0] * 9
    for s in scene.shapes:
        labels[s.cell] = CELL_CLASSES.index(f'a {s.name}')
    labels[scene.word_cell] = CELL_CLASSES.index(f'the word {scene.word}')
    return labels


# ----------------------------------------------------------------------------------------------
# Samples and the dataset

@dataclass
class SyntheticSample:
    id: str
    scene: Scene
    conversations: list[dict]  # LLaVA form: [{'from': 'human', 'value': '<image>\n...'}, {'from': 'gpt', ...}]
    kinds: list[str]           # question kind per human turn
    answers: list[str]         # reference answer per gpt turn, for eval.exact_match


class SyntheticDataset(ConversationDataset):
    """n samples of split 'train' or 'heldout', deterministic from (seed, split, index).

    flavour 'pretrain': one caption per image, plain template (stage 1); 'finetune': one to three
    questions per image (a share `multi_turn` of the samples has several), phi3 template (stage 2).
    text_only: the same conversations without the image (the text-only baseline).
    image_size: the drawn image; the tower input size is `size` (passed to preprocess)."""

    def __init__(self, split: str = 'train', n: int = 1000, seed: int = 0, image_size: int = 128,
                 flavour: str = 'finetune', tokenizer=None, template=None, *, text_only: bool = False,
                 multi_turn: float = 0.25, jitter: float = 0.05, **kwargs):
        if split not in ('train', 'heldout'):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if flavour not in ('pretrain', 'finetune'):
            raise ValueError(f"flavour must be 'pretrain' or 'finetune', got {flavour!r}")
        template = template or ('plain' if flavour == 'pretrain' else 'phi3')
        kwargs.setdefault('size', image_size)
        super().__init__(tokenizer or synthetic_tokenizer(), template, **kwargs)
        self.split, self.n, self.seed, self.image_size = split, n, seed, image_size
        self.flavour, self.text_only, self.multi_turn, self.jitter = flavour, text_only, multi_turn, jitter

    def __len__(self) -> int:
        return self.n

    def where(self, i: int) -> str:
        return f'synthetic/{self.split}[{i}]'

    def _rng(self, i: int, stream: str) -> random.Random:
        if not 0 <= i < self.n:
            raise IndexError(f'{self.where(i)} outside [0, {self.n})')
        return random.Random(f'florence-vl-synthetic/{self.seed}/{self.split}/{i}/{stream}')  # seeded via sha512

    def sample(self, i: int) -> SyntheticSample:
        rng = self._rng(i, 'scene')
        scene = random_scene(rng)
        while scene.split() != self.split:  # rejection keeps the two splits' scenes disjoint
            scene = random_scene(rng)
        if self.flavour == 'pretrain':
            kinds = ['caption']
        else:
            n_turns = rng.choice((2, 3)) if rng.random() < self.multi_turn else 1
            kinds = [rng.choice(KINDS) for _ in range(n_turns)]
        conversations, answers, asked = [], [], set()
        for j, kind in enumerate(kinds):
            question, answer = scene.qa(kind, rng)
            while question in asked:  # no repeated question within a conversation
                kinds[j] = rng.choice(KINDS)
                question, answer = scene.qa(kinds[j], rng)
            asked.add(question)
            prefix = IMAGE_TOKEN + '\n' if j == 0 and not self.text_only else ''
            conversations += [{'from': 'human', 'value': prefix + question}, {'from': 'gpt', 'value': answer}]
            answers.append(answer)
        return SyntheticSample(f'synthetic-{self.split}-{self.seed}-{i}', scene, conversations, kinds, answers)

    def image(self, i: int) -> Image.Image:
        return render(self.sample(i).scene, self.image_size, self.jitter, self._rng(i, 'render'))

    def record(self, i: int) -> dict:
        s = self.sample(i)
        return {'id': s.id, 'conversations': s.conversations, **({} if self.text_only else {'image': s.id})}

    def load_image(self, i: int, record: dict) -> Image.Image:
        return self.image(i)


# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the task's text (every string round-trips exactly through
# encode/decode, so exact match on decoded text is meaningful), with the phi3 template's special
# tokens, so the tiny LLM speaks the same template as Phi-3.5.

SPECIAL_TOKENS = ('<|endoftext|>', '<|pad|>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
PAD_TOKEN = '<|pad|>'


def synthetic_corpus() -> list[str]:
    """Every phrase the task can produce, each as it is tokenized (as its own piece), sorted."""
    # The phi3 template's text outside its special tokens, then the questions and answers.
    texts = {'\n', '\nYou are a helpful AI assistant.', CAPTION_QUESTION, OCR_QUESTION, 'Where is the word?'}
    for cell in range(9):
        texts |= {f'What is at the {cell_name(cell)}?', cell_name(cell)}
    for color in COLORS:
        for shape in SHAPES:
            texts |= {f'Where is the {color} {shape}?', f'a {color} {shape}',
                      f'a {color} {shape} at the {cell_name(0)}, a {color} {shape} at the {cell_name(8)}'}
    for word in WORDS:
        texts |= {word, f'the word {word}', f'{cell_name(4)} and the word {word}'}
    return sorted(texts)


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer() -> Tokenizer:
    """Deterministic: BPE training on a sorted corpus breaks ties by pair order, not by chance."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(synthetic_corpus(), trainer)
    return Tokenizer(tok)
