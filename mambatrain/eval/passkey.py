"""Passkey retrieval prompts by length and depth, scored on the passkey's tokens (teacher-forced argmax).

With a tokenizer the prompt is text (Mohtashami & Jaggi, 2023): filler sentences, the passkey sentence
at the chosen depth, then the question, whose answer is the passkey. Without one (a model trained on
the synthetic passkey task) it is ``data.synthetic.passkey_sample``'s token layout. A sample counts as
retrieved when every passkey token is the model's top prediction; that is exactly when greedy decoding
would write the passkey.
"""

from __future__ import annotations

import torch

from ..data.synthetic import passkey_sample
from ..models.loss import IGNORE_INDEX

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def _key(generator: torch.Generator, digits: int) -> str:
    return "".join(str(d) for d in torch.randint(0, 10, (digits,), generator=generator).tolist())


def text_prompt(tokenizer, length: int, depth: float, key: str) -> dict[str, torch.Tensor] | None:
    """input_ids and labels (length,), labelled only at the answer; None when ``length`` cannot hold it."""
    def ids(text: str) -> list[int]:
        return [int(i) for i in tokenizer.encode(text)]

    needle, question, answer = ids(NEEDLE.format(key=key)), ids(QUESTION), ids(" " + key)
    room = length + 1 - len(needle) - len(question) - len(answer)  # +1: the last answer token is only a label
    if room < 0:
        return None
    filler = ids(FILLER)
    filler = (filler * (room // len(filler) + 1))[:room]
    at = round(depth * room)
    sequence = torch.tensor(filler[:at] + needle + filler[at:] + question + answer)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    labels[length - len(answer):] = sequence[length + 1 - len(answer):]
    return {"input_ids": sequence[:length], "labels": labels}


def synthetic_prompt(index: int, seed: int, length: int, vocab_size: int, digits: int,
                     depth: float) -> dict[str, torch.Tensor] | None:
    if length < 2 * digits + 4:
        return None
    return passkey_sample(index, seed, length, vocab_size, digits, depth)


def passkey_prompts(tokenizer, length: int, depth: float, samples: int, digits: int, vocab_size: int,
                    seed: int) -> dict[str, torch.Tensor] | None:
    """``samples`` prompts of one (length, depth) cell, stacked; None when the length is too short."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    prompts = []
    for i in range(samples):
        if tokenizer is None:
            prompt = synthetic_prompt(i, seed + length, length, vocab_size, digits, depth)
        else:
            prompt = text_prompt(tokenizer, length, depth, _key(generator, digits))
        if prompt is None:
            return None
        prompts.append(prompt)
    return {key: torch.stack([p[key] for p in prompts]) for key in prompts[0]}
