"""Row streams (trainer.carry_state): row i of every batch continues row i of the batch before, rows, ranks and
workers read disjoint documents, document ids count on across batches, and a resume gives the same next batches."""

from types import SimpleNamespace

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.data.shards import prepare
from mambatrain.data.streaming import POSITION_KEY

from corpus_helpers import BYTE_EOD, write_corpus

MODEL = {"kind": "mamba", "d_model": 16, "n_layers": 1, "vocab_size": 320, "mamba": {"d_state": 4, "head_dim": 8}}
ROWS = 3


def recipe(tmp_path, source="text", workers=0, carry=True):
    return load_recipe(values={"model": MODEL, "trainer": {"carry_state": carry}, "data": {
        "source": source, "seq_len": 40, "batch_size": ROWS, "num_workers": workers,
        "text": {"sources": [{"path": str(tmp_path / "corpus")}]}, "prepared": {"path": str(tmp_path / "shards")}}})


def loader_batches(datamodule, n, trained=0, rank=0, world=1, step=0):
    """n batches of a fresh train loader; the first `trained` pass the hook that records the position."""
    datamodule.trainer = SimpleNamespace(global_step=step, global_rank=rank, world_size=world)
    batches = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        batch = datamodule.on_before_batch_transfer(batch, 0) if i < trained else \
            {k: v for k, v in batch.items() if k != POSITION_KEY}
        batches.append(batch)
        if len(batches) == n:
            return batches


def whole_documents(ids: torch.Tensor) -> set[str]:
    """The documents lying wholly inside a byte-tokenized stream piece (the cut ones at both ends left out)."""
    pieces = bytes(t if t != BYTE_EOD else 0 for t in ids.tolist()).split(b"\0")
    return {p.decode("utf-8") for p in pieces[1:-1]}


def row_stream(batches, row):
    """Row `row` of consecutive batches as one stream: inputs, and the label after the last input."""
    ids = torch.cat([b["input_ids"][row] for b in batches])
    seq_idx = torch.cat([b["seq_idx"][row] for b in batches])
    return ids, seq_idx, batches[-1]["labels"][row, -1]


@pytest.mark.parametrize("source,workers", [("text", 0), ("text", 1), ("prepared", 0)])
def test_rows_are_contiguous_disjoint_streams_with_document_ids_counting_on(tmp_path, source, workers):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=30)
    r = recipe(tmp_path, source, workers)
    if source == "prepared":
        prepare(r)
    batches = loader_batches(RecipeDataModule(r), 12)
    docs_per_row = []
    for row in range(ROWS):
        for a, b in zip(batches, batches[1:]):  # the last label of a step is the first input of the next
            assert a["labels"][row, -1] == b["input_ids"][row, 0]
        ids, seq_idx, _ = row_stream(batches, row)
        # A new id exactly where the token before was an end of document, across step edges too.
        after_eod = ids[:-1] == BYTE_EOD
        steps = seq_idx[1:] - seq_idx[:-1]
        assert torch.equal(steps, after_eod.to(steps.dtype))
        assert seq_idx.dtype == torch.int32
        docs_per_row.append(whole_documents(ids))
        assert len(docs_per_row[-1]) >= 2
    for i in range(ROWS):
        for j in range(i + 1, ROWS):
            assert not docs_per_row[i] & docs_per_row[j], "two rows read the same document"


def test_ranks_read_disjoint_rows(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=40)
    r = recipe(tmp_path)
    seen = []
    for rank in range(2):
        batches = loader_batches(RecipeDataModule(r), 8, rank=rank, world=2)
        seen.append(set().union(*(whole_documents(row_stream(batches, i)[0]) for i in range(ROWS))))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("source", ["text", "prepared"])
def test_resume_gives_the_same_next_batches(tmp_path, source):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=30)
    r = recipe(tmp_path, source)
    if source == "prepared":
        prepare(r)
    consumed = 5
    straight = RecipeDataModule(r)
    batches = loader_batches(straight, 12, trained=consumed)
    straight.trainer = SimpleNamespace(global_step=consumed, global_rank=0, world_size=1)
    state = straight.state_dict()
    assert state["row_streams"] and len(state["streams"][0][0]) == ROWS  # rank 0, stream 0: one position per row

    resumed = RecipeDataModule(r)
    resumed.trainer = SimpleNamespace(global_step=consumed, global_rank=0, world_size=1)
    resumed.load_state_dict(state)
    for a, b in zip(batches[consumed:], loader_batches(resumed, 7, step=consumed)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_switching_carry_state_on_resume_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=10)
    plain = RecipeDataModule(recipe(tmp_path, carry=False))
    loader_batches(plain, 1, trained=1)
    state = plain.state_dict()
    with pytest.raises(RecipeError, match="trainer.carry_state"):
        RecipeDataModule(recipe(tmp_path)).load_state_dict(state)
