"""Synthetic tasks, generated on the fly: passkey retrieval, selective copying, Markov walks (MQAR is in mqar.py).

Like MQAR, sample ``i`` is a pure function of (seed, i), so a resumed run regenerates
exactly the batches it would have seen, and the validation set is a fixed seed.
Labels are already shifted (the label at position t is the token the model should
emit after reading position t) and are -100 except where the task is scored, so
``val/accuracy`` is the task's accuracy.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.loss import IGNORE_INDEX

# Passkey vocabulary: 0 filler, 1 marks the passkey, 2 asks for it, 3-12 the digits 0-9, 13+ noise.
PASSKEY_MARK, PASSKEY_QUERY, DIGIT0, NOISE0 = 1, 2, 3, 13
# Selective copying vocabulary: 0 blank, 1 the copy marker, 2+ the tokens to copy.
BLANK, COPY_MARK, DATA0 = 0, 1, 2


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def passkey_sample(index: int, seed: int, seq_len: int, vocab_size: int, digits: int,
                   depth: Optional[float] = None) -> dict[str, torch.Tensor]:
    """``noise.. MARK d1..dn MARK ..noise QUERY d1..dn``; scored on the digits after QUERY.

    The passkey block sits after ``depth`` of the noise (0: at the start, 1: just before the query).
    """
    gen = _generator(seed, index)
    key = DIGIT0 + torch.randint(0, 10, (digits,), generator=gen)
    noise_len = seq_len - (digits + 2) - (digits + 1)
    noise = NOISE0 + torch.randint(0, vocab_size - NOISE0, (noise_len,), generator=gen)
    fraction = depth if depth is not None else torch.rand((), generator=gen).item()
    at = round(fraction * noise_len)
    mark, query = torch.tensor([PASSKEY_MARK]), torch.tensor([PASSKEY_QUERY])
    input_ids = torch.cat([noise[:at], mark, key, mark, noise[at:], query, key])
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    answer = seq_len - digits  # position of the first answer digit
    labels[answer - 1: seq_len - 1] = key  # QUERY predicts d1, d_i predicts d_(i+1)
    return {"input_ids": input_ids, "labels": labels}


def selective_copy_sample(index: int, seed: int, seq_len: int, vocab_size: int,
                          num_tokens: int) -> dict[str, torch.Tensor]:
    """``num_tokens`` tokens scattered among blanks, then COPY_MARK and the same tokens in order (scored)."""
    gen = _generator(seed, index)
    region = seq_len - num_tokens - 1
    tokens = DATA0 + torch.randint(0, vocab_size - DATA0, (num_tokens,), generator=gen)
    places = torch.randperm(region, generator=gen)[:num_tokens].sort().values
    input_ids = torch.full((seq_len,), BLANK, dtype=torch.long)
    input_ids[places] = tokens
    input_ids[region] = COPY_MARK
    input_ids[region + 1:] = tokens
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    labels[region: seq_len - 1] = tokens  # the marker predicts the first token, each copy the next
    return {"input_ids": input_ids, "labels": labels}


def markov_successors(graph_seed: int, vocab_size: int, branches: int) -> list[list[int]]:
    """The fixed random graph of the markov task: ``branches`` successors for every token."""
    gen = torch.Generator().manual_seed(graph_seed)
    return torch.randint(0, vocab_size, (vocab_size, branches), generator=gen).tolist()


def markov_sample(index: int, seed: int, seq_len: int, successors: list[list[int]]) -> dict[str, torch.Tensor]:
    """A walk on a fixed random graph (``markov_successors``): each next token is one of the current token's
    successors, drawn uniformly. Every position is scored (the label is the next token of the walk).

    A model that has learnt the graph reaches ln(branches) nats from ln(vocab_size), whatever the length, so the
    loss falls within a few steps: a smoke test of training at any length (MQAR's loss falls only once in-context
    recall is learnt). The walk is sequential: about a second per million tokens, in the data workers.
    """
    gen = _generator(seed, index)
    picks = torch.randint(0, len(successors[0]), (seq_len,), generator=gen).tolist()
    token = int(torch.randint(0, len(successors), (1,), generator=gen))
    walk = [token]
    for pick in picks:
        token = successors[token][pick]
        walk.append(token)
    walk = torch.tensor(walk)
    return {"input_ids": walk[:-1], "labels": walk[1:]}


class SyntheticBatches(torch.utils.data.Dataset):
    """Batch ``b`` of one data-parallel rank: samples ``first_sample + (b * world + rank) * batch_size + j``.

    ``first_sample`` is the number of samples trained before (a resume), so a run resumed on
    another number of ranks goes on with the next samples of the same global sequence.
    """

    def __init__(self, sample: Callable[[int], dict], num_batches: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, first_sample: int = 0):
        self.sample, self.num_batches, self.batch_size = sample, num_batches, batch_size
        self.rank, self.world_size, self.first_sample = rank, world_size, first_sample

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, batch_index: int) -> dict[str, torch.Tensor]:
        first = self.first_sample + (batch_index * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class UnsizedOrder(torch.utils.data.Sampler):
    """Batch indices 0, 1, ..., n-1 in order, with no ``len``: a training loader over ``SyntheticBatches``.

    A resumed run's loader holds only the batches left, while Lightning restores its count of the batches of
    the epoch already trained on; given a length, Lightning would end the "epoch" once that count reached it
    (early, when resuming before half way) and start the loader again from its first batch, training on the
    same samples twice. Without one, the run ends at trainer.max_steps, as with the streaming sources.
    """

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))
