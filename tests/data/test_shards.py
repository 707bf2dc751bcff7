"""Prepared shards: the same tokens as on-the-fly tokenization, disjoint and complete slots, exact positions."""

from collections import Counter

import numpy as np
import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.shards import PreparedStream, TokenStore, prepare
from mambatrain.data.streaming import PreparedStreams

from corpus_helpers import doc_text, documents_of, read_slots, write_corpus, write_jsonl


def recipe_for(tmp_path, **prepared):
    return load_recipe(values={
        "model": {"kind": "mamba", "d_model": 16, "n_layers": 1, "vocab_size": 320,
                  "mamba": {"d_state": 4, "head_dim": 8}},
        "data": {"source": "prepared", "seq_len": 32,
                 "text": {"sources": [{"path": str(tmp_path / "corpus")}],
                          "val_sources": [{"path": str(tmp_path / "val.jsonl")}]},
                 "prepared": {"path": str(tmp_path / "shards"), **prepared}},
    })


@pytest.fixture
def prepared(tmp_path):
    expected = write_corpus(tmp_path / "corpus", n_files=3, docs_per_file=40)
    write_jsonl(tmp_path / "val.jsonl", range(500, 510))
    # Tiny shards: documents and sequences straddle shard files.
    root = prepare(recipe_for(tmp_path, shard_tokens=700, shuffle_documents=16))
    return root, expected


def test_prepare_writes_every_document_once_across_shards(prepared):
    root, expected = prepared
    store = TokenStore(str(root), "train")
    assert len(store.tokens) > 3
    tokens, starts = store.read(0, store.n_tokens)
    assert tokens.dtype == np.uint16
    ids = tokens.astype(np.int64)
    assert (ids[np.concatenate([starts, [store.n_tokens]]) - 1] == store.eod_id).all()  # every document ends in EOD
    docs = documents_of([torch.from_numpy(ids)])
    assert sorted(docs) == sorted(expected)
    assert docs != expected  # the shuffle buffer changed the order
    val = TokenStore(str(root), "val")
    val_docs = documents_of([torch.from_numpy(val.read(0, val.n_tokens)[0].astype(np.int64))])
    assert sorted(val_docs) == sorted(doc_text(i) for i in range(500, 510))


def test_two_ranks_two_workers_cover_the_shards_once(prepared):
    root, expected = prepared
    counts, per_slot = Counter(), []
    for rank in range(2):
        for _, rows in sorted(read_slots(PreparedStreams(str(root), "train", 32, True, cycle=False), rank, 2, 2).items()):
            docs = documents_of(rows)
            per_slot.append(len(docs))
            counts.update(docs)
    assert len(per_slot) == 4 and min(per_slot) > 0
    assert set(counts) == set(expected) and max(counts.values()) == 1


def test_prepared_stream_resumes_exactly_across_epochs(prepared):
    root, _ = prepared
    store = TokenStore(str(root), "train")
    straight = PreparedStream(store, 1, 3, 256, reset=True)
    samples, states = [], []
    for _ in range(40):  # several epochs of this slot
        samples.append(next(straight))
        states.append(straight.state())
    assert states[-1]["epoch"] >= 2
    for k in (0, 7, 23):
        resumed = PreparedStream(store, 1, 3, 256, reset=True, state=states[k])
        for expected in samples[k + 1: k + 6]:
            got = next(resumed)
            for key in expected:
                np.testing.assert_array_equal(expected[key], got[key])


def test_missing_or_too_small_vocabulary_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="data.prepared.path: no index.json"):
        TokenStore(str(tmp_path / "nothing"))
    write_corpus(tmp_path / "corpus", 1, 3)
    recipe = recipe_for(tmp_path)
    recipe.data.text.val_sources = []
    recipe.model.vocab_size = 100
    with pytest.raises(RecipeError, match="model.vocab_size: the tokenizer byte has 257 tokens"):
        prepare(recipe)
