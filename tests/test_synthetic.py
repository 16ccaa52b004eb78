"""synthetic.py: the embedded task is deterministic, its splits are disjoint, every answer can be
read back from the pixels (by a small reader written here, independent of the generator's
bookkeeping), the question alone does not give the answer away, and its tokenizer round-trips."""
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import synthetic as S
from eval import exact_match
from tokenizer import render_chat
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, collate, tokenize_conversation
from train_dist import ResumableSampler


def fake_preprocess(images, pad_to_square, size):
    arrays = [np.asarray(im.resize((size, size)), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def dataset(split='train', n=64, **kwargs):
    return S.SyntheticDataset(split, n, preprocess=fake_preprocess, **kwargs)


# ----------------------------------------------------------------------------------------------
# A reader that answers the questions from the image alone.

def cells(image):
    a = np.asarray(image).astype(int)
    side = a.shape[0] / 3
    for cell in range(9):
        r, c = divmod(cell, 3)
        yield cell, a[round(r * side):round((r + 1) * side), round(c * side):round((c + 1) * side)]


def shape_of(mask):
    """Classify a filled shape from its pixel mask: how much of its bounding box it fills, and
    where its widest row is (a triangle's is at the bottom, a diamond's in the middle)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return 'square'
    if 0.7 < fill < 0.88:
        return 'circle'
    widest = np.argmax(box.sum(1)) / (box.shape[0] - 1)
    return 'triangle' if widest > 0.8 else 'diamond' if 0.3 < widest < 0.7 else '?'


def word_templates(size):
    """Each vocabulary word as the generator draws it, cropped to its ink."""
    out = {}
    for word in S.WORDS:
        for _, crop in cells(S.render(S.Scene((), word, 4), size)):
            if (crop < 128).any():
                out[word] = ink(crop)
    return out


def ink(crop):
    grey = crop.min(-1)
    ys, xs = np.nonzero(grey < 250)
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def read(image, templates):
    """-> {cell: 'red circle' | 'word cat'}, read from the pixels."""
    found = {}
    for cell, crop in cells(image):
        colours = [name for name, rgb in S.COLORS.items() if (crop == rgb).all(-1).sum() > 20]
        grey = (crop[..., 0] == crop[..., 1]) & (crop[..., 1] == crop[..., 2])
        if colours:
            assert len(colours) == 1 and ((crop == S.COLORS[colours[0]]).all(-1) | (crop == 255).all(-1)).all()
            found[cell] = f'{colours[0]} {shape_of((crop == S.COLORS[colours[0]]).all(-1))}'
        elif (crop < 128).all(-1).sum() > 10:
            assert grey.all()  # text is black ink on white
            text = ink(crop)
            matches = [w for w, t in templates.items() if t.shape == text.shape and (t == text).all()]
            assert len(matches) == 1
            found[cell] = f'word {matches[0]}'
        else:
            assert (crop == 255).all()  # empty cells are blank
    return found


def answer(question, found):
    """What a reader of `found` answers."""
    question = question.replace('<image>\n', '')
    by_name = {v: k for k, v in found.items()}
    word = next(v[5:] for v in found.values() if v.startswith('word '))
    if question == S.CAPTION_QUESTION:
        shapes = [f'a {v} at the {S.cell_name(k)}' for k, v in sorted(found.items()) if not v.startswith('word')]
        return ', '.join(shapes) + f' and the word {word}'
    if question == S.OCR_QUESTION:
        return word
    if question == 'Where is the word?':
        return S.cell_name(by_name[f'word {word}'])
    if question.startswith('Where is the '):
        return S.cell_name(by_name[question[len('Where is the '):-1]])
    cell = [S.cell_name(c) for c in range(9)].index(question[len('What is at the '):-1])
    thing = found[cell]
    return f'the {thing}' if thing.startswith('word') else f'a {thing}'


@pytest.mark.parametrize('split, jitter, size', [('train', 0.05, 128), ('heldout', 0.1, 128), ('train', 0.05, 96)])
def test_every_answer_can_be_read_from_the_image(split, jitter, size):
    ds = dataset(split, 60, image_size=size, jitter=jitter)
    templates = word_templates(size)
    kinds = Counter()
    for i in range(len(ds)):
        sample, image = ds.sample(i), ds.image(i)
        assert image.mode == 'RGB' and image.size == (size, size)
        found = read(image, templates)
        for question, reference in zip(sample.conversations[::2], sample.answers):
            assert answer(question['value'], found) == reference, (i, question, found)
        kinds.update(sample.kinds)
    assert set(kinds) == set(S.KINDS)


def test_cell_labels_name_what_the_pixels_show():
    """train.py's vision stage learns these labels: each cell's content as read back from the image."""
    ds = dataset('train', 40, image_size=96)
    templates = word_templates(96)
    for i in range(len(ds)):
        found = read(ds.image(i), templates)
        named = [S.CELL_CLASSES[k] for k in S.cell_labels(ds.sample(i).scene)]
        shown = ['empty' if c not in found else ('the ' if found[c].startswith('word') else 'a ') + found[c]
                 for c in range(9)]
        assert named == shown, i


def test_shapes_sit_at_their_cell_centre_in_their_colour():
    ds = dataset('train', 40, jitter=0.1)
    for i in range(len(ds)):
        scene, a = ds.sample(i).scene, np.asarray(ds.image(i))
        for shape in scene.shapes:
            cx, cy, _ = S._cell_box(shape.cell, 128)
            assert tuple(a[int(cy), int(cx)]) == S.COLORS[shape.color]


def test_words_are_big_enough_to_read_and_the_bitmap_fallback_works():
    for bitmap in (False, True):
        for word in S.WORDS:
            text = np.asarray(S.word_image(word, 21, bitmap=bitmap).convert('L'))
            assert text.shape[0] >= 12 and (text < 128).sum() > 40, (word, bitmap)
        drawings = {S.word_image(w, 21, bitmap=bitmap).tobytes() for w in S.WORDS}
        assert len(drawings) == len(S.WORDS)


# ----------------------------------------------------------------------------------------------
# Determinism and splits

def test_samples_are_deterministic_in_seed_and_index():
    a, b = dataset('train', 20, seed=1), dataset('train', 20, seed=1)
    for i in range(20):
        assert a.sample(i) == b.sample(i) and a.image(i).tobytes() == b.image(i).tobytes()
        assert torch.equal(a[i]['input_ids'], b[i]['input_ids'])
    c = dataset('train', 20, seed=2)
    assert sum(a.sample(i).scene == c.sample(i).scene for i in range(20)) < 3


def test_heldout_scenes_never_occur_in_training():
    train = {dataset('train', 3000).sample(i).scene for i in range(3000)}
    heldout = [dataset('heldout', 300, seed=5).sample(i).scene for i in range(300)]
    assert not train & set(heldout)
    assert all(s.split() == 'train' for s in train) and all(s.split() == 'heldout' for s in heldout)
    assert len(set(heldout)) > 250  # and it is not one scene repeated


def test_the_question_alone_does_not_give_the_answer():
    """The best text-only guess (the most common training answer to each question) on held-out."""
    train, heldout = dataset('train', 3000), dataset('heldout', 300)
    answers = {}
    for i in range(len(train)):
        s = train.sample(i)
        for q, a in zip(s.conversations[::2], s.answers):
            answers.setdefault(q['value'].replace('<image>\n', ''), Counter())[a] += 1
    hits = total = 0
    for i in range(len(heldout)):
        s = heldout.sample(i)
        for q, a in zip(s.conversations[::2], s.answers):
            guess = answers.get(q['value'].replace('<image>\n', ''), Counter({'': 1})).most_common(1)[0][0]
            hits, total = hits + exact_match(guess, [a]), total + 1
    assert hits / total < 0.3


def test_flavours_templates_and_multi_turn():
    ft = dataset('train', 200)
    turns = Counter(len(ft.sample(i).answers) for i in range(200))
    assert turns[1] > 100 and turns[2] + turns[3] > 20
    for i in range(200):
        s = ft.sample(i)
        assert s.conversations[0]['value'].startswith('<image>\n')
        assert len({t['value'] for t in s.conversations[::2]}) == len(s.answers)  # no question twice
    pt = dataset('train', 20, flavour='pretrain')
    assert pt.template == 'plain' and not pt.pad_to_square and ft.template == 'phi3' and ft.pad_to_square
    for i in range(20):
        s = pt.sample(i)
        assert s.kinds == ['caption'] and s.answers == [s.scene.caption()]
        item = pt[i]
        # plain: the image, then the caption and '\n', all supervised
        assert item['input_ids'][0] == IMAGE_TOKEN_INDEX and item['labels'][0] == IGNORE_INDEX
        assert pt.tokenizer.decode(item['labels'][1:].tolist()) == s.answers[0] + '\n'


def test_text_only_flavour_has_the_same_questions_without_the_image():
    with_image, text_only = dataset('train', 30), dataset('train', 30, text_only=True)
    for i in range(30):
        a, b = with_image.sample(i), text_only.sample(i)
        assert a.answers == b.answers
        assert [t['value'].replace('<image>\n', '') for t in a.conversations] == [t['value'] for t in b.conversations]
        item = text_only[i]
        assert not item['has_image'] and item['pixel_values'] is None
        assert IMAGE_TOKEN_INDEX not in item['input_ids'].tolist()


def test_items_batch_through_the_sampler_and_collate():
    ds = dataset('train', 10, num_image_tokens=17, max_len=256)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, 2, 1, seed=0),
                                         collate_fn=lambda b: collate(b, ds.tokenizer.token_to_id(S.PAD_TOKEN)))
    batches = list(loader)
    assert [len(b['ids']) for b in batches] == [4, 1]
    assert batches[0]['pixel_values'].shape == (4, 3, 128, 128)
    assert ((batches[0]['input_ids'] == IMAGE_TOKEN_INDEX).sum(1) == 1).all()


# ----------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_round_trips_every_synthetic_text_and_knows_the_phi3_specials():
    tok = S.synthetic_tokenizer()
    for special in S.SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1 and tok.token_to_id(special) is not None
    ds = dataset('train', 100)
    for i in range(100):
        conv = ds.sample(i).conversations
        ids, labels = tokenize_conversation(conv, tok, 'phi3', has_image=True)
        text = tok.decode([t for t in ids if t != IMAGE_TOKEN_INDEX])
        assert text == render_chat('phi3', [
            {'role': 'user' if t['from'] == 'human' else 'assistant', 'content': t['value'].replace('<image>', '')}
            for t in conv], add_generation_prompt=False)
        for t in conv[1::2]:
            ids = tok.encode(t['value'])
            assert tok.decode(ids) == t['value'] and len(ids) <= len(t['value'].split()) + 2  # words are tokens
    assert tok.decode(tok.encode('unseen text: 42 ü')) == 'unseen text: 42 ü'  # bytes cover the rest


def test_tokenizer_is_the_same_in_a_fresh_process():
    code = 'import synthetic; print(synthetic.synthetic_tokenizer().tok.to_str())'
    other = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == S.synthetic_tokenizer().tok.to_str()
