"""tokenizer.py: SentencePieceTokenizer against the real slow tokenizer of the official code's stack.

Florence-VL-3B was trained on the ids of transformers 4.43.1's slow LlamaTokenizer (sentencepiece 0.1.99)
reading Phi-3.5's tokenizer.model. That stack lives in a second environment (tests/reference_env.py): it
trains a small SentencePiece model with Llama-2 / Phi-3's settings, and one call computes every reference
(ids, decodes, pieces, a converted fast tokenizer) for all configurations at once. Our ids must equal the
reference's exactly. The negative controls show that the comparison sees one wrong flag in the config.
"""
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, processors

import reference_env  # noqa: E402
from tokenizer import (TEMPLATES, SentencePieceTokenizer, Tokenizer, TokenizerError, load_tokenizer,  # noqa: E402
                       read_sentencepiece_model, render_chat)

PHI3 = TEMPLATES['phi3']
QUESTION = 'What is the text in the image?'
# what the official code tokenizes: the rendered prompt, and the chunks around an '<image>' placeholder
PROMPT = render_chat(PHI3, [{'role': 'user', 'content': '<image>\n' + QUESTION},
                            {'role': 'assistant', 'content': 'It says "OPEN 24/7".'},
                            {'role': 'user', 'content': 'And the  color of the door?'}])
TEMPLATE_STRINGS = [PHI3.system, PHI3.user, PHI3.assistant, PHI3.end, PROMPT, *PROMPT.split('<image>'),
                    '\n' + QUESTION + '<|end|>\n<|assistant|>\n', PHI3.system + PHI3.user + 'Hi' + PHI3.end,
                    render_chat(PHI3, [{'role': 'user', 'content': 'Describe the image in detail.'}])]
GENERATED = ['The sign says "OPEN 24/7".<|end|>', 'A red door, 3 windows and a café sign (naïve).<|end|><|endoftext|>',
             'Straße 😀 Ω 中文<|end|>']
EDGE_STRINGS = [
    '', ' ', '  ', '\n', '\n\n', ' Hello', 'Hello ', 'a  b   c', '  two leading spaces', 'tab\there',
    '<s>', '</s>', '<unk>', '<s> hi </s> there', 'x</s>  y', ' <s>', '<|endoftext|>', '<|endoftext|> x', '▁x ▁',
    '<|user|>', '<|user|> ', '<|user|>   \n  hi', 'a<|end|>b', '<|end|><|end|>', '\t<|system|>\t', 'no<|end|> space',
    'Numbers: 12345, 3.14159 and 2024-01-31.', 'naïve café 日本', 'Straße 😀 Ω 中文 ÿ', '<|placeholder1|>text',
    ' '.join(['The quick brown fox jumps over the lazy dog; what is the text in the image?'] * 12)]
CORPUS_BASE = [
    'The quick brown fox jumps over the lazy dog.', "What is the text in the image? It says: 'OPEN 24/7'.",
    'A chat between a curious user and an artificial intelligence assistant.', 'You are a helpful AI assistant.',
    'Describe the image in detail.', 'naïve café 日本 résumé', 'Numbers: 12345, 3.14159 and 2024-01-31.',
    'Hello,  world!  Two  spaces   and three.', 'line one\nline two\n\nline four', 'The answer is 42; not 7.',
    '    indented code: def f(x): return x * 2', '<s> and </s> written as text', 'aaa abab ...... ---- ====']
ADDED = ['<|endoftext|>', '<|assistant|>', '<|placeholder1|>', '<|placeholder2|>', '<|placeholder3|>',
         '<|placeholder4|>', '<|system|>', '<|end|>', '<|placeholder5|>', '<|placeholder6|>', '<|user|>']


def fuzz_strings(n=300, seed=0):
    """Random mixtures of words, added tokens, spaces, newlines and characters the model has never seen."""
    rng = random.Random(seed)
    alphabet = (list('ab cde\n..!?') + ['the', ' image', '  ', '<|end|>', '<s>', '</s>', '<|user|>', '<unk>',
                                        '<|endoftext|>', '日', '😀', 'ß', '▁', '\t', '3'])
    return [''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(n)]


