"""The datamodule's saved position: after a resume the next batches are those of the uninterrupted run."""

from types import SimpleNamespace

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.data.shards import prepare
from mambatrain.data.streaming import POSITION_KEY

from corpus_helpers import write_corpus

MODEL = {"kind": "mamba", "d_model": 16, "n_layers": 1, "vocab_size": 320, "mamba": {"d_state": 4, "head_dim": 8}}


def recipe(tmp_path, source="text", workers=2, **data):
    return load_recipe(values={"model": MODEL, "data": {
        "source": source, "seq_len": 40, "batch_size": 2, "num_workers": workers,
        "text": {"sources": [{"path": str(tmp_path / "corpus")}]},
        "prepared": {"path": str(tmp_path / "shards")}, **data}})


def fake_trainer(step):
    return SimpleNamespace(global_step=step, global_rank=0, world_size=1)


def run(datamodule, n, trained):
    """n batches from a fresh train loader; the first `trained` go through the hook as Lightning trains them."""
    batches = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i < trained:
            batch = datamodule.on_before_batch_transfer(batch, 0)
        else:  # prefetched or later: never seen by the hook before the checkpoint
            batch = {k: v for k, v in batch.items() if k != POSITION_KEY}
        batches.append(batch)
        if len(batches) == n:
            return batches


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("source,workers,n_files", [("text", 2, 2), ("text", 2, 1), ("prepared", 2, 2), ("text", 0, 1)],
                         ids=["text-files-split", "text-one-file", "prepared", "text-no-workers"])
def test_resumed_batches_equal_uninterrupted(tmp_path, source, workers, n_files):
    write_corpus(tmp_path / "corpus", n_files=n_files, docs_per_file=60 // n_files)
    r = recipe(tmp_path, source, workers)
    if source == "prepared":
        prepare(r)
    consumed = 5  # odd: the resumed loader's first batch comes from the second stream
    straight = RecipeDataModule(r)
    straight.trainer = fake_trainer(0)
    batches = run(straight, 16, trained=consumed)
    assert "seq_idx" in batches[0] and batches[0]["seq_idx"].dtype == torch.int32
    straight.trainer = fake_trainer(consumed)
    state = straight.state_dict()

    resumed = RecipeDataModule(r)
    resumed.trainer = fake_trainer(consumed)
    resumed.load_state_dict(state)
    for a, b in zip(batches[consumed:], run(resumed, 11, trained=0)):
        assert_same(a, b)


def test_changed_worker_count_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=10)
    dm = RecipeDataModule(recipe(tmp_path, workers=2))
    dm.trainer = fake_trainer(0)
    state = dm.state_dict()
    other = RecipeDataModule(recipe(tmp_path, workers=1))
    other.trainer = fake_trainer(0)
    with pytest.raises(RecipeError, match="data.num_workers"):
        other.load_state_dict(state)


def test_resuming_a_text_position_on_prepared_data_is_refused(tmp_path):
    # Each source's positions mean nothing to the other's streams (their workers failed with a KeyError).
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=10)
    prepare(recipe(tmp_path, "prepared"))
    for saved, resumed in (("text", "prepared"), ("prepared", "text")):
        dm = RecipeDataModule(recipe(tmp_path, saved))
        dm.trainer = fake_trainer(0)
        state = dm.state_dict()
        other = RecipeDataModule(recipe(tmp_path, resumed))
        other.trainer = fake_trainer(0)
        with pytest.raises(RecipeError, match=f"data.source: the checkpoint holds the position of {saved} "):
            other.load_state_dict(state)


def test_resuming_on_shards_prepared_again_is_refused(tmp_path):
    """A prepared position is a token offset: on other shards it would silently point at other documents."""
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=20)
    prepare(recipe(tmp_path, "prepared"))
    dm = RecipeDataModule(recipe(tmp_path, "prepared"))
    dm.trainer = fake_trainer(0)
    state = dm.state_dict()
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=25)  # more documents, prepared again
    prepare(recipe(tmp_path, "prepared"))
    other = RecipeDataModule(recipe(tmp_path, "prepared"))
    other.trainer = fake_trainer(0)
    with pytest.raises(RecipeError, match="^data.prepared.path: the checkpoint's data position is in a train split"):
        other.load_state_dict(state)
    del state["prepared_tokens"]  # a checkpoint from before the check: trusted, as before
    other.load_state_dict(state)


def test_missing_tokenizer_fails_before_training(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=3)
    with pytest.raises(RecipeError, match="data.text.tokenizer: .*nope not found"):
        RecipeDataModule(recipe(tmp_path, text={"sources": [{"path": str(tmp_path / "corpus")}],
                                                "tokenizer": str(tmp_path / "nope")}))


def test_validation_files_inside_the_training_sources_are_refused(tmp_path):
    # corpus/ holds part0 and part1: validating on part1 would measure fit, not generalisation.
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=3)
    r = recipe(tmp_path, text={"sources": [{"path": str(tmp_path / "corpus")}],
                               "val_sources": [{"path": str(tmp_path / "corpus" / "part1.jsonl")}]})
    message = r"data.text.val_sources\[0\]: .*part1.jsonl is also read by data.text.sources\[0\]"
    with pytest.raises(RecipeError, match=message):
        RecipeDataModule(r)
    with pytest.raises(RecipeError, match=message):  # nor written as the val split of prepared shards
        prepare(r)
