"""Text generation with the LLM of model.py: KV-cache prefill, then one token per step.

    ids = generate(llm, input_ids, attention_mask, max_new_tokens=64)           # greedy, batched
    ids = generate(llm, inputs_embeds=embeds, attention_mask=mask, temperature=0.7, top_p=0.9)
    for piece in stream_text(llm, tokenizer, prompt_ids): print(piece, end='')  # text as it comes

Prompts of different lengths may be padded on either side; the cache keeps padding as masked
slots and rotary positions per sample (model.KVCache), so padding never changes a sample's tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from model import LLM, KVCache, cache_dtype
from tokenizer import StreamDecoder, Tokenizer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0: greedy. top_p < 1: nucleus sampling, from the
    smallest set of most likely tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        outside = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        p = p.masked_fill(outside, 0.0)
        choice = torch.multinomial(p, 1, generator=generator)  # multinomial renormalizes
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# Steps between the host's looks at whether every sample has stopped: each look is a host sync, which a
# GPU pays for (a CUDA-graph step is ~10 us of launch); up to CHECK_EVERY - 1 steps may run past the end.
CHECK_EVERY = 8


@torch.no_grad()
def generate_steps(llm: LLM, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, stop_ids=None,
                   generator: torch.Generator | None = None, vocab_limit: int | None = None,
                   decode: Callable | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), active (B,) bool) once per step; inactive samples already stopped and their
    token is meaningless. Stops after max_new_tokens, or (looked at every CHECK_EVERY steps) once every
    sample produced a stop token. vocab_limit: only ids below it are chosen (rows past the tokenizer's
    vocabulary, such as Phi-3.5's padding rows 32011-32063, decode to nothing; the official loader drops
    them by resizing). decode: the step function, llm.decode_step by default (compile_decode gives a
    compiled one). Host reads: one after the prefill, one per CHECK_EVERY steps; the steps none."""
    cfg = llm.cfg
    decode = decode or llm.decode_step
    stop = torch.tensor(sorted(set(cfg.eos_token_ids if stop_ids is None else stop_ids)), dtype=torch.long)
    embeds = llm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
    B, T, _ = embeds.shape
    device = embeds.device
    mask = (torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long))
    stop = stop.to(device)
    cache = KVCache(cfg, B, T + max_new_tokens, dtype=cache_dtype(embeds.dtype, device), device=device)

    def prefill(embeds, mask):
        cache.reset()
        hidden = llm(inputs_embeds=embeds, attention_mask=mask, cache=cache, return_hidden=True)  # (B, T, H)
        # each sample continues from its last real token, wherever padding put it
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(1)
        return llm.lm_head(hidden[torch.arange(B, device=device), last])  # (B, V)

    logits = prefill(embeds, mask)
    top = int(cache.next_pos.max())  # the furthest position so far: when LongRoPE's switch comes is known now
    active = torch.ones(B, dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float('-inf')
        token = sample(logits, temperature, top_p, generator)  # (B,)
        yield token, active
        active = active & ~torch.isin(token, stop)
        generated.append(token)
        if step == max_new_tokens - 1 or ((step + 1) % CHECK_EVERY == 0 and not bool(active.any())):
            return
        if cfg.rope_type == 'longrope' and not cache.long_rope and top + step + 1 > cfg.original_max_position_embeddings:
            # LongRoPE switches to its long factors once the sequence outgrows the original context;
            # the cached keys were rotated with the short ones, so recompute them all (as transformers does)
            new = torch.stack(generated, 1)  # (B, step + 1)
            logits = prefill(torch.cat([embeds, llm.embed_tokens(new)], 1),
                             torch.cat([mask, torch.ones_like(new)], 1))
        else:
            logits = decode(token, cache)  # (B, V)


def compile_decode(llm: LLM, mode: str | None = None) -> Callable:
    """llm.decode_step compiled as one graph (fullgraph: a graph break would fail here, not slow down
    quietly); mode='reduce-overhead' on CUDA also captures it as a CUDA graph."""
    return torch.compile(llm.decode_step, fullgraph=True, dynamic=False, mode=mode)


def generate(llm: LLM, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids=None, generator=None,
             stream: Callable[[int, int], None] | None = None, vocab_limit: int | None = None,
             decode: Callable | None = None) -> list[list[int]]:
    """Generate for a batch of prompts (token ids or embeddings, padded on either side, with
    attention_mask). Returns the new tokens of each sample, without the stop token that ended it.
    stop_ids default to the config's eos_token_ids. stream(sample_index, token_id) is called for every
    new token as soon as it is sampled (the host reads each token); without it the tokens stay on the
    device until the end."""
    B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    out = [[] for _ in range(B)]
    stop = set(llm.cfg.eos_token_ids if stop_ids is None else stop_ids)
    tokens, flags = [], []
    for token, active in generate_steps(llm, input_ids, inputs_embeds, attention_mask, max_new_tokens,
                                        temperature, top_p, stop_ids, generator, vocab_limit, decode):
        if stream is None:
            tokens.append(token)
            flags.append(active)
            continue
        for b, (t, a) in enumerate(zip(token.tolist(), active.tolist())):
            if a and t not in stop:
                out[b].append(t)
                stream(b, t)
    if tokens:
        for b, (row, alive) in enumerate(zip(torch.stack(tokens, 1).tolist(), torch.stack(flags, 1).tolist())):
            out[b] = [t for t, a in zip(row, alive) if a and t not in stop]
    return out


def stream_text(llm: LLM, tokenizer: Tokenizer, input_ids, inputs_embeds=None, strip: bool = False,
                **kwargs) -> Iterator[str]:
    """One prompt (a list of ids, or (1, T) ids / embeddings): yield the reply's text as it is produced.
    Stops on the config's eos ids and the tokenizer's end tokens (<|eot_id|>, <|end|>, ...); only ids the
    tokenizer has are chosen. strip: the text as decode(...).strip() gives it (StreamDecoder)."""
    if inputs_embeds is None and not torch.is_tensor(input_ids):
        input_ids = torch.tensor([input_ids], dtype=torch.long)
    kwargs.setdefault('stop_ids', set(llm.cfg.eos_token_ids) | set(tokenizer.end_ids))
    kwargs.setdefault('vocab_limit', tokenizer.vocab_size)
    decoder = StreamDecoder(tokenizer, strip=strip)
    for token, active in generate_steps(llm, input_ids, inputs_embeds, **kwargs):
        if not bool(active[0]) or int(token[0]) in kwargs['stop_ids']:
            break
        piece = decoder.put(int(token[0]))
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
