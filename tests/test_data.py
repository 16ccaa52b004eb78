"""data.py: templates -> ids/labels, truncation, LLaVA files, images, collate, sampler.

The label masks are checked against expectations written out token by token, with a small
hand-made word-level tokenizer so every id has a readable name. The synthetic task has its own
file, tests/test_synthetic.py."""
import json

import numpy as np
import pytest
import torch
import tokenizers
from PIL import Image
from tokenizers import Regex, models, pre_tokenizers, processors

import data
from tokenizer import Tokenizer
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataError, LLaVADataset, ResumableSampler, collate,
                  expanded_length, tokenize_conversation, tokenize_prompt, truncate, validate_record)

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


# ----------------------------------------------------------------------------------------------
# Sampler

def test_sampler_is_deterministic_per_seed_and_epoch():
    a, b = ResumableSampler(50, 1, 0, seed=3), ResumableSampler(50, 1, 0, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(50, 1, 0, seed=4)) != first
    assert list(ResumableSampler(50, 1, 0, shuffle=False)) == list(range(50))


@pytest.mark.parametrize('n, world', [(24, 4), (23, 4), (5, 3)])
def test_ranks_get_disjoint_equal_shards_covering_the_data(n, world):
    shards = [list(ResumableSampler(n, world, r, seed=1)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and all(len(s) == len(ResumableSampler(n, world, r))
                                                      for r, s in enumerate(shards))
    everything = [i for s in shards for i in s]
    assert sorted(set(everything)) == list(range(n))
    assert len(everything) - n == -n % world  # duplicates only to pad the last round
    trimmed = [list(ResumableSampler(n, world, r, seed=1, drop_last=True)) for r in range(world)]
    flat = [i for s in trimmed for i in s]
    assert len(flat) == len(set(flat)) == n - n % world and {len(s) for s in trimmed} == {n // world}


def test_resume_from_position_continues_exactly():
    n, world, batch = 23, 2, 3
    full = {r: list(ResumableSampler(n, world, r, seed=7)) for r in range(world)}
    for r in range(world):
        s = ResumableSampler(n, world, r, seed=7)
        s.set_epoch(0)
        for _ in range(2):  # two steps done on every rank
            s.advance(batch)
        state = s.state_dict()
        resumed = ResumableSampler(n, world, r, seed=0)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the loop's usual call must not rewind the restored epoch
        assert list(resumed) == full[r][2 * batch:] and len(resumed) == len(full[r]) - 2 * batch
        resumed.set_epoch(1)  # the next epoch starts at its beginning
        fresh = ResumableSampler(n, world, r, seed=7)
        fresh.set_epoch(1)
        assert list(resumed) == list(fresh)


def test_resume_on_another_world_size_sees_each_remaining_sample():
    s = ResumableSampler(20, 2, 0, seed=2)
    s.advance(4)  # 8 of 20 consumed over both ranks
    state = s.state_dict()
    consumed = [i for r in range(2) for i in list(ResumableSampler(20, 2, r, seed=2))[:4]]
    rest = []
    for r in range(3):
        t = ResumableSampler(20, 3, r)
        t.load_state_dict(state)
        rest += list(t)
    remaining = set(range(20)) - set(consumed)
    assert set(rest) >= remaining and len(rest) - len(remaining) < 3  # beyond the rest: padding only


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
