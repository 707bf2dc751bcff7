"""Multi-query associative recall (MQAR, from the Zoology paper), generated on the fly.

Each sequence opens with key-value pairs ``k1 v1 k2 v2 ...``; the rest of the
sequence is queries: a key followed by its value, which the model must predict.
Every key is queried at least once, in random order, and the remaining query slots
ask for random keys again, so every second token after the pairs carries a
training signal. Solving it needs recall over the whole context, which is what
long-context layers are for.

Token 0 is filler; keys come from the lower half of the remaining vocabulary and
values from the upper half. Sample ``i`` is a pure function of (seed, i), so any
position in the stream can be regenerated exactly after a resume. Batches are made by
``synthetic.SyntheticBatches``, like those of the other synthetic tasks.
"""

from __future__ import annotations

import torch

from ..models.loss import IGNORE_INDEX

FILLER = 0


def mqar_sample(index: int, seed: int, seq_len: int, vocab_size: int, num_kv_pairs: int) -> dict[str, torch.Tensor]:
    """One sequence: ``input_ids`` (seq_len,) and ``labels`` (seq_len,), -100 except at the queries."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    n_keys = (vocab_size - 1) // 2
    keys = 1 + torch.randperm(n_keys, generator=gen)[:num_kv_pairs]
    values = 1 + n_keys + torch.randint(0, vocab_size - 1 - n_keys, (num_kv_pairs,), generator=gen)
    input_ids = torch.full((seq_len,), FILLER, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    input_ids[0: 2 * num_kv_pairs: 2] = keys
    input_ids[1: 2 * num_kv_pairs: 2] = values
    # Queries fill two-token slots after the pairs: the key, then its value as the answer.
    n_slots = (seq_len - 2 * num_kv_pairs) // 2
    extra = torch.randint(0, num_kv_pairs, (n_slots - num_kv_pairs,), generator=gen)
    asked = torch.cat([torch.arange(num_kv_pairs), extra])[torch.randperm(n_slots, generator=gen)]
    positions = 2 * num_kv_pairs + 2 * torch.arange(n_slots)
    input_ids[positions] = keys[asked]
    input_ids[positions + 1] = values[asked]
    labels[positions] = values[asked]
    return {"input_ids": input_ids, "labels": labels}

