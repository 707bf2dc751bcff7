"""Hundreds of broken recipes, derived from the quickstart, each fail before training with one clear line naming
the key: unknown keys and typos, wrong types, zero or negative sizes, missing files, incompatible settings.

The cases are generated from the schema itself, so a new recipe key gets its typo and wrong-type cases without
anyone writing them; sizes and incompatibilities are listed by hand (keys not in the schema yet are skipped).
"""

import copy
import dataclasses
import functools
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
import torch
import yaml

from conftest import RECIPES
from mambatrain.config import load
from mambatrain.config.load import read_recipe_file
from mambatrain.config.schema import Recipe, RecipeError
from mambatrain.data.datamodule import check_data

QUICKSTART = read_recipe_file(RECIPES / "quickstart.yaml")
MISSING = "/nonexistent/mambatrain-test"

# Must be > 0 (0 and -1 each fail) / must be >= 0 (-1 fails).
POSITIVE = """model.d_model model.n_layers model.vocab_size model.mamba.d_state model.mamba.d_conv model.mamba.expand
model.mamba.head_dim model.mamba.n_groups model.mamba.chunk_size model.mamba.dt_rank model.mamba.dt_min
model.mamba.a_init_min model.attention.n_heads model.attention.n_kv_heads model.attention.sliding_window
model.attention.rope_base data.seq_len data.batch_size data.mqar.num_kv_pairs data.mqar.val_samples
data.passkey.digits data.passkey.val_samples data.selective_copy.num_tokens data.selective_copy.val_samples
data.prepared.shard_tokens optimizer.lr trainer.max_steps trainer.devices trainer.num_nodes
trainer.accumulate_grad_batches trainer.val_every_n_steps trainer.limit_val_batches trainer.log_every_n_steps
trainer.checkpoint_every_n_steps trainer.loss_chunk_size trainer.keep_last_checkpoints
trainer.max_consecutive_nonfinite trainer.sequence_window eval.documents eval.passkey_samples eval.seq_len eval.window""".split()
NON_NEGATIVE = """model.d_mlp data.num_workers data.prepared.shuffle_documents optimizer.weight_decay
scheduler.warmup_steps trainer.gradient_clip eval.every_n_steps""".split()

