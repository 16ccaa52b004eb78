"""The tokenizer and chat templates of Florence-VL's language model.

    Tokenizer(folder)         the LLM's tokenizer.json (Llama-3.1; and any fast tokenizer)
    TEMPLATES / render_chat   the official llama3 and phi3 conversation templates
    StreamDecoder             ids -> text, one token at a time, safe for multi-byte characters
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers


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


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer | str | Path):
        if isinstance(tok, (str, Path)):
            path = Path(tok)
            tok = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json' if path.is_dir() else path))
        self.tok = tok
        self.end_ids = [i for i in (tok.token_to_id(t) for t in END_TOKENS) if i is not None]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Special tokens written in the text (<|eot_id|>, ...) are always matched as single ids;
        # add_special_tokens only controls the post-processor (e.g. a prepended <|begin_of_text|>).
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A streaming-safe incremental decoder: put one id, get the new text."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: put ids one at a time, get back only the newly completed text.

    Decoding token by token breaks multi-byte characters split across tokens (byte-level BPE) and
    drops the leading space of SentencePiece pieces. So each step decodes a short window that starts
    a little before the new ids, emits what the new ids added, and holds text back while it still
    ends in an incomplete character (U+FFFD). Cost per step stays constant as the text grows."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: already emitted ids kept as left context
        self.read = 0    # ids before this index have been emitted

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self.flush(final=False)

    def flush(self, final: bool = True) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(text) <= len(done) or (text.endswith('\ufffd') and not final):
            return ''
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
