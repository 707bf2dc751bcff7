"""finetune.init_from starts a new run at the checkpoint's loss; finetune.freeze keeps parameters fixed."""

import csv

import pytest
import torch

from mambatrain import finetune
from mambatrain.checkpoint.convert import LoadedWeights, export, load_model
from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.models.lm import LanguageModel
from mambatrain.run import fit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 8, "mqar": {"num_kv_pairs": 4, "val_samples": 16}},
    "optimizer": {"lr": 1e-2},
    "scheduler": {"warmup_steps": 2, "kind": "constant"},
    "trainer": {"max_steps": 40, "val_every_n_steps": 1000, "log_every_n_steps": 1, "limit_val_batches": 2,
                "checkpoint_every_n_steps": 1000},
}


def recipe(root, name, **sections):
    values = {key: {**TINY.get(key, {}), **sections.get(key, {})} for key in {*TINY, *sections}}
    return load_recipe(values={**values, "logging": {"root_dir": str(root), "run_name": name}})


def first_loss(root, name) -> float:
    with open(root / name / "version_0" / "logs" / "metrics.csv") as f:
        return next(float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss"))



@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    metrics = fit(recipe(root, "pretrain"))
    return root, root / "pretrain" / "version_0" / "checkpoints" / "last.ckpt", metrics


def test_finetune_starts_at_the_checkpoint_loss(pretrained):
    root, checkpoint, _ = pretrained
    # New data (another seed), a new length and learning rate: only the weights come from the checkpoint.
    data = {"seq_len": 48, "mqar": {"num_kv_pairs": 4, "train_samples_seed": 5}}
    tuned = recipe(root, "tuned", data=data, finetune={"init_from": str(checkpoint)}, optimizer={"lr": 1e-3},
                   trainer={"max_steps": 1})
    scratch = recipe(root, "scratch", data=data, trainer={"max_steps": 1})
    fit(tuned)
    fit(scratch)
    # The checkpoint's own loss on the first batch of the new data:
    model, _ = load_model(checkpoint)
    datamodule = RecipeDataModule(tuned)
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        expected = model.loss(model(batch["input_ids"]), batch["labels"]).item()
    assert first_loss(root, "tuned") == pytest.approx(expected, abs=1e-4)
    assert first_loss(root, "tuned") < first_loss(root, "scratch") - 0.3


def test_freeze_keeps_matching_parameters(pretrained):
    root, checkpoint, _ = pretrained
    tuned = recipe(root, "frozen", finetune={"init_from": str(checkpoint), "freeze": ["embedding*", "blocks.0.*"]},
                   trainer={"max_steps": 2})
    fit(tuned)
    before = torch.load(checkpoint, weights_only=True)["state_dict"]
    after = torch.load(root / "frozen" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in before:
        frozen = name.startswith(("model.embedding", "model.blocks.0."))
        assert torch.equal(before[name], after[name]) == frozen, name


def test_init_from_an_exported_folder(pretrained, tmp_path):
    root, checkpoint, _ = pretrained
    folder = export(checkpoint, tmp_path / "export")  # a Bamba-layout folder
    model = LanguageModel(recipe(root, "x").model)
    finetune.init_from(model, recipe(root, "x", finetune={"init_from": str(folder)}))
    reference, _ = load_model(checkpoint)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_another_architecture_is_one_clear_error(pretrained):
    root, checkpoint, _ = pretrained
    other = recipe(root, "x", model={"mamba": {"version": 1, "d_state": 8}}, finetune={"init_from": str(checkpoint)})
    with pytest.raises(RecipeError, match=r"finetune.init_from: .* another architecture .*model.mamba.version is 2 "
                                          r"there but 1 here"):
        finetune.init_from(LanguageModel(other.model), other)


def test_freeze_pattern_that_matches_nothing_is_an_error(pretrained):
    root, _, _ = pretrained
    with pytest.raises(RecipeError, match=r"finetune.freeze\[1\]: 'blocks.9.\*' matches no parameter"):
        finetune.freeze(LanguageModel(recipe(root, "x").model), ["embedding*", "blocks.9.*"])


def test_init_from_must_exist(tmp_path):
    with pytest.raises(RecipeError, match="finetune.init_from: .*missing.ckpt: no such checkpoint"):
        recipe(tmp_path, "x", finetune={"init_from": str(tmp_path / "missing.ckpt")})


def test_tokenizer_that_does_not_match_is_one_clear_error(tmp_path):
    from mambatrain.data.tokenizer import train_bpe
    first = train_bpe(["aa bb cc dd"] * 8, 270, tmp_path / "first")
    second = train_bpe(["xyz xyz qqq"] * 8, 270, tmp_path / "second")
    text = {"source": "text", "text": {"tokenizer": str(second), "sources": [{"path": "train.txt"}]}}
    tuned = recipe(tmp_path, "x", data=text, model={"vocab_size": 300})
    weights = LoadedWeights(tuned.model, {}, "checkpoint run.ckpt", tokenizer=str(first))
    with pytest.raises(RecipeError, match="trained with the tokenizer .*first.* but data.text.tokenizer is .*second"):
        finetune.check_tokenizer(weights, tuned)
    finetune.check_tokenizer(LoadedWeights(tuned.model, {}, "x", tokenizer=str(second)), tuned)  # same: fine
