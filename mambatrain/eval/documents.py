"""Long documents for the loss-by-position curve, from the recipe's (validation) data.

Text and prepared sources give whole documents of at least the asked length, cut to it, so that
position t really is the t-th token of a document. Synthetic sources give their validation samples at
that length (scored only where the task labels a token).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config.schema import Recipe, RecipeError
from ..data.datamodule import VALIDATION_SEED_OFFSET
from ..data.mqar import mqar_sample
from ..data.synthetic import passkey_sample, selective_copy_sample

log = logging.getLogger("mambatrain")

SCAN_LIMIT = 100_000  # documents read at most while looking for long ones


def _text_documents(recipe: Recipe, length: int):
    from ..data.sources import DocumentStream
    from ..data.tokenizer import load_tokenizer

    text = recipe.data.text
    sources, key = (text.val_sources, "data.text.val_sources") if text.val_sources else (text.sources,
                                                                                         "data.text.sources")
    tokenizer = load_tokenizer(text.tokenizer, text.eod_token)
    docs = DocumentStream(sources, key, slot=0, n_slots=1, seed=text.seed, cycle=False, shuffle_files=False)
    for _, doc in zip(range(SCAN_LIMIT), docs):
        ids = tokenizer.encode(doc)
        if len(ids) > length:
            yield ids


def _prepared_documents(recipe: Recipe, length: int):
    from ..data.shards import TokenStore, read_index

    split = "val" if "val" in read_index(recipe.data.prepared.path)["splits"] else "train"
    store = TokenStore(recipe.data.prepared.path, split)
    seen = 0
    for tokens, ends in zip(store.tokens, store.doc_ends):
        start = 0
        for end in ends:
            seen += 1
            if seen > SCAN_LIMIT:
                return
            if end - start > length + 1:  # the document's own tokens, its end-of-document token aside
                yield np.asarray(tokens[start:end - 1], dtype=np.int64)
            start = int(end)


def _synthetic(recipe: Recipe, source: str, length: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    data, vocab = recipe.data, recipe.model.vocab_size
    config = getattr(data, source)
    seed = config.train_samples_seed + VALIDATION_SEED_OFFSET + seed
    if source == "mqar":
        samples = [mqar_sample(i, seed, length, vocab, config.num_kv_pairs) for i in range(count)]
    elif source == "passkey":
        samples = [passkey_sample(i, seed, length, vocab, config.digits, config.depth) for i in range(count)]
    else:
        samples = [selective_copy_sample(i, seed, length, vocab, config.num_tokens) for i in range(count)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def long_documents(recipe: Recipe, length: int, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` documents of ``length`` tokens: input_ids and labels (next tokens), (count, length) each."""
    source = recipe.data.val_source or recipe.data.source
    if source not in ("text", "prepared"):
        return _synthetic(recipe, source, length, count, seed)
    found = _text_documents(recipe, length) if source == "text" else _prepared_documents(recipe, length)
    docs = [torch.as_tensor(np.asarray(ids[:length + 1], dtype=np.int64)) for _, ids in zip(range(count), found)]
    if not docs:
        raise RecipeError(f"eval.seq_len: no document of the {source} validation data has more than {length} tokens "
                          f"(first {SCAN_LIMIT} read); lower eval.seq_len")
    if len(docs) < count:
        log.warning("eval: only %d documents of more than %d tokens found (eval.documents is %d)", len(docs),
                    length, count)
    ids = torch.stack(docs)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

