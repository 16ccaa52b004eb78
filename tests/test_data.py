"""data.py: templates -> ids/labels, truncation, LLaVA files, images, collate, sampler.

The label masks are checked against expectations written out token by token, with a small
hand-made word-level tokenizer so every id has a readable name. The synthetic task has its own
file, tests/test_synthetic.py."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import tokenizers
from PIL import Image
from tokenizers import Regex, models, pre_tokenizers, processors

import data
from tokenizer import Tokenizer
from train_dist import ResumableSampler
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataError, LLaVADataset, collate,
                  expanded_length, load_image, tokenize_conversation, tokenize_prompt, truncate, validate_record)

REPO = Path(__file__).resolve().parents[1]
PY, ENV = sys.executable, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

IMG = '<image>'
SPECIALS = ['<unk>', '<pad>', '<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>',
            '<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
WORDS = ['\n', '.', ',', '?', 'system', 'user', 'assistant', 'A', 'chat', 'between', 'a', 'curious', 'and',
         'an', 'artificial', 'intelligence', 'The', 'gives', 'helpful', 'detailed', 'polite', 'answers', 'to',
         'the', "user's", 'questions', 'You', 'are', 'AI', 'What', 'is', 'this', 'cat', 'Describe', 'it',
         'red', 'dog', 'Where', 'top', 'left', 'color', 'Hi', 'hello']

# The system blocks of tokenizer.TEMPLATES, spelled out by hand.
PHI3_SYSTEM = ['<|system|>', '\n', 'You', 'are', 'a', 'helpful', 'AI', 'assistant', '.', '<|end|>']
LLAMA3_SYSTEM = ['<|begin_of_text|>', '<|start_header_id|>', 'system', '<|end_header_id|>', '\n', '\n',
                 'A', 'chat', 'between', 'a', 'curious', 'user', 'and', 'an', 'artificial', 'intelligence',
                 'assistant', '.', 'The', 'assistant', 'gives', 'helpful', ',', 'detailed', ',', 'and', 'polite',
                 'answers', 'to', 'the', "user's", 'questions', '.', '<|eot_id|>']
LLAMA3_USER = ['<|start_header_id|>', 'user', '<|end_header_id|>', '\n', '\n']
LLAMA3_ASSISTANT = ['<|start_header_id|>', 'assistant', '<|end_header_id|>', '\n', '\n']


def word_tokenizer(bos: bool = False) -> Tokenizer:
    """Spaces separate tokens; '\\n' and punctuation are tokens of their own."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(' ', 'removed'),
                                                 pre_tokenizers.Split(Regex(r'\n|[.,?]'), 'isolated')])
    tok.add_special_tokens(SPECIALS)
    if bos:  # a post-processor that prepends BOS, as Llama 3's does
        tok.post_processor = processors.TemplateProcessing(
            single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', vocab['<|begin_of_text|>'])])
    return Tokenizer(tok)


TOK = word_tokenizer()


def spell(ids):
    return [IMG if i == IMAGE_TOKEN_INDEX else TOK.tok.id_to_token(i) for i in ids]


def check(ids, labels, spec):
    """spec: the expected tokens in order; a nested list holds supervised tokens."""
    tokens, supervised = [], []
    for item in spec:
        group = item if isinstance(item, list) else [item]
        tokens += group
        supervised += [isinstance(item, list)] * len(group)
    assert spell(ids) == tokens
    assert [label != IGNORE_INDEX for label in labels] == supervised
    assert all(label == i for i, label in zip(ids, labels) if label != IGNORE_INDEX)
    assert '<unk>' not in tokens


def turns(*values):
    return [{'from': 'human' if j % 2 == 0 else 'gpt', 'value': v} for j, v in enumerate(values)]


# ----------------------------------------------------------------------------------------------
# Templates

def test_phi3_single_turn_supervises_reply_and_end_token_only():
    ids, labels = tokenize_conversation(turns('<image>\nWhat is this ?', 'a cat'), TOK, 'phi3', has_image=True)
    check(ids, labels, [*PHI3_SYSTEM, '\n', '<|user|>', '\n', IMG, '\n', 'What', 'is', 'this', '?', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['a', 'cat', '<|end|>']])


def test_phi3_multi_turn_supervises_every_reply():
    conv = turns('<image>\nWhat is this ?', 'a cat', 'What color ?', 'red', 'Where ?', 'top left')
    ids, labels = tokenize_conversation(conv, TOK, 'phi3', has_image=True)
    check(ids, labels, [*PHI3_SYSTEM,
                        '\n', '<|user|>', '\n', IMG, '\n', 'What', 'is', 'this', '?', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['a', 'cat', '<|end|>'],
                        '\n', '<|user|>', '\n', 'What', 'color', '?', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['red', '<|end|>'],
                        '\n', '<|user|>', '\n', 'Where', '?', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['top', 'left', '<|end|>']])


def test_llama3_single_turn():
    ids, labels = tokenize_conversation(turns('<image>\nDescribe it .', 'a red dog .'), TOK, 'llama3', True)
    check(ids, labels, [*LLAMA3_SYSTEM, *LLAMA3_USER, IMG, '\n', 'Describe', 'it', '.', '<|eot_id|>',
                        *LLAMA3_ASSISTANT, ['a', 'red', 'dog', '.', '<|eot_id|>']])


def test_llama3_multi_turn_with_image_in_the_middle_of_the_text():
    """As LLaVA's preprocess_multimodal: <image> moves to the front of its turn; style 'clean' leaves it."""
    conv = turns('What is <image> this ?', 'a dog', 'Hi', 'hello')
    rest = ['<|eot_id|>', *LLAMA3_ASSISTANT, ['a', 'dog', '<|eot_id|>'], *LLAMA3_USER, 'Hi', '<|eot_id|>',
            *LLAMA3_ASSISTANT, ['hello', '<|eot_id|>']]
    check(*tokenize_conversation(conv, TOK, 'llama3', has_image=True),
          [*LLAMA3_SYSTEM, *LLAMA3_USER, IMG, '\n', 'What', 'is', 'this', '?', *rest])
    check(*tokenize_conversation(conv, TOK, 'llama3', has_image=True, style='clean'),
          [*LLAMA3_SYSTEM, *LLAMA3_USER, 'What', 'is', IMG, 'this', '?', *rest])


def test_image_in_a_later_human_turn():
    conv = turns('Hi', 'hello', 'What is this ? <image>', 'a cat')
    first = [*PHI3_SYSTEM, '\n', '<|user|>', '\n', 'Hi', '<|end|>', '\n', '<|assistant|>', '\n', ['hello', '<|end|>'],
             '\n', '<|user|>', '\n']
    last = ['<|end|>', '\n', '<|assistant|>', '\n', ['a', 'cat', '<|end|>']]
    check(*tokenize_conversation(conv, TOK, 'phi3', True), [*first, IMG, '\n', 'What', 'is', 'this', '?', *last])
    check(*tokenize_conversation(conv, TOK, 'phi3', True, style='clean'),
          [*first, 'What', 'is', 'this', '?', IMG, *last])


def test_image_without_placeholder_leads_the_first_human_turn():
    ids, labels = tokenize_conversation(turns('What is this ?', 'a cat'), TOK, 'phi3', has_image=True)
    check(ids, labels, [*PHI3_SYSTEM, '\n', '<|user|>', '\n', IMG, '\n', 'What', 'is', 'this', '?', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['a', 'cat', '<|end|>']])


def test_text_only_sample():
    ids, labels = tokenize_conversation(turns('Hi', 'hello'), TOK, 'phi3', has_image=False)
    check(ids, labels, [*PHI3_SYSTEM, '\n', '<|user|>', '\n', 'Hi', '<|end|>',
                        '\n', '<|assistant|>', '\n', ['hello', '<|end|>']])


def test_plain_template_replaces_the_human_turn_by_the_image():
    ids, labels = tokenize_conversation(turns('<image>\nDescribe it .', 'a red dog'), TOK, 'plain', True)
    check(ids, labels, [IMG, ['a', 'red', 'dog', '\n']])


def test_bos_as_tokenizer_image_token_keeps_it():
    """Each chunk is tokenized with the tokenizer's BOS, the first chunk's is kept: plain starts with it; the
    llama3 template's literal <|begin_of_text|> follows it (the official ids: 128000, 128000, 128006, ...);
    style 'clean' keeps one."""
    tok = word_tokenizer(bos=True)
    ids, labels = tokenize_conversation(turns('<image>', 'a red dog'), tok, 'plain', True)
    check(ids, labels, ['<|begin_of_text|>', IMG, ['a', 'red', 'dog', '\n']])
    ids, _ = tokenize_conversation(turns('Hi', 'hello'), tok, 'llama3', False)
    assert spell(ids)[:3] == ['<|begin_of_text|>', '<|begin_of_text|>', '<|start_header_id|>']
    ids, _ = tokenize_conversation(turns('<image>\nHi', 'hello'), tok, 'llama3', True)  # the chunk after the image
    assert spell(ids).count('<|begin_of_text|>') == 2 and spell(ids)[:2] == ['<|begin_of_text|>'] * 2
    for has_image in (False, True):
        ids, _ = tokenize_conversation(turns('<image>\nHi' if has_image else 'Hi', 'hello'), tok, 'llama3', has_image,
                                       style='clean')
        assert spell(ids).count('<|begin_of_text|>') == 1 and spell(ids)[1] == '<|start_header_id|>'


def test_prompt_is_the_training_sequence_up_to_the_reply():
    conv = turns('<image>\nWhat is this ?', 'a cat', 'What color ?', 'red')
    for template in ('phi3', 'llama3', 'plain'):
        full, labels = tokenize_conversation(conv[:2] if template == 'plain' else conv, TOK, template, True)
        # plain at inference: the training prefix "<image>" when there is no question
        prompt = tokenize_prompt(turns('<image>') if template == 'plain' else conv[:3], TOK, template, True)
        first_supervised = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
        assert prompt == full[:first_supervised], template


def test_plain_prompt_with_a_question_as_the_official_plain_separator_style():
    ids = tokenize_prompt(turns('<image>\nWhat is this ?'), TOK, 'plain', True)
    assert spell(ids) == [IMG, '\n', 'What', 'is', 'this', '?', '\n']


@pytest.mark.parametrize('conv, has_image, template', [
    (turns('<image> hi', 'hello'), False, 'phi3'),                 # placeholder but no image
    (turns('<image> <image>', 'hello'), True, 'phi3'),             # two images
    (turns('Hi', '<image>'), True, 'phi3'),                        # image in a reply
    (turns('<image>', 'a', 'Hi', 'hello'), True, 'plain'),         # plain takes one exchange
    ([{'from': 'system', 'value': 'Hi'}, {'from': 'gpt', 'value': 'hello'}], False, 'phi3'),
])
def test_bad_conversations_raise(conv, has_image, template):
    with pytest.raises(ValueError):
        tokenize_conversation(conv, TOK, template, has_image)


def test_validate_record_lists_each_problem():
    assert validate_record({'image': 'a.png', 'conversations': turns('<image>\nHi', 'hello')}) == []
    assert validate_record({'conversations': turns('Hi', 'hello')}) == []
    assert validate_record([1]) and validate_record({'id': 1})
    problems = validate_record({'conversations': [{'from': 'gpt', 'value': 'x <image>'},
                                                  {'from': 'human', 'value': '<image>'}, {'from': 'gpt'}]})
    text = '\n'.join(problems)
    assert 'turn 0' in text and 'turn 1' in text and 'turn 2' in text and 'odd number' in text
    assert 'no "image" field' in text and '2 <image> tokens' in text
    assert any('plain' in p for p in validate_record({'conversations': turns('a', 'b', 'c', 'd')}, 'plain'))
    assert any('not found' in p for p in validate_record(
        {'image': 'missing.png', 'conversations': turns('Hi', 'x')}, check_image_file=True))


# ----------------------------------------------------------------------------------------------
# Length: the image placeholder counts as num_image_tokens

def test_truncation_keeps_the_image_whole_and_drops_what_cannot_be_saved():
    ids = [5, IMAGE_TOKEN_INDEX, 6, 7, 8, 9]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]
    assert expanded_length(ids, 10) == 15
    assert truncate(ids, labels, 15, 10) == (ids, labels)             # fits exactly
    assert truncate(ids, labels, 14, 10) == (ids[:5], labels[:5])     # cut at the end
    assert truncate(ids, labels, 13, 10) == (ids[:4], labels[:4])     # one supervised token left
    assert truncate(ids, labels, 12, 10) is None                      # nothing supervised would remain
    assert truncate(ids, labels, 10, 10) is None                      # the image would be cut
    assert truncate(ids, labels, None, 10) == (ids, labels)
    # an image in a later turn that does not fit: dropped, even though a reply before it would fit
    assert truncate([5, 6, IMAGE_TOKEN_INDEX, 7], [IGNORE_INDEX, 6, IGNORE_INDEX, 7], 5, 10) is None


