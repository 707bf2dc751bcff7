"""Synthetic tasks: passkey retrieval and selective copying score only the answer; Markov walks score every token."""

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.data.synthetic import (COPY_MARK, DIGIT0, PASSKEY_MARK, PASSKEY_QUERY, markov_sample,
                                       markov_successors, passkey_sample, selective_copy_sample)
from mambatrain.models.loss import IGNORE_INDEX


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sits_at_its_depth_and_only_the_digits_are_scored(depth):
    s = passkey_sample(3, seed=1, seq_len=200, vocab_size=64, digits=5, depth=depth)
    ids, labels = s["input_ids"], s["labels"]
    assert ids.shape == labels.shape == (200,)
    marks = (ids == PASSKEY_MARK).nonzero().flatten().tolist()
    noise = 200 - 7 - 6
    assert marks[0] == round(depth * noise) and marks[1] == marks[0] + 6
    key = ids[marks[0] + 1: marks[1]]
    assert ((key >= DIGIT0) & (key < DIGIT0 + 10)).all()
    assert ids[-6] == PASSKEY_QUERY and torch.equal(ids[-5:], key)
    scored = labels != IGNORE_INDEX
    assert scored.sum() == 5 and torch.equal(labels[scored], key)
    assert torch.equal(labels[-6:-1], key)  # the query predicts the first digit, each digit the next


def test_selective_copy_asks_for_the_scattered_tokens_in_order():
    s = selective_copy_sample(0, seed=2, seq_len=64, vocab_size=20, num_tokens=6)
    ids, labels = s["input_ids"], s["labels"]
    region = 64 - 6 - 1
    data = ids[:region][ids[:region] != 0]
    assert len(data) == 6 and ids[region] == COPY_MARK and torch.equal(ids[region + 1:], data)
    assert torch.equal(labels[labels != IGNORE_INDEX], data)


def test_train_on_one_task_and_validate_on_another():
    recipe = load_recipe(values={
        "model": {"kind": "mamba", "d_model": 16, "n_layers": 1, "vocab_size": 32, "mamba": {"d_state": 4, "head_dim": 8}},
        "data": {"source": "selective_copy", "val_source": "passkey", "seq_len": 64, "batch_size": 2,
                 "passkey": {"depth": 0.25, "val_samples": 4}}})
    dm = RecipeDataModule(recipe)
    train, val = next(iter(dm.train_dataloader())), list(dm.val_dataloader())
    assert (train["input_ids"] == COPY_MARK).any() and len(val) == 2
    assert (val[0]["input_ids"] == PASSKEY_QUERY).sum() == 2
    assert torch.equal(val[0]["input_ids"], list(RecipeDataModule(recipe).val_dataloader())[0]["input_ids"])


def test_too_short_for_the_passkey_names_seq_len():
    with pytest.raises(RecipeError, match="data.seq_len: passkey with 5 digits needs seq_len >= 14"):
        load_recipe(values={"model": {"kind": "mamba", "vocab_size": 32}, "data": {"source": "passkey", "seq_len": 8}})


def test_markov_walk_follows_the_graph_and_scores_every_next_token():
    successors = markov_successors(graph_seed=0, vocab_size=50, branches=3)
    s = markov_sample(7, seed=1, seq_len=300, successors=successors)
    ids, labels = s["input_ids"], s["labels"]
    assert ids.shape == labels.shape == (300,)
    assert torch.equal(labels[:-1], ids[1:])  # every position predicts the next token of the walk
    assert all(int(b) in successors[int(a)] for a, b in zip(ids, labels))
    again = markov_sample(7, seed=1, seq_len=300, successors=successors)
    assert torch.equal(again["input_ids"], ids)  # a pure function of (seed, index): exact resumes
    assert not torch.equal(markov_sample(8, seed=1, seq_len=300, successors=successors)["input_ids"], ids)


def test_markov_recipe_trains_and_validates_on_the_same_graph():
    recipe = load_recipe(values={
        "model": {"kind": "mamba", "d_model": 16, "n_layers": 1, "vocab_size": 40, "mamba": {"d_state": 4, "head_dim": 8}},
        "data": {"source": "markov", "seq_len": 64, "batch_size": 2, "markov": {"branches": 2}}})
    dm = RecipeDataModule(recipe)
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    successors = markov_successors(0, 40, 2)
    for batch in (train, val):
        assert batch["input_ids"].shape == (2, 64)
        assert all(int(b) in successors[int(a)] for a, b in zip(batch["input_ids"].flatten(), batch["labels"].flatten()))


def test_markov_branches_must_be_positive():
    with pytest.raises(RecipeError, match="data.markov.branches"):
        load_recipe(values={"model": {"kind": "mamba", "vocab_size": 32}, "data": {"source": "markov", "markov": {"branches": 0}}})
