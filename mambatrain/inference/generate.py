"""Sampling: prefill the prompt in one forward, then decode one token at a time with carried state."""

from __future__ import annotations

import sys
from typing import Iterator, Optional, TextIO

import torch

from ..config.schema import RecipeError
from ..models.lm import LanguageModel
from .step import decode_step


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy; top_k and top_p (nucleus) cut the tail first."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def stream(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: float = 1.0, seed: Optional[int] = None,
           stop_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B,) of each prompt row (prompt (B, T), T >= 1), up to ``max_new_tokens``.

    Stops early once every row has emitted ``stop_id``.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt must be (batch, length >= 1) token ids, got shape {tuple(prompt.shape)}")
    if not 0 < top_p <= 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    device = prompt.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    states = model.decoding_states(prompt.shape[0], device)
    hidden = model(prompt, states=states)[:, -1]  # prefill: (B, d_model)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample_next(model.logits(hidden), temperature, top_k, top_p, generator)
        yield token
        if stop_id is not None:
            done |= token == stop_id
            if bool(done.all()):
                return
        if i + 1 < max_new_tokens:
            hidden = decode_step(model, token, states)


def generate(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """prompt (B, T) -> (B, T + new) token ids; ``sampling`` as ``stream``."""
    new = list(stream(model, prompt, max_new_tokens, **sampling))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt


def _encode_prompt(prompt: str, tokenizer, source: str) -> list[int]:
    if tokenizer is not None:
        return [int(i) for i in tokenizer.encode(prompt)]
    try:
        return [int(piece) for piece in prompt.split()]
    except ValueError:
        raise RecipeError(f"--prompt: {source} was trained without a tokenizer (synthetic data), so the prompt is "
                          f"token ids separated by spaces, e.g. --prompt '3 17 5'; got {prompt!r}") from None


def run(path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_k: Optional[int] = None,
        top_p: float = 1.0, seed: Optional[int] = 0, tokenizer: Optional[str] = None, device: Optional[str] = None,
        out: Optional[TextIO] = None) -> list[int]:
    """``mambatrain generate``: load, encode the prompt, stream the continuation to ``out``; returns its ids."""
    from ..checkpoint.convert import load_model
    from ..data.tokenizer import load_tokenizer

    model, weights = load_model(path)
    spec = tokenizer or weights.tokenizer
    tok = load_tokenizer(spec, weights.eod_token) if spec else None
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise RecipeError(f"--tokenizer: {tok.name} has {tok.vocab_size} tokens but {weights.source} has "
                          f"{model.config.vocab_size} embedding rows: not the model's tokenizer")
    ids = _encode_prompt(prompt, tok, weights.source)
    if not ids or max(ids) >= model.config.vocab_size or min(ids) < 0:
        raise RecipeError(f"--prompt: needs at least one token, each below the vocabulary size "
                          f"{model.config.vocab_size}; got {ids}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = out or sys.stdout
    generated: list[int] = []
    text = shown = ""
    for token in stream(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p, seed,
                        stop_id=tok.eod_id if tok is not None else None):
        generated.append(int(token[0]))
        if tok is None:
            out.write(f"{generated[-1]} ")
        else:  # decode the whole continuation, holding back a character whose bytes are still arriving
            text = tok.decode([i for i in generated if i != tok.eod_id])
            ready = text.rstrip("\ufffd")
            out.write(ready[len(shown):])
            shown = ready
        out.flush()
    out.write(text[len(shown):] + "\n")
    return generated
