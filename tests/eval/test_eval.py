"""Long-context evaluation: windows with carried state change nothing, prompts are built right, files appear."""

import json

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.data.tokenizer import ByteTokenizer
from mambatrain.eval.documents import long_documents
from mambatrain.eval.passkey import NEEDLE, QUESTION, text_prompt
from mambatrain.eval.suite import evaluate, summary, token_losses
from mambatrain.models.lm import LanguageModel
from mambatrain.models.loss import IGNORE_INDEX
from mambatrain.run import fit

MODEL = {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
         "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}}


def tiny_recipe(tmp_path, **sections):
    values = {"model": MODEL, "data": {"seq_len": 32, "batch_size": 4, "mqar": {"num_kv_pairs": 4, "val_samples": 8}},
              "eval": {"seq_len": 96, "documents": 3, "passkey_lengths": [12, 40], "passkey_depths": [0.0, 1.0],
                       "passkey_samples": 2},
              "logging": {"root_dir": str(tmp_path), "run_name": "tiny"}}
    return load_recipe(values={**values, **sections})


def test_windows_with_carried_state_give_the_same_losses(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(tiny_recipe(tmp_path).model).eval()
    ids = torch.randint(0, 32, (2, 70))
    labels = ids.roll(-1, dims=1)
    labels[:, :5] = IGNORE_INDEX
    whole, whole_correct = token_losses(model, ids, labels)
    windowed, windowed_correct = token_losses(model, ids, labels, window=16)
    assert whole[:, :5].isnan().all() and not whole[:, 5:].isnan().any()
    torch.testing.assert_close(windowed, whole, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(windowed_correct, whole_correct)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_text_passkey_prompt(depth):
    tokenizer = ByteTokenizer()
    prompt = text_prompt(tokenizer, 300, depth, "52817")
    ids, labels = prompt["input_ids"], prompt["labels"]
    assert ids.shape == labels.shape == (300,)
    text = tokenizer.decode(ids.tolist())
    assert text.endswith(QUESTION + " 5281")  # the last digit is only a label
    needle = NEEDLE.format(key="52817")
    at = text.index(needle)
    room = 300 + 1 - len(needle) - len(QUESTION) - len(" 52817")
    assert at == round(depth * room)
    scored = labels != IGNORE_INDEX
    assert tokenizer.decode(labels[scored].tolist()) == " 52817"
    assert text_prompt(tokenizer, 40, depth, "52817") is None  # too short to hold it


def test_long_documents_from_text_start_at_the_document_start(tmp_path):
    docs = ["short", "a" * 50 + "b" * 100, "c" * 20, "d" * 200]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = {"source": "text", "seq_len": 32, "text": {"sources": [{"path": str(tmp_path / "val.jsonl")}]}}
    recipe = tiny_recipe(tmp_path, data=data, model={**MODEL, "vocab_size": 257})
    found = long_documents(recipe, 100, 5)
    ids, labels = found["input_ids"], found["labels"]
    assert ids.shape == (2, 100)
    assert bytes(ids[0].tolist()) == b"a" * 50 + b"b" * 50 and bytes(ids[1].tolist()) == b"d" * 100
    assert torch.equal(labels[:, :-1], ids[:, 1:])


def test_evaluate_writes_json_and_plots(tmp_path):
    recipe = tiny_recipe(tmp_path)
    torch.manual_seed(0)
    results = evaluate(LanguageModel(recipe.model), recipe, None, tmp_path / "out", step=3)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["step"] == 3 and written["loss_by_position"]["seq_len"] == 96
    assert [b["first"] for b in written["loss_by_position"]["bins"]] == [1, 2, 4, 8, 16, 32, 64]
    # 12 tokens cannot hold a 5-digit synthetic passkey; 40 can.
    assert [row[0] for row in written["passkey"]["accuracy"]] == [None, None]
    assert all(0 <= row[1] <= 1 for row in written["passkey"]["accuracy"])
    assert {"eval/loss_last_bin", "eval/passkey_accuracy"} <= summary(results).keys()
    assert (tmp_path / "out" / "loss_by_position.png").stat().st_size > 1000
    assert (tmp_path / "out" / "passkey.png").stat().st_size > 1000


def test_eval_during_training(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = tiny_recipe(tmp_path, trainer={"max_steps": 4, "val_every_n_steps": 100, "limit_val_batches": 1,
                                                "log_every_n_steps": 1, "checkpoint_every_n_steps": 100},
                             eval={"every_n_steps": 2, "seq_len": 64, "documents": 2, "passkey_lengths": [32],
                                   "passkey_samples": 1})
        fit(recipe)
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "tiny" / "version_0"
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step0000002", "step0000004"]
    assert "eval/passkey_accuracy" in (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]


def test_eval_command(tmp_path, capsys):
    import dataclasses

    import yaml

    from mambatrain.cli import main
    from mambatrain.config.load import recipe_to_dict
    recipe = tiny_recipe(tmp_path)
    torch.manual_seed(0)
    model = LanguageModel(recipe.model)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "hyper_parameters": {"recipe": recipe_to_dict(recipe)}}, checkpoints / "last.ckpt")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": MODEL, "data": dataclasses.asdict(recipe.data)}))
    assert main(["eval", str(checkpoints / "last.ckpt"), str(tmp_path / "recipe.yaml"), "--eval.seq_len", "40",
                 "--eval.passkey_lengths", "[20]", "--eval.passkey_samples", "1"]) == 0
    assert "eval/passkey_accuracy" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "eval" / "last" / "results.json").read_text())
    assert results["loss_by_position"]["seq_len"] == 40 and results["passkey"]["lengths"] == [20]