STRINGS = TEMPLATE_STRINGS + GENERATED + EDGE_STRINGS + fuzz_strings()


def write_phi_config(folder: Path, n_pieces: int, **changes):
    """Phi-3.5-mini-instruct's tokenizer files (its real flags), with the added ids after our model's pieces."""
    def added(content, rstrip, special=True):
        return {'content': content, 'lstrip': False, 'normalized': False, 'rstrip': rstrip, 'single_word': False,
                'special': special}
    decoder = {'0': added('<unk>', False), '1': added('<s>', False), '2': added('</s>', True, special=False)}
    decoder.update({str(n_pieces + i): added(t, t != '<|endoftext|>') for i, t in enumerate(ADDED)})
    config = {'add_bos_token': False, 'add_eos_token': False, 'added_tokens_decoder': decoder, 'bos_token': '<s>',
              'clean_up_tokenization_spaces': False, 'eos_token': '<|endoftext|>', 'legacy': False,
              'model_max_length': 2048, 'pad_token': '<|endoftext|>', 'padding_side': 'right', 'sp_model_kwargs': {},
              'tokenizer_class': 'LlamaTokenizer', 'unk_token': '<unk>', 'use_default_system_prompt': False}
    config.update(changes)
    (folder / 'tokenizer_config.json').write_text(json.dumps(config, indent=2))
    flags = {'lstrip': False, 'normalized': False, 'rstrip': False, 'single_word': False}
    (folder / 'special_tokens_map.json').write_text(json.dumps(
        {k: {'content': v, **flags} for k, v in [('bos_token', '<s>'), ('eos_token', '<|endoftext|>'),
                                                  ('pad_token', '<|endoftext|>'), ('unk_token', '<unk>')]}))
    (folder / 'added_tokens.json').write_text(json.dumps({t: n_pieces + i for i, t in enumerate(ADDED)}))


def config_copy(src: Path, dst: Path, n_pieces: int, decoder_change=None, **changes) -> Path:
    dst.mkdir()
    shutil.copy(src / 'tokenizer.model', dst / 'tokenizer.model')
    write_phi_config(dst, n_pieces, **changes)
    if decoder_change:
        cfg = json.loads((dst / 'tokenizer_config.json').read_text())
        decoder_change(cfg['added_tokens_decoder'])
        (dst / 'tokenizer_config.json').write_text(json.dumps(cfg))
    return dst


