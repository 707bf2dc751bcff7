"""Resuming on another layout (ranks x workers): prepared data shares the rest of the epoch, synthetic data goes on
at the next global sample, text and carried rows are refused with the key to change."""

import logging
from collections import Counter

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.data.relayout import redivide
from mambatrain.data.shards import PreparedStream, TokenStore, prepare, slot_range

from corpus_helpers import documents_of, doc_text, write_corpus
from test_datamodule import MODEL, fake_trainer, recipe, run

L = 40


def read(stream, n=None) -> list[torch.Tensor]:
    rows = []
    for sample in stream:
        rows.append(torch.from_numpy(sample["input_ids"]))
        if n is not None and len(rows) == n:
            break
    return rows


@pytest.mark.parametrize("new_ranks,new_streams", [(1, 1), (1, 3), (3, 2)])
def test_redivided_prepared_epoch_reads_every_document_once(tmp_path, new_ranks, new_streams):
    docs = write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=30)
    prepare(recipe(tmp_path, "prepared"))
    store = TokenStore(str(tmp_path / "shards"), "train")
    # Old layout: 2 ranks x 2 streams that trained 3, 1, 0 and 5 samples.
    pieces, saved = [], [[None, None], [None, None]]
    for slot, n in enumerate([3, 1, 0, 5]):
        if n:
            stream = PreparedStream(store, slot, 4, L, reset=True, cycle=False)
            pieces.append(documents_of(read(stream, n)))
            saved[slot // 2][slot % 2] = stream.state()
    new = redivide(store, saved, 2, new_ranks, new_streams)
    assert len(new.states) == new_ranks and all(len(s) == new_streams for s in new.states)
    consumed = sum(slot_range(store, s, 4)[1] - slot_range(store, s, 4)[0] for s in range(4)) - new.tokens_left
    assert consumed == sum(n * L for n in [3, 1, 0, 5])  # nothing skipped: the rest is shared
    for slot, state in enumerate(s for rank in new.states for s in rank):
        stream = PreparedStream(store, slot, new_ranks * new_streams, L, reset=True, cycle=False, state=state)
        rows = read(stream)
        if rows:
            pieces.append(documents_of(rows))
    seen = Counter(p for stream_pieces in pieces for p in stream_pieces)
    assert max(seen.values()) == 1  # no document (or piece of one) twice
    fragments = [p for p in seen if p not in docs]
    for doc in docs:  # every document whole, or cut once where an old stream stopped: head + tail, both read
        if doc not in seen:
            assert any(doc.startswith(a) and doc[len(a):] in fragments for a in fragments), doc
    assert len(fragments) <= 2 * 3  # three old streams stopped, each at most inside one document


def test_unchanged_layout_state_has_no_plan(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=20)
    prepare(recipe(tmp_path, "prepared"))
    stream = PreparedStream(TokenStore(str(tmp_path / "shards"), "train"), 0, 2, L, reset=True)
    read(stream, 2)
    assert set(stream.state()) == {"epoch", "pos"}  # checkpoints of an ordinary run keep their format


def two_rank_state(dm_recipe, steps):
    """The state a 2-rank run (workers as in the recipe) saves after ``steps`` batches per rank."""
    states = []
    for rank in range(2):
        dm = RecipeDataModule(dm_recipe)
        dm.trainer = fake_trainer(0)
        dm.trainer.global_rank, dm.trainer.world_size = rank, 2
        run(dm, steps, trained=steps)
        dm.trainer.global_step = steps
        states.append(dm.state_dict())
    merged = dict(states[0])
    if "streams" in merged:
        merged["streams"] = [s["streams"][0] for s in states]
        merged["data_parallel_ranks"] = 2
    else:
        merged["samples_consumed"] = steps * 2 * dm_recipe.data.batch_size
    return merged


def test_prepared_resume_on_one_rank_logs_the_new_layout(tmp_path, caplog):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=30)
    r = recipe(tmp_path, "prepared", workers=0)
    prepare(r)
    state = two_rank_state(r, 3)
    resumed = RecipeDataModule(r)
    resumed.trainer = fake_trainer(3)
    with caplog.at_level(logging.INFO, logger="mambatrain"):
        resumed.load_state_dict(state)
    assert "data layout changed" in caplog.text and "2 data-parallel ranks x 1 streams" in caplog.text
    assert "this run has 1 x 1" in caplog.text and "0 tokens skipped" in caplog.text
    assert len(run(resumed, 2, trained=2)) == 2


def test_text_and_carry_state_refuse_a_changed_layout(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=10)
    state = two_rank_state(recipe(tmp_path, "text", workers=0), 1)
    one = RecipeDataModule(recipe(tmp_path, "text", workers=0))
    one.trainer = fake_trainer(1)
    with pytest.raises(RecipeError, match="^data.source: .*2 data-parallel ranks x 1 streams.*1 x 1"):
        one.load_state_dict(state)
    prepare(recipe(tmp_path, "prepared"))
    rows = recipe(tmp_path, "prepared", workers=0, batch_size=2)
    rows.trainer.carry_state = True
    state = two_rank_state(rows, 1)
    one = RecipeDataModule(rows)
    one.trainer = fake_trainer(1)
    with pytest.raises(RecipeError, match="^trainer.carry_state: "):
        one.load_state_dict(state)


def test_synthetic_resume_on_another_rank_count_continues_the_global_samples(caplog):
    r = load_recipe(values={"model": MODEL, "data": {"source": "mqar", "seq_len": 32, "batch_size": 2,
                                                     "mqar": {"num_kv_pairs": 2}}, "trainer": {"max_steps": 20}})
    state = two_rank_state(r, 3)  # 3 batches x 2 ranks x 2 samples: samples 0-11 trained
    resumed = RecipeDataModule(r)
    resumed.trainer = fake_trainer(3)
    with caplog.at_level(logging.INFO, logger="mambatrain"):
        resumed.load_state_dict(state)
    assert "continues at sample 12" in caplog.text
    straight = RecipeDataModule(r)  # one rank from the start: its batch 6 holds samples 12, 13
    straight.trainer = fake_trainer(0)
    expected = run(straight, 8, trained=0)[6:]
    for a, b in zip(expected, run(resumed, 2, trained=2)):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    resumed.trainer.global_step = 5
    assert resumed.state_dict()["samples_consumed"] == 12 + 2 * 2