TEXT_FILE = Path(tempfile.mkdtemp()) / "train.txt"
TEXT_FILE.write_text("a document\nanother document\n")
TEXT = {"source": "text", "text": {"sources": [{"path": str(TEXT_FILE)}]}}
# (what is wrong, key the error must name, changes to the quickstart as {dotted key: value}).
INCOMPATIBLE = [
    ("pattern of the wrong length", "model.pattern", {"model.pattern": "MMA"}),
    ("pattern with another letter", "model.pattern", {"model.pattern": "MMXA"}),
    ("pattern and ratio disagree", "model.attention_ratio", {"model.attention_ratio": 0.25}),
    ("hybrid without a layout", "model.pattern", {"model.pattern": None}),
    ("ratio of 0", "model.attention_ratio", {"model.pattern": None, "model.attention_ratio": 0.0}),
    ("ratio of 1", "model.attention_ratio", {"model.pattern": None, "model.attention_ratio": 1.0}),
    ("ratio rounding to no attention", "model.attention_ratio", {"model.pattern": None, "model.attention_ratio": 0.1}),
    ("ratio for a pure model", "model.attention_ratio", {"model.kind": "mamba", "model.pattern": None,
                                                         "model.attention_ratio": 0.5}),
    ("mixed pattern for a pure mamba", "model.pattern", {"model.kind": "mamba"}),
    ("mixed pattern for a transformer", "model.pattern", {"model.kind": "transformer"}),
    ("heads not dividing d_model", "model.attention.n_heads", {"model.attention.n_heads": 3}),
    ("heads not dividing d_model (6 into 64)", "model.attention.n_heads", {"model.attention.n_heads": 6}),
    ("odd RoPE head size", "model.attention.n_heads",
     {"model.attention.n_heads": 64, "model.attention.n_kv_heads": 64}),
    ("kv heads not dividing heads", "model.attention.n_kv_heads", {"model.attention.n_kv_heads": 3}),
    ("kv heads above heads", "model.attention.n_kv_heads", {"model.attention.n_kv_heads": 8}),
    ("head_dim not dividing the inner width", "model.mamba.head_dim", {"model.mamba.head_dim": 24}),
    ("groups not dividing the heads", "model.mamba.n_groups", {"model.mamba.n_groups": 3}),
    ("chunk not a power of two", "model.mamba.chunk_size", {"model.mamba.chunk_size": 96}),
    ("chunk too large", "model.mamba.chunk_size", {"model.mamba.chunk_size": 512}),
    ("Mamba-2 state above the SSD kernel's 256", "model.mamba.d_state", {"model.mamba.d_state": 512}),
    ("Mamba version given as a boolean", "model.mamba.version", {"model.mamba.version": True}),
    ("dt_min above dt_max", "model.mamba.dt_min", {"model.mamba.dt_min": 0.5, "model.mamba.dt_max": 0.1}),
    ("a_init_min above a_init_max", "model.mamba.a_init_min", {"model.mamba.a_init_min": 20.0}),
    ("sequence too short for the mqar pairs", "data.seq_len", {"data.seq_len": 8}),
    ("vocabulary too small for the mqar pairs", "model.vocab_size", {"model.vocab_size": 4}),
    ("sequence too short for the passkey", "data.seq_len", {"data.source": "passkey", "data.seq_len": 12}),
    ("vocabulary too small for the passkey", "model.vocab_size", {"data.source": "passkey", "model.vocab_size": 12}),
    ("markov graph as wide as the vocabulary", "data.markov.branches",
     {"data.source": "markov", "data.markov.branches": 64, "model.vocab_size": 64}),
    ("sequence too short to copy", "data.seq_len", {"data.source": "selective_copy", "data.seq_len": 20}),
    ("passkey depth above 1", "data.passkey.depth", {"data.passkey.depth": 1.5}),
    ("text without sources", "data.text.sources", {"data.source": "text", "model.vocab_size": 300}),
    ("text validation without sources", "data.text.sources", {"data.val_source": "text", "model.vocab_size": 300}),
    ("byte tokenizer over a small vocabulary", "model.vocab_size", {"data": TEXT}),
    ("prepared without a folder", "data.prepared.path", {"data.source": "prepared"}),
    ("source without a path", "data.text.sources[0].path", {"data": {**TEXT, "text": {"sources": [{"path": ""}]}},
                                                           "model.vocab_size": 300}),
    ("source of weight 0", "data.text.sources[0].weight",
     {"data": {**TEXT, "text": {"sources": [{"path": "a.txt", "weight": 0}]}}, "model.vocab_size": 300}),
    # Wrong types inside a list of sections (the generated cases change keys outside lists only).
    ("source weight that is not a number", "data.text.sources[0].weight",
     {"data": {**TEXT, "text": {"sources": [{"path": "a.txt", "weight": "high"}]}}, "model.vocab_size": 300}),
    ("hub configuration read as a boolean (name: no)", "data.text.sources[0].name",
     {"data": {**TEXT, "text": {"sources": [{"path": "a.txt", "name": False}]}}, "model.vocab_size": 300}),
    ("empty tokenizer name", "data.text.tokenizer", {"data.text.tokenizer": ""}),
    ("min_lr_ratio above 1", "scheduler.min_lr_ratio", {"scheduler.min_lr_ratio": 1.5}),
    ("beta1 of 1", "optimizer.beta1", {"optimizer.beta1": 1.0}),
    ("beta2 above 1", "optimizer.beta2", {"optimizer.beta2": 1.5}),
    ("several devices without a strategy", "trainer.strategy", {"trainer.devices": 2}),
    ("unknown block kind to recompute", "trainer.activation_checkpointing", {"trainer.activation_checkpointing": "X"}),
    ("run name with a slash", "logging.run_name", {"logging.run_name": "a/b"}),
    ("empty run name", "logging.run_name", {"logging.run_name": ""}),
    ("passkey depth outside [0, 1]", "eval.passkey_depths", {"eval.passkey_depths": [0.5, 2.0]}),
    ("no passkey depth", "eval.passkey_depths", {"eval.passkey_depths": []}),
    ("empty freeze pattern", "finetune.freeze[0]", {"finetune.freeze": [""]}),
    ("carried state over independent synthetic samples", "trainer.carry_state", {"trainer.carry_state": True}),
    ("carried state with sequence windows", "trainer.carry_state",
     {"trainer.carry_state": True, "trainer.sequence_window": 32}),
    ("carried state with context parallelism", "trainer.carry_state",
     {"trainer.carry_state": True, "trainer.context_parallel": 2, "trainer.devices": 2, "trainer.strategy": "ddp"}),
    ("carried state split over workers", "trainer.carry_state",
     {"trainer.carry_state": True, "data": {**TEXT, "num_workers": 2}, "model.vocab_size": 300}),
    ("CUDA graphs over two devices", "trainer.cuda_graph",
     {"trainer.cuda_graph": True, "trainer.devices": 2, "trainer.strategy": "ddp"}),
    ("CUDA graphs with context parallelism", "trainer.cuda_graph",
     {"trainer.cuda_graph": True, "trainer.context_parallel": 2, "trainer.devices": 2, "trainer.strategy": "ddp"}),
    ("carried state without a Mamba layer", "trainer.carry_state",
     {"trainer.carry_state": True, "data": TEXT, "model.kind": "transformer", "model.pattern": None,
      "model.vocab_size": 300}),
    # Missing files: found by the checks that run before any model is built.
    ("missing text file", "data.text.sources[0].path",
     {"data": {**TEXT, "text": {"sources": [{"path": f"{MISSING}/train.jsonl"}]}}, "model.vocab_size": 300}),
    ("missing validation text", "data.text.val_sources[0].path",
     {"data": {**TEXT, "text": {**TEXT["text"], "val_sources": [{"path": f"{MISSING}/val.txt"}]}},
      "model.vocab_size": 300}),
    ("missing tokenizer", "data.text.tokenizer",
     {"data": {**TEXT, "text": {**TEXT["text"], "tokenizer": f"{MISSING}/tokenizer.json"}}, "model.vocab_size": 300}),
    ("missing prepared shards", "data.prepared.path", {"data.source": "prepared", "data.prepared.path": MISSING}),
    ("missing weights to start from", "finetune.init_from", {"finetune.init_from": f"{MISSING}/model.ckpt"}),
]