REFERENCE = r'''
import json, sys
import sentencepiece as spm
from transformers import AutoTokenizer
a = json.load(sys.stdin)
out = {}
for name, folder in a["folders"].items():
    t = AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert type(t).__name__ == "LlamaTokenizer"
    plain = [t(s, add_special_tokens=False).input_ids for s in a["texts"]]
    full = [t(s).input_ids for s in a["texts"]]
    seqs = full + a["id_seqs"]
    out[name] = {"len": len(t), "bos": t.bos_token_id, "plain": plain, "full": full, "seqs": seqs,
                 "decode": [t.decode(i) for i in seqs],
                 "decode_skip": [t.decode(i, skip_special_tokens=True) for i in seqs],
                 "token_ids": t.convert_tokens_to_ids(a["tokens"])}
sp = spm.SentencePieceProcessor(model_file=a["folders"]["phi"] + "/tokenizer.model")
kind = lambda i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
out["pieces"] = [[sp.id_to_piece(i), sp.get_score(i), kind(i)] for i in range(sp.get_piece_size())]
fast = AutoTokenizer.from_pretrained(a["folders"]["phi"])  # LlamaTokenizerFast, converted from the slow one
fast.save_pretrained(a["fast"])
out["fast"] = {"plain": [fast(s, add_special_tokens=False).input_ids for s in a["texts"]],
               "full": [fast(s).input_ids for s in a["texts"]]}
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
    """The folders (Phi-3.5's flags and three variants) and everything the reference says about them."""
    root = tmp_path_factory.mktemp('tokenizers')
    corpus = [line.replace('the', w) for w in ('the', 'a', 'this', 'that') for line in CORPUS_BASE] * 10
    reference_env.train_sentencepiece(root / 'phi', corpus, vocab_size=400)
    n = len(read_sentencepiece_model(root / 'phi' / 'tokenizer.model')['pieces'])
    write_phi_config(root / 'phi', n)
    folders = {'phi': root / 'phi',
               'legacy': config_copy(root / 'phi', root / 'legacy', n, legacy=True),
               'bos': config_copy(root / 'phi', root / 'bos', n, add_bos_token=True, add_eos_token=True),
               'no_prefix_space': config_copy(root / 'phi', root / 'no_prefix_space', n, add_prefix_space=None)}
    rng = random.Random(1)
    id_seqs = [[rng.randrange(n + len(ADDED)) for _ in range(rng.randint(1, 12))] for _ in range(60)]
    tokens = ['<s>', '</s>', '<unk>', '▁', '<0x0A>', *ADDED]
    out = reference_env.run(REFERENCE, {'folders': {k: str(v) for k, v in folders.items()}, 'texts': STRINGS,
                                        'id_seqs': id_seqs, 'tokens': tokens, 'fast': str(root / 'fast')})
    return {'root': root, 'n': n, 'folders': folders, 'tokens': tokens, 'fast_folder': root / 'fast', **out}


def check_offsets(text, pairs, spell, added, inserted=()):
    """Each token's start is where its text begins in `text`: an added token literally, a piece with '▁' as
    ' ' (a '▁' put in front of the text, or of a part after an added token, may be missing), a byte piece
    inside its character. Starts never go back; `inserted` tokens (BOS, EOS) need not match."""
    norm = text.replace('▁', ' ')
    last, after_added = 0, True
    for i, start in pairs:
        assert last <= start <= len(text), (text, pairs)
        token = spell(i)
        if i in added:
            assert text.startswith(token, start) or i in inserted, (text, token, start)
        elif re.fullmatch('<0x[0-9A-F]{2}>', token):
            assert int(token[3:5], 16) in text[start].encode(), (text, token, start)
        else:
            surface = token.replace('▁', ' ')
            virtual = surface.startswith(' ') and (start == 0 or after_added)
            assert norm.startswith(surface, start) or (virtual and norm.startswith(surface[1:], start)), \
                (text, token, start)
        last, after_added = start, i in added
    return True


@pytest.mark.parametrize('name', ['phi', 'legacy', 'bos', 'no_prefix_space'])
def test_ids_and_decodes_equal_the_slow_llama_tokenizer(ref, name):
    """Every string (templates, prompt chunks, edge cases, 300 random mixtures) gives the reference's ids
    with and without special tokens; decode (skip_special_tokens both ways) of those ids and of 60 random id
    sequences (invalid UTF-8 bytes included) gives the reference's text; len, bos and token ids agree."""
    tok, want = SentencePieceTokenizer(ref['folders'][name]), ref[name]
    assert (tok.vocab_size, tok.bos_token_id) == (want['len'], want['bos'])
    assert [tok._token_id(t) for t in ref['tokens']] == want['token_ids']
    assert [tok.encode(s) for s in STRINGS] == want['plain']
    assert [tok.encode(s, add_special_tokens=True) for s in STRINGS] == want['full']
    assert [tok.decode(i) for i in want['seqs']] == want['decode']
    assert [tok.decode(i, skip_special_tokens=True) for i in want['seqs']] == want['decode_skip']


@pytest.mark.parametrize('name', ['phi', 'legacy', 'bos'])
def test_offsets_point_at_each_tokens_text(ref, name):
    tok = SentencePieceTokenizer(ref['folders'][name])
    spell = lambda i: tok.id_to_added.get(i) or tok.sp.pieces[i]  # noqa: E731
    for s in STRINGS:
        for special in (False, True):
            pairs = tok.encode_offsets(s, add_special_tokens=special)
            assert [i for i, _ in pairs] == tok.encode(s, add_special_tokens=special)
            assert check_offsets(s, pairs, spell, tok.id_to_added, {tok.bos_token_id, tok.eos_token_id})
    assert tok.encode_offsets('a', add_special_tokens=True)[-1][1] == (1 if name == 'bos' else 0)
    shifted = [(i, min(start + 1, len(PROMPT))) for i, start in tok.encode_offsets(PROMPT)]  # negative control
    with pytest.raises(AssertionError):
        check_offsets(PROMPT, shifted, spell, tok.id_to_added)


def test_phi35_template_ids_as_the_official_code_got_them(ref):
    """The facts the training labels rest on, spelled out: a '▁' before <|system|> (only special tokens drop
    it, and <|system|> is not one of them), the newline after a role token eaten by its rstrip, a space
    before the text after <|end|> when the text starts with one, and no BOS (add_bos_token false)."""
    tok = SentencePieceTokenizer(ref['folders']['phi'])
    ids = tok.encode(PHI3.system)
    assert ids[:2] == [tok.sp.ids['▁'], tok.added['<|system|>']] and ids[-1] == tok.added['<|end|>']
    assert tok.encode(PHI3.user) == [tok.sp.ids['▁'], tok.sp.ids['\n'], tok.added['<|user|>']]
    assert tok.encode('<s>x') == [tok.added['<s>'], tok.sp.ids['x']]  # <s> is special: no '▁' in front
    assert tok.encode(PROMPT, add_special_tokens=True) == tok.encode(PROMPT)
    assert tok.decode(tok.encode(PHI3.system)) == '<|system|> You are a helpful AI assistant. <|end|>'


@pytest.mark.parametrize('change, what', [
    (dict(decoder_change=lambda d: d[next(k for k, v in d.items() if v['content'] == '<|end|>')].update(rstrip=False)),
     '<|end|> without rstrip'),
    (dict(legacy=True), 'legacy=True'),
    (dict(add_prefix_space=None), 'add_prefix_space null')])
def test_negative_control_one_wrong_flag_changes_the_template_ids(ref, tmp_path, change, what):
    """Our tokenizer reading a config with one flag changed must disagree with the reference's ids for the
    real config on the template strings, so the parity test above can fail."""
    folder = config_copy(ref['folders']['phi'], tmp_path / 'wrong', ref['n'], **change)
    wrong = SentencePieceTokenizer(folder)
    n = len(TEMPLATE_STRINGS)
    assert [wrong.encode(s) for s in TEMPLATE_STRINGS] != ref['phi']['plain'][:n], what


def test_model_reader_matches_sentencepiece(ref):
    """Pieces, float32 scores and types as sentencepiece itself reports them."""
    model = read_sentencepiece_model(ref['folders']['phi'] / 'tokenizer.model')
    assert [list(p) for p in model['pieces']] == ref['pieces']
    assert (model['model_type'], model['byte_fallback'], model['normalizer']) == (2, True, 'identity')
    assert (model['add_dummy_prefix'], model['remove_extra_whitespaces'], model['escape_whitespaces']) == \
        (True, False, True)


@pytest.mark.parametrize('extra, problem', [
    (b'\x12\x02\x18\x01', 'model_type 1'),  # a trainer_spec with model_type UNIGRAM (sub-messages merge)
    (b'\x1a\x02\x20\x01', 'remove_extra_whitespaces true'),
    (b'\x1a\x03\x12\x01\x00', 'precompiled charsmap'),  # a normalizer rule: not identity
    (b'\x12\x03\x98\x02\x00', 'byte_fallback false')])
def test_unsupported_models_are_refused_by_name(ref, tmp_path, extra, problem):
    folder = config_copy(ref['folders']['phi'], tmp_path / 'bad', ref['n'])
    (folder / 'tokenizer.model').write_bytes((folder / 'tokenizer.model').read_bytes() + extra)
    with pytest.raises(TokenizerError, match=problem) as e:
        SentencePieceTokenizer(folder)
    assert str(folder / 'tokenizer.model') in str(e.value)
    (folder / 'tokenizer.model').write_bytes(b'\x0a\xff')  # a field longer than the file
    with pytest.raises(TokenizerError, match='cannot read'):
        SentencePieceTokenizer(folder)


def test_stream_decoder_gives_the_decoded_text(ref):
    tok = SentencePieceTokenizer(ref['folders']['phi'])
    for text in GENERATED:
        ids = tok.encode(text)
        stream = tok.stream()
        assert ''.join(stream.put(i) for i in ids) + stream.flush() == tok.decode(ids, skip_special_tokens=True)


def test_load_tokenizer_picks_the_fast_or_the_sentencepiece_tokenizer(ref, tmp_path):
    """As the official code (use_fast=False): a folder with tokenizer.model loads the slow emulation, also
    when it has a tokenizer.json too (here the reference's conversion of the same files, whose ids differ);
    one with only tokenizer.json loads fast, with its ids and the config's BOS; an empty folder is an error
    naming what was looked for."""
    assert isinstance(load_tokenizer(ref['fast_folder']), SentencePieceTokenizer)
    only_fast = tmp_path / 'only_fast'
    only_fast.mkdir()
    for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
        if (ref['fast_folder'] / name).is_file():
            shutil.copyfile(ref['fast_folder'] / name, only_fast / name)
    fast = load_tokenizer(only_fast)
    assert isinstance(fast, Tokenizer) and fast.bos_token_id == 1
    assert [fast.encode(s) for s in STRINGS] == ref['fast']['plain']
    assert [fast.encode(s, add_special_tokens=True) for s in STRINGS] == ref['fast']['full']
    added = fast.tok.get_added_tokens_decoder()
    for s in STRINGS:
        pairs = fast.encode_offsets(s)
        assert [i for i, _ in pairs] == fast.encode(s)
        assert check_offsets(s, pairs, fast.tok.id_to_token, added)
    assert isinstance(load_tokenizer(ref['folders']['phi']), SentencePieceTokenizer)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(TokenizerError, match='tokenizer.model.*tokenizer.json') as e:
        load_tokenizer(tmp_path / 'empty')
    assert str(tmp_path / 'empty') in str(e.value)


def test_fast_tokenizer_bos_from_the_post_processor_or_the_config(tmp_path):
    vocab = {'<s>': 0, '</s>': 1, 'a': 2, 'b': 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='a'))
    assert Tokenizer(tok).bos_token_id is None  # nothing prepended
    tok.post_processor = processors.TemplateProcessing(single='<s> $A </s>', special_tokens=[('<s>', 0), ('</s>', 1)])
    assert Tokenizer(tok).bos_token_id == 0
    assert Tokenizer(tok).encode_offsets('a', add_special_tokens=True) == [(0, 0), (2, 0), (1, 0)]
    tok.save(str(tmp_path / 'tokenizer.json'))
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': None}))
    assert Tokenizer(tmp_path).bos_token_id is None  # the config says there is none
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': {'content': '</s>'}}))
    assert load_tokenizer(tmp_path).bos_token_id == 1


def test_stream_decoder_with_space_clean_up_and_strip(tmp_path):
    """Llama-3.1's tokenizer_config has clean_up_tokenization_spaces: true, which transformers 4.43 applies when
    decoding (" ," -> ",", " ' s" -> "'s"). Streamed pieces, token by token, add up to decode(ids).strip() (what
    the official evaluation prints) and never emit text that a later token changes; a decoder that does not
    hold back (negative control) emits a space that the clean-up removes."""
    words = ['Red', 'car', ',', 'blue', 'sky', '.', 'Is', 'it', '?', 'It', "'", 's', "'s", 'fine', "n't", ' ']
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='Red'))
    tok.decoder = decoders.WordPiece(prefix='##', cleanup=False)  # joins tokens with spaces, cleans nothing
    tok.save(str(tmp_path / 'tokenizer.json'))
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'clean_up_tokenization_spaces': True}))
    fast = Tokenizer(tmp_path)
    ids = [words.index(w) for w in ['Red', 'car', ',', 'blue', 'sky', '.', 'Is', 'it', '?', 'It', "'", 's',
                                    'fine', "n't", "'s", '.']]
    assert fast.decode(ids) == "Red car, blue sky. Is it? It's finen't's."
    stream = fast.stream(strip=True)
    pieces = [stream.put(i) for i in ids]
    emitted = ''
    for p in pieces:
        emitted += p
        assert fast.decode(ids).startswith(emitted)
    assert emitted + stream.flush() == fast.decode(ids).strip()
    # without the hold-back, "It '" goes out before "s" turns " ' " into "'": the stream can no longer match
    naive = ''.join(fast.decode(ids[:k + 1])[len(fast.decode(ids[:k])):] for k in range(len(ids)))
    assert naive != fast.decode(ids) and "It '" in naive
