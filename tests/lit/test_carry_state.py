"""trainer.carry_state: consecutive steps with carried state give the outputs of one pass over each row's whole
stream (through the real data path), and `fit` with it trains and resumes exactly (carried state included)."""

import csv
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.data.datamodule import RecipeDataModule
from mambatrain.data.streaming import POSITION_KEY
from mambatrain.lit.carried import CarriedState
from mambatrain.models.lm import LanguageModel
from mambatrain.run import fit

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from corpus_helpers import write_corpus  # noqa: E402

SEQ_LEN, ROWS, STEPS = 40, 2, 6


def write_docs(folder: Path, texts) -> None:
    folder.mkdir(parents=True)
    with open(folder / "part0.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def recipe(tmp_path, version=2, **trainer):
    return load_recipe(values={
        "model": {"kind": "mamba", "d_model": 16, "n_layers": 2, "vocab_size": 260, "d_mlp": 16,
                  "mamba": {"version": version, "d_state": 4, "head_dim": 8, "chunk_size": 64}},
        "data": {"source": "text", "seq_len": SEQ_LEN, "batch_size": ROWS, "num_workers": 0,
                 "text": {"sources": [{"path": str(tmp_path / "corpus")}]}},
        "scheduler": {"warmup_steps": 2, "kind": "constant"},
        "optimizer": {"lr": 3e-3},
        "trainer": {"carry_state": True, "max_steps": 8, "checkpoint_every_n_steps": 4, "val_every_n_steps": 100,
                    "log_every_n_steps": 1, "limit_val_batches": 1, **trainer},
        "logging": {"root_dir": str(tmp_path / "runs"), "run_name": "carry"},
    })


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("corpus", ["varied", "edges"])
def test_steps_with_carried_state_equal_one_pass_over_each_row(tmp_path, version, corpus):
    if corpus == "varied":  # boundaries anywhere, documents longer than a step among them
        write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=40)
    else:  # document + EOD = 40 tokens = one step: every step edge is a document boundary
        write_docs(tmp_path / "corpus", [f"{i:02d}" + "ab" * 18 + "c" for i in range(20)])
    r = recipe(tmp_path, version)
    datamodule = RecipeDataModule(r)
    datamodule.trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1)
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append({k: v for k, v in batch.items() if k != POSITION_KEY})
        if len(batches) == STEPS:
            break
    torch.manual_seed(0)
    model = LanguageModel(r.model).double()
    carried = CarriedState()
    with torch.no_grad():
        steps = []
        for batch in batches:
            steps.append(model(batch["input_ids"], batch["seq_idx"], carried.for_batch(model, ROWS, "cpu")))
            carried.detach_()
        ids = torch.cat([b["input_ids"] for b in batches], dim=1)
        seq_idx = torch.cat([b["seq_idx"] for b in batches], dim=1)
        whole = model(ids, seq_idx)
    if corpus == "edges":
        assert all(bool((b["seq_idx"][:, 0] != a["seq_idx"][:, -1]).all()) for a, b in zip(batches, batches[1:]))
    # The carried SSM state is float32 by design, so equality holds to float32 rounding.
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-6)
    # Without the carried state the steps differ: it is doing something.
    if corpus == "varied":
        assert not torch.allclose(model(batches[1]["input_ids"], batches[1]["seq_idx"]), steps[1], atol=1e-4)


def test_activation_checkpointing_with_carried_state_keeps_gradients(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=5)
    torch.manual_seed(0)
    model = LanguageModel(recipe(tmp_path).model).double()
    tokens, seq_idx = torch.randint(0, 260, (2, 24)), torch.tensor([[0] * 10 + [1] * 14, [3] * 24], dtype=torch.int32)
    results = []
    for kinds in (set(), {"M"}):
        model.checkpoint_kinds = kinds
        states = model.empty_states(2, "cpu")
        with torch.no_grad():
            model(tokens[:, :12], seq_idx[:, :12], states)  # a first window: the state is not zero
        loss = model.loss(model(tokens[:, 12:], seq_idx[:, 12:], states), tokens[:, 12:])
        results.append((loss, torch.autograd.grad(loss, list(model.parameters())), states[0].ssm))
    (loss_a, grads_a, ssm_a), (loss_b, grads_b, ssm_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(ssm_b, ssm_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)


def train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def test_fit_with_carried_state_learns_and_resumes_exactly(tmp_path):
    # A learnable stream: each document repeats a short pattern, so the loss falls within a few steps.
    write_docs(tmp_path / "corpus", [("abcab" * (3 + i % 7))[: 10 + 7 * i % 50] for i in range(60)])
    fit(recipe(tmp_path))
    straight = tmp_path / "runs" / "carry" / "version_0"
    losses = train_losses(straight)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[7] < losses[0] - 0.5, losses
    middle = torch.load(straight / "checkpoints" / "step0000004.ckpt", weights_only=False)
    carried = middle["carried_state"][0]  # rank 0: per block, its conv tail, SSM state and last document id
    assert carried[0]["ssm"].shape == (ROWS, 4, 8, 4) and carried[0]["ssm"].abs().sum() > 0

    resumed = tmp_path / "resumed" / "carry" / "version_0"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step0000004.ckpt", resumed / "checkpoints" / "step4.ckpt")
    r = recipe(tmp_path)
    r.logging.root_dir = str(tmp_path / "resumed")
    fit(r, resume=str(resumed / "checkpoints" / "step4.ckpt"))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-6, atol=1e-7, msg=name)
    for x, y in zip(a["carried_state"][0], b["carried_state"][0]):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-6, atol=1e-7)
    resumed_losses = train_losses(resumed)
    for step in range(4, 8):
        assert abs(losses[step] - resumed_losses[step]) < 1e-6