def _leaves(schema, prefix=""):
    """(dotted key, type) of every recipe key, and (dotted key, dataclass) of every section, depth first."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        section = load._nested_dataclass(hint)
        if section is not None and typing.get_origin(hint) is not list:
            yield key, section
            yield from _leaves(section, f"{key}.")
        else:
            yield key, hint


def _wrong_values(hint) -> list:
    """Values of the wrong type for ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return [3, "section"]
    if hint is bool:
        return ["maybe", 2]
    if hint is int:
        return ["lots", 2.5]
    if hint is float:
        return ["fast"]
    if hint is str:
        return [[1, 2], {"a": 1}]
    if origin is typing.Literal:
        return ["nonsense"]
    if origin is list:
        return ["not-a-list"] + ([[{"no_such_key": 1}]] if dataclasses.is_dataclass(args[0]) else [["x", "y"]]
                                 if args[0] in (int, float) else [])
    if origin is typing.Union:
        inner = next(a for a in args if a is not type(None))
        return [v for v in _wrong_values(inner) if not isinstance(v, (int, float)) or inner is bool][:1]
    return []


def _typo(name: str) -> str:
    return name[:-2] + name[-1] + name[-2] if name[-1] != name[-2] else name + "x"


def _exists(key: str) -> bool:
    return key in dict(_leaves(Recipe))


def _cases():
    for key, hint in _leaves(Recipe):
        parent, _, name = key.rpartition(".")
        typo = f"{parent}.{_typo(name)}" if parent else _typo(name)
        yield f"typo {typo}", typo, {typo: 1}
        for value in _wrong_values(hint):
            yield f"{key}={value!r}", key, {key: value}
        if dataclasses.is_dataclass(hint):
            yield f"unknown key in {key}", f"{key}.no_such_key", {f"{key}.no_such_key": 1}
    yield "unknown section", "no_such_section", {"no_such_section": {}}
    hints = dict(_leaves(Recipe))
    for key in POSITIVE + NON_NEGATIVE:
        if key in hints:
            nullable = typing.get_origin(hints[key]) is typing.Union
            for value in ([0, -1] if key in POSITIVE else [-1]) + ([] if nullable else [None]):
                yield f"{key}={value}", key, {key: value}
    for key in ("model", "data"):
        yield f"missing section {key}", key, {key: None}
    for what, key, changes in INCOMPATIBLE:
        if all(_exists(k.split("[")[0]) or k in ("data", "model") for k in changes):
            yield what, key, changes