# ----------------------------------------------------------------------------------------------
# LLaVA files

class FakePreprocess:
    """Stands in for florence_encoder.preprocess; remembers what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, pad_to_square, size):
        self.calls.append(([im.mode for im in images], [im.size for im in images], pad_to_square, size))
        arrays = [np.asarray(im.resize((size, size)), dtype=np.float32) / 255 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


RECORDS = [
    {'id': 'grey', 'image': 'grey.png', 'conversations': turns('<image>\nWhat is this ?', 'a cat')},
    {'id': 'text', 'conversations': turns('Hi', 'hello', 'What is this ?', 'a dog')},
    {'id': 'rgba', 'image': 'sub/rgba.png', 'conversations': turns('What color ? <image>', 'red')},
]


@pytest.fixture
def llava_dir(tmp_path):
    (tmp_path / 'images' / 'sub').mkdir(parents=True)
    Image.new('L', (30, 20), 128).save(tmp_path / 'images' / 'grey.png')
    Image.new('RGBA', (20, 30), (255, 0, 0, 100)).save(tmp_path / 'images' / 'sub' / 'rgba.png')
    (tmp_path / 'data.json').write_text(json.dumps(RECORDS))
    # JSONL with a blank line in it: positions in errors are line numbers of the file
    lines = [json.dumps(RECORDS[0]), '', json.dumps(RECORDS[1]), json.dumps(RECORDS[2])]
    (tmp_path / 'data.jsonl').write_text('\n'.join(lines) + '\n')
    return tmp_path


@pytest.mark.parametrize('name', ['data.json', 'data.jsonl'])
def test_llava_file_items(llava_dir, name):
    pre = FakePreprocess()
    ds = LLaVADataset(llava_dir / name, TOK, 'phi3', image_root=llava_dir / 'images', num_image_tokens=4,
                      size=16, preprocess=pre)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it['id'] for it in items] == ['grey', 'text', 'rgba']
    assert [it['has_image'] for it in items] == [True, False, True]
    assert items[1]['pixel_values'] is None
    assert items[0]['pixel_values'].shape == items[2]['pixel_values'].shape == (3, 16, 16)
    # images reach the preprocessor as RGB, padded to square for a chat template (finetune)
    assert pre.calls == [(['RGB'], [(30, 20)], True, 16), (['RGB'], [(20, 30)], True, 16)]
    assert torch.allclose(items[2]['pixel_values'][:, 0, 0], torch.tensor([1.0, 0, 0]))
    ids, labels = tokenize_conversation(RECORDS[1]['conversations'], TOK, 'phi3', False)
    assert items[1]['input_ids'].tolist() == ids and items[1]['labels'].tolist() == labels


def test_pretrain_stage_resizes_and_explicit_choice_wins(llava_dir):
    pre = FakePreprocess()
    LLaVADataset(llava_dir / 'data.json', TOK, 'plain', image_root=llava_dir / 'images', preprocess=pre, size=8)[0]
    LLaVADataset(llava_dir / 'data.json', TOK, 'phi3', image_root=llava_dir / 'images', preprocess=pre, size=8,
                 pad_to_square=False)[0]
    assert [c[2] for c in pre.calls] == [False, False]


def test_jsonl_is_indexed_not_parsed_up_front(llava_dir):
    path = llava_dir / 'lazy.jsonl'
    path.write_text(json.dumps(RECORDS[1]) + '\n{not json\n')
    ds = LLaVADataset(path, TOK, 'phi3')  # the bad line is only read when asked for
    assert ds[0]['id'] == 'text'
    with pytest.raises(DataError, match=r'lazy\.jsonl:2: invalid JSON'):
        ds[1]


def test_errors_name_the_file_and_line_or_index(llava_dir):
    bad = {'id': 'bad', 'conversations': [{'from': 'gpt', 'value': 'x'}]}
    (llava_dir / 'bad.jsonl').write_text('\n'.join(json.dumps(r) for r in [RECORDS[1], bad]) + '\n')
    (llava_dir / 'bad.json').write_text(json.dumps([RECORDS[1], bad]))
    with pytest.raises(DataError, match=r'bad\.jsonl:2: turn 0'):
        LLaVADataset(llava_dir / 'bad.jsonl', TOK, 'phi3')[1]
    with pytest.raises(DataError, match=r'bad\.json\[1\]: turn 0'):
        LLaVADataset(llava_dir / 'bad.json', TOK, 'phi3')[1]
    (llava_dir / 'noimg.json').write_text(json.dumps([dict(RECORDS[0], image='nope.png')]))
    with pytest.raises(DataError, match=r'noimg\.json\[0\]: cannot read image .*nope\.png'):
        LLaVADataset(llava_dir / 'noimg.json', TOK, 'phi3', preprocess=FakePreprocess())[0]
    (llava_dir / 'broken.json').write_text('[{"id": 1,\n oops]')
    with pytest.raises(DataError, match=r'broken\.json:2: invalid JSON'):
        LLaVADataset(llava_dir / 'broken.json', TOK, 'phi3')


def test_check_reports_every_problem_with_its_line(llava_dir):
    ds = LLaVADataset(llava_dir / 'data.jsonl', TOK, 'phi3', image_root=llava_dir / 'images')
    assert ds.check() == []
    ds = LLaVADataset(llava_dir / 'data.jsonl', TOK, 'phi3', image_root=llava_dir)  # wrong image root
    report = ds.check()
    assert len(report) == 2 and report[0].startswith(f'{llava_dir / "data.jsonl"}:1: image file not found')
    assert report[1].startswith(f'{llava_dir / "data.jsonl"}:4: ')


def test_overlong_samples_are_truncated_or_dropped_with_a_count(llava_dir):
    records = [{'id': 'long', 'conversations': turns('Hi', 'a red dog')},           # 22 tokens
               {'id': 'lost', 'image': 'grey.png',                                 # 26 tokens, 29 expanded
                'conversations': turns('<image>\nWhat is this ?', 'a cat')}]
    (llava_dir / 'long.json').write_text(json.dumps(records))
    ds = LLaVADataset(llava_dir / 'long.json', TOK, 'phi3', image_root=llava_dir / 'images',
                      num_image_tokens=4, max_len=20, preprocess=FakePreprocess())
    item = ds[0]
    check(item['input_ids'].tolist(), item['labels'].tolist(),
          [*PHI3_SYSTEM, '\n', '<|user|>', '\n', 'Hi', '<|end|>', '\n', '<|assistant|>', '\n', ['a', 'red']])
    with pytest.warns(UserWarning, match=r'long\.json\[1\]: dropped: 29 tokens > max_len 20'):
        assert ds[1] is None
    assert ds.dropped == 1


def test_check_cli_reports_overlong_conversations_with_their_line(llava_dir, capsys):
    TOK.tok.save(str(llava_dir / 'tokenizer.json'))
    records = [{'id': 'fits', 'conversations': turns('Hi', 'hello')},                 # 20 tokens
               {'id': 'long', 'conversations': turns('Hi', 'a red dog')},             # 22: truncated to 20
               {'id': 'lost', 'image': 'grey.png',                                    # 29 expanded: dropped
                'conversations': turns('<image>\nWhat is this ?', 'a cat')}]
    lines = [json.dumps(records[0]), '', json.dumps(records[1]), json.dumps(records[2])]
    (llava_dir / 'long.jsonl').write_text('\n'.join(lines) + '\n')
    common = ['--images', str(llava_dir / 'images'), '--template', 'phi3', '--max-len', '20',
              '--num-image-tokens', '4', '--tokenizer', str(llava_dir / 'tokenizer.json')]
    assert data.main(['--check', str(llava_dir / 'long.jsonl'), *common]) == 1  # a drop is a problem
    where = llava_dir / 'long.jsonl'
    assert capsys.readouterr().out.splitlines() == [
        f'{where}:4: 29 tokens > max_len 20: the sample would be dropped (truncation would cut the image or '
        'every supervised token)',
        f'{where}:3: warning: 22 tokens > max_len 20: truncated to 20 tokens, 2 of 4 supervised tokens cut',
        f'{where}: 3 records, 1 problem(s) in 1 record(s), 1 warning(s)']
    # a JSON list names the index; a truncation alone is only a warning (exit 0)
    (llava_dir / 'long.json').write_text(json.dumps(records[:2]))
    assert data.main(['--check', str(llava_dir / 'long.json'), *common]) == 0
    assert f"{llava_dir / 'long.json'}[1]: warning: 22 tokens > max_len 20" in capsys.readouterr().out
    # without a tokenizer the lengths are not checked, and the output says so
    assert data.main(['--check', str(llava_dir / 'long.jsonl'), *common[:-2]]) == 0
    out = capsys.readouterr().out
    assert 'note: no --tokenizer given: lengths are not checked' in out and 'max_len 20:' not in out


# ----------------------------------------------------------------------------------------------
# Collate

def test_collate_pads_on_the_right_and_stacks_only_existing_images():
    def item(n, image):
        return {'id': f'x{n}', 'input_ids': torch.arange(1, n + 1), 'labels': torch.arange(1, n + 1) * 10,
                'pixel_values': torch.full((3, 2, 2), float(n)) if image else None, 'has_image': image}
    batch = collate([item(3, True), None, item(5, False), item(2, True)], pad_id=0)
    assert batch['ids'] == ['x3', 'x5', 'x2']
    assert batch['input_ids'].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5], [1, 2, 0, 0, 0]]
    assert batch['labels'].tolist() == [[10, 20, 30, -100, -100], [10, 20, 30, 40, 50], [10, 20, -100, -100, -100]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch['input_ids'].dtype == batch['attention_mask'].dtype == torch.long
    assert batch['has_image'].tolist() == [True, False, True]
    assert batch['pixel_values'].shape == (2, 3, 2, 2)
    assert batch['pixel_values'][:, 0, 0, 0].tolist() == [3.0, 2.0]
    assert collate([item(2, False)], pad_id=0)['pixel_values'] is None
    assert collate([None], pad_id=0)['input_ids'].shape == (0, 0)


def test_collate_keeps_the_image_placeholder(llava_dir):
    ds = LLaVADataset(llava_dir / 'data.json', TOK, 'phi3', image_root=llava_dir / 'images', size=8,
                      preprocess=FakePreprocess())
    batch = collate([ds[0], ds[1], ds[2]], pad_id=TOK.token_to_id('<pad>'))
    assert (batch['input_ids'] == IMAGE_TOKEN_INDEX).sum(1).tolist() == [1, 0, 1]
    assert batch['pixel_values'].shape == (2, 3, 8, 8)


def test_sampler_drives_a_dataloader(llava_dir):
    ds = LLaVADataset(llava_dir / 'data.json', TOK, 'phi3', image_root=llava_dir / 'images', size=8,
                      preprocess=FakePreprocess())
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds, 1, 0, seed=0),
                                         collate_fn=lambda b: collate(b, pad_id=1))
    seen = [i for batch in loader for i in batch['ids']]
    assert sorted(seen) == ['grey', 'rgba', 'text']


def test_default_preprocess_is_florences_pad_for_finetune_resize_for_pretrain(tmp_path):
    from florence_encoder import preprocess
    Image.new('RGB', (40, 20), (200, 10, 10)).save(tmp_path / 'wide.png')
    (tmp_path / 'd.json').write_text(json.dumps([{'image': 'wide.png', 'conversations': turns('<image>', 'red')}]))
    padded = LLaVADataset(tmp_path / 'd.json', TOK, 'phi3', size=32)[0]['pixel_values']
    resized = LLaVADataset(tmp_path / 'd.json', TOK, 'plain', size=32)[0]['pixel_values']
    image = Image.open(tmp_path / 'wide.png')
    assert torch.equal(padded, preprocess([image], pad_to_square=True, size=32)[0])
    assert torch.equal(resized, preprocess([image], pad_to_square=False, size=32)[0])
    # finetune: the band above the image is the ImageNet-mean fill, ~0 once normalised
    assert padded[:, 0, 16].abs().max() < 0.02 and resized[:, 0, 16].abs().min() > 0.5


# ----------------------------------------------------------------------------------------------
# Bad input: images and records get a clear answer naming the file and line (every fault written for real)

def png_header(width, height):
    """A real PNG that declares width x height (IHDR with a valid CRC) and holds no pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def write_images(root: Path) -> dict:
    """Every kind of image the issue names; returns name -> expected (size, top-left RGB) or None if broken."""
    root.mkdir(parents=True, exist_ok=True)
    ok = {}
    Image.new("RGB", (8, 6), (200, 10, 10)).save(root / "rgb.jpg", quality=95)
    ok["rgb.jpg"] = ((8, 6), None)
    Image.new("L", (5, 4), 77).save(root / "grey.png")
    ok["grey.png"] = ((5, 4), (77, 77, 77))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(root / "palette.png")
    ok["palette.png"] = ((4, 4), (10, 200, 30))
    Image.new("RGBA", (4, 3), (1, 2, 3, 0)).save(root / "rgba.png")
    ok["rgba.png"] = ((4, 3), (1, 2, 3))
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=100)  # pure red in CMYK
    ok["cmyk.jpg"] = ((4, 4), None)
    Image.fromarray(np.full((3, 5), 65535 // 2, dtype=np.uint16)).save(root / "grey16.png")  # 16-bit grey, mid
    ok["grey16.png"] = ((5, 3), (127, 127, 127))  # 32767 / 257 = 127.5-
    e = Image.new("RGB", (6, 2), (0, 0, 255))
    e.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view -> upright is 2 x 6
    e.save(root / "exif.png", exif=exif)
    ok["exif.png"] = ((2, 6), None)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "one.png")
    ok["one.png"] = ((1, 1), (9, 9, 9))
    # broken
    (root / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[:300])
    (root / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (root / "bomb.png").write_bytes(png_header(100_000, 100_000))  # 10^10 pixels declared
    broken = {"empty.png": "empty", "truncated.png": "truncated|broken|not enough", "truncated.jpg": "truncated|broken",
              "garbage.jpg": "cannot identify", "bomb.png": "decompression bomb", "missing.png": "not found"}
    return ok, broken


def test_images_valid_ones_to_rgb_broken_ones_named(tmp_path):
    ok, broken = write_images(tmp_path)
    for name, (size, pixel) in ok.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == size, name
        if pixel is not None:
            assert im.getpixel((0, 0)) == pixel, name
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 40 and b < 40  # CMYK red is RGB red
    exif = load_image(tmp_path / "exif.png")  # rotated upright: the red corner moved to the top right
    assert exif.getpixel((1, 0))[0] > 200 and exif.getpixel((0, 0))[2] > 200
    for name, why in broken.items():
        with pytest.raises(DataError) as e:
            load_image(tmp_path / name)
        assert f"cannot read image {tmp_path / name}" in str(e.value), name
        assert any(w in str(e.value).lower() for w in why.split("|")), (name, str(e.value))
    # the dataset and sample.py use the same function: the message names the record and the file
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "image": "bomb.png", "conversations": turns("<image>\nx", "y")}]))
    ds = data.LLaVADataset(tmp_path / "d.json", None, "plain", image_root=tmp_path)
    with pytest.raises(DataError, match=r"d\.json\[0\]: cannot read image .*bomb\.png: refused as a possible decomp"):
        ds.load_image(0, ds.record(0))
    import inspect
    import sample
    assert "load_image(args.image)" in inspect.getsource(sample.main)  # sample.py reads images the same way


def test_check_cli_lists_every_problem_with_its_line(tmp_path):
    ok, broken = write_images(tmp_path / "img")
    good = {"id": "ok", "image": "grey.png", "conversations": turns("<image>\nWhat?", "grey")}
    lines = [
        json.dumps(good),                                                                  # 1 fine
        '{"id": "x", "conversations": [',                                                  # 2 malformed JSON
        json.dumps({"id": "noconv"}),                                                      # 3 missing conversations
        json.dumps({"id": "role", "conversations": [{"from": "robot", "value": "hi"},
                                                    {"from": "gpt", "value": "yo"}]}),     # 4 unknown role
        json.dumps({"id": "order", "conversations": [{"from": "gpt", "value": "a"},
                                                     {"from": "human", "value": "b"}]}),   # 5 out of order
        json.dumps({"id": "empty", "conversations": turns("Hi", "  ")}),                  # 6 empty turn
        json.dumps({"id": "tok", "conversations": turns("<image>\nWhat?", "x")}),         # 7 <image>, no image
        json.dumps({"id": "two", "image": "grey.png", "conversations": turns("<image><image>", "x")}),  # 8 two <image>
        "",                                                                                # blank: skipped
        '{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',      # 10 non-UTF-8 (below)
        json.dumps({"id": "nofile", "image": "missing.png", "conversations": turns("<image>\nx", "y")}),  # 11
        json.dumps({"id": "trunc", "image": "truncated.png", "conversations": turns("<image>\nx", "y")}),  # 12
        json.dumps({"id": "bomb", "image": "bomb.png", "conversations": turns("<image>\nx", "y")}),       # 13
        json.dumps({"id": "zero", "image": "empty.png", "conversations": turns("<image>\nx", "y")}),      # 14
        json.dumps({"id": "notoken", "image": "rgba.png", "conversations": turns("x", "y")}),            # 15 warning
    ]
    raw = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode("utf-8"), b"caf\xe9") + b"\n"
    (tmp_path / "data.jsonl").write_bytes(raw)
    r = subprocess.run([PY, str(REPO / "data.py"), "--check", str(tmp_path / "data.jsonl"), "--images",
                        str(tmp_path / "img")], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    where = str(tmp_path / "data.jsonl")
    expect = {2: "invalid JSON", 3: 'missing or empty "conversations"', 4: "turn 0: expected", 5: "turn 0: from 'gpt'",
              6: "turn 1: empty gpt turn", 7: "<image> in the text but no \"image\" field", 8: "2 <image> tokens",
              10: "not UTF-8 text (byte 0xe9", 11: "image file not found", 12: "cannot read image",
              13: "decompression bomb", 14: "empty (0 bytes)", 15: "warning: an image but no <image>"}
    for line, what in expect.items():
        assert any(l.startswith(f"{where}:{line}: ") and what in l for l in out.splitlines()), (line, what, out)
    assert not any(l.startswith(f"{where}:1: ") for l in out.splitlines())
    assert out.strip().splitlines()[-1] == f"{where}: 14 records, 13 problem(s) in 12 record(s), 1 warning(s)"
    # a clean file: exit 0; a JSON list that is not UTF-8 names its line
    (tmp_path / "clean.json").write_text(json.dumps([good]))
    assert data.main(["--check", str(tmp_path / "clean.json"), "--images", str(tmp_path / "img")]) == 0
    (tmp_path / "bad.json").write_bytes(b'[\n{"id": "a",\n "x": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"bad\.json:3: not UTF-8"):
        data.LLaVADataset(tmp_path / "bad.json", None, "phi3")