CASES = list(_cases())


def _recipe(changes: dict) -> dict:
    raw = copy.deepcopy(QUICKSTART)
    for dotted, value in copy.deepcopy(changes).items():  # loading may rewrite nested lists in place
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None and leaf in ("model", "data") and not parents:
            del node[leaf]
        elif isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **value}
        else:
            node[leaf] = value
    return raw


@pytest.fixture(scope="module", autouse=True)
def one_parser():
    # Building the jsonargparse parser is 9/10 of a load; one parser serves every case (it keeps no state).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(load, "recipe_parser", functools.lru_cache(load.recipe_parser))
        yield


def test_there_are_hundreds_of_cases():
    assert len(CASES) >= 200
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,key,changes", CASES, ids=[case[0] for case in CASES])
def test_broken_recipe_fails_with_one_line_naming_the_key(name, key, changes):
    with pytest.raises(RecipeError) as error:
        recipe = load.load_recipe(values=_recipe(changes))
        check_data(recipe)  # files, tokenizer, shards: what the datamodule checks before the model is built
    message = str(error.value)
    assert message.startswith(f"{key}: ") or message.startswith(f"{key}[") or message.startswith(f"{key}."), message
    assert "\n" not in message
    for internal in ("Traceback", "NoneType", "<class", "class_path", "Union"):
        assert internal not in message, message


CLI_CASES = ["typo model.d_modle", "heads not dividing d_model",
             "trainer.keep_last_checkpoints=0", "model.tie_embeddings='maybe'", "trainer.max_steps=None",
             "missing text file"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_broken_recipe_through_the_command_line(tmp_path, name):
    _, key, changes = next(case for case in CASES if case[0] == name)
    recipe = tmp_path / "broken.yaml"
    raw = _recipe(changes)
    raw["logging"] = {**raw.get("logging", {}), "root_dir": str(tmp_path / "runs")}
    recipe.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "mambatrain", "fit", str(recipe)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"recipe error: {key}"), result.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/*"))  # nothing was trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("key,changes", [
    ("trainer.accelerator", {"trainer.accelerator": "gpu"}),
    ("trainer.strategy", {"trainer.strategy": "fsdp", "trainer.devices": 2}),
], ids=["accelerator gpu", "fsdp with accelerator auto"])
def test_gpu_settings_on_a_machine_without_one_fail_before_the_run_starts(tmp_path, key, changes):
    # Lightning would refuse them only after the data and model were built, with a traceback.
    from mambatrain.run import fit
    recipe = load.load_recipe(values=_recipe({**changes, "logging.root_dir": str(tmp_path)}))
    with pytest.raises(RecipeError, match=f"^{key}: .*no CUDA device"):
        fit(recipe)
    assert not list(tmp_path.iterdir())  # not even a run directory


def test_more_devices_than_visible_gpus_fail_before_the_run_starts(tmp_path, monkeypatch):
    from mambatrain.run import fit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    recipe = load.load_recipe(values=_recipe({"trainer.devices": 2, "trainer.strategy": "ddp",
                                              "logging.root_dir": str(tmp_path)}))
    with pytest.raises(RecipeError, match=r"^trainer.devices: 2, but torch sees 1 GPU\(s\)"):
        fit(recipe)
    assert not list(tmp_path.iterdir())


def test_a_recipe_the_data_refuses_leaves_no_run_folder(tmp_path):
    """Some checks need the data itself (here: the text column), so they fail after the run folder was made."""
    from mambatrain.run import fit
    (tmp_path / "train.jsonl").write_text('{"body": "hello world"}\n{"body": "more text"}\n')
    recipe = load.load_recipe(values=_recipe({
        "data": {**TEXT, "text": {"sources": [{"path": str(tmp_path / "train.jsonl")}]}}, "model.vocab_size": 300,
        "logging.root_dir": str(tmp_path / "runs")}))
    with pytest.raises(RecipeError, match="^data.text.sources.0..text_field: no column 'text'"):
        fit(recipe)
    assert not list((tmp_path / "runs").glob("*/*"))
