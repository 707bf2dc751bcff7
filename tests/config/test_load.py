"""Recipes become validated dataclasses; every bad value fails with one line naming its key."""

import pytest
import yaml

from mambatrain.config.load import load_recipe, recipe_to_yaml
from mambatrain.config.schema import RecipeError, pattern_from_ratio

MINIMAL = {"model": {"kind": "hybrid", "d_model": 64, "n_layers": 4, "vocab_size": 64, "pattern": "MAMM",
                     "mamba": {"head_dim": 16, "d_state": 16}, "attention": {"n_heads": 4}},
           "data": {"seq_len": 64}}


def write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fails(tmp_path, recipe: dict, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, recipe), overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_minimal_recipe_fills_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.model.pattern == "MAMM"
    assert recipe.trainer.max_steps == 1000
    assert recipe.model.mamba.dt_rank == 4  # derived: ceil(64 / 16)
    assert recipe.model.attention.n_kv_heads == 4  # derived: n_heads


def test_unknown_key_names_it_and_lists_allowed(tmp_path):
    recipe = {**MINIMAL, "model": {**MINIMAL["model"], "d_modle": 64}}
    message = fails(tmp_path, recipe)
    assert message.startswith("model.d_modle: unknown key")
    assert "did you mean model.d_model" in message and "n_layers" in message


def test_unknown_section(tmp_path):
    assert fails(tmp_path, {**MINIMAL, "optimiser": {"lr": 1}}).startswith("optimiser: unknown key")


def test_wrong_type_names_key_and_type(tmp_path):
    recipe = {**MINIMAL, "data": {"seq_len": "long"}}
    message = fails(tmp_path, recipe)
    assert message.startswith("data.seq_len:") and "int" in message


def test_wrong_choice_lists_choices(tmp_path):
    message = fails(tmp_path, {**MINIMAL, "model": {**MINIMAL["model"], "kind": "rnn"}})
    assert message.startswith("model.kind:") and "mamba, transformer, hybrid" in message


@pytest.mark.parametrize("section", ["model", "data"])
def test_missing_section(tmp_path, section):
    recipe = {k: v for k, v in MINIMAL.items() if k != section}
    assert fails(tmp_path, recipe).startswith(f"{section}: missing section")


def test_d_model_not_divisible_by_heads(tmp_path):
    recipe = {**MINIMAL, "model": {**MINIMAL["model"], "attention": {"n_heads": 5}}}
    message = fails(tmp_path, recipe)
    assert message.startswith("model.attention.n_heads:") and "not divisible" in message


def test_negative_size(tmp_path):
    assert fails(tmp_path, MINIMAL, ["--trainer.max_steps", "0"]).startswith("trainer.max_steps: must be positive")


@pytest.mark.parametrize("window", ["0", "-4096"])
def test_sequence_window_must_be_positive(tmp_path, window):
    message = fails(tmp_path, MINIMAL, ["--trainer.sequence_window", window])
    assert message.startswith("trainer.sequence_window: must be positive"), message


def test_sequence_window_loads(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL), ["--trainer.sequence_window", "4096"]).trainer.sequence_window == 4096


def test_pattern_length_must_match_layers(tmp_path):
    message = fails(tmp_path, {**MINIMAL, "model": {**MINIMAL["model"], "pattern": "MAM"}})
    assert message.startswith("model.pattern:") and "n_layers is 4" in message


def test_hybrid_needs_pattern_or_ratio(tmp_path):
    model = {k: v for k, v in MINIMAL["model"].items() if k != "pattern"}
    assert fails(tmp_path, {**MINIMAL, "model": model}).startswith("model.pattern:")


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("no/such/recipe.yaml")


def test_overrides_dotted_and_equals(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["--trainer.max_steps", "10", "--model.d_mlp=32"])
    assert recipe.trainer.max_steps == 10 and recipe.model.d_mlp == 32


def test_ratio_resolves_to_pattern_in_printed_recipe(tmp_path):
    model = {k: v for k, v in MINIMAL["model"].items() if k != "pattern"}
    model.update(n_layers=10, attention_ratio=0.3)
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "model": model}))
    assert recipe.model.pattern == "MAMMMAMMAM"
    printed = yaml.safe_load(recipe_to_yaml(recipe))
    assert printed["model"]["pattern"] == "MAMMMAMMAM"
    # The printed recipe loads back to the same model.
    assert load_recipe(write(tmp_path, printed)).model == recipe.model


@pytest.mark.parametrize("n_layers,ratio", [(10, 0.3), (24, 0.3), (12, 0.25), (8, 0.5), (48, 0.1)])
def test_ratio_placement_is_even_and_exact(n_layers, ratio):
    pattern = pattern_from_ratio(n_layers, ratio)
    assert len(pattern) == n_layers and pattern.count("A") == round(ratio * n_layers)
    assert pattern[0] == "M"
    slots = [k for k, letter in enumerate(pattern) if letter == "A"]
    gaps = [later - earlier for earlier, later in zip(slots, slots[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_override_that_is_not_yaml_is_text(tmp_path):
    # "@night" cannot start a YAML value: it is the string the user typed, not a traceback.
    assert load_recipe(write(tmp_path, MINIMAL), ["--logging.run_name", "@night"]).logging.run_name == "@night"
    message = fails(tmp_path, MINIMAL, ["--eval.passkey_lengths", "[256, 1024"])
    assert message.startswith("eval.passkey_lengths: expected list"), message


def test_numbers_read_as_yaml_1_2(tmp_path):
    """PyYAML speaks YAML 1.1, where 010 is octal 8 and 1e-3 is text: recipes read numbers as YAML 1.2 does."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {kind: mamba, d_model: 64, n_layers: 2, vocab_size: 64, mamba: {head_dim: 16}}\n"
                    "data: {seq_len: 064}\noptimizer: {lr: 1e-3, weight_decay: 1E-1}\ntrainer: {max_steps: 010}\n")
    recipe = load_recipe(path, ["--trainer.log_every_n_steps", "08", "--trainer.seed", "0x10"])
    assert (recipe.data.seq_len, recipe.trainer.max_steps) == (64, 10)
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay) == (1e-3, 0.1)
    assert (recipe.trainer.log_every_n_steps, recipe.trainer.seed) == (8, 16)
    # sexagesimal 1:30 (YAML 1.1: the int 90) stays the text typed
    assert load_recipe(path, ["--logging.run_name", "1:30"]).logging.run_name == "1:30"


@pytest.mark.parametrize("text,message", [
    # PyYAML keeps the last of two equal keys: a second trainer: section would silently drop the first one's keys.
    ("model: {kind: mamba}\ndata: {}\ntrainer:\n  max_steps: 10\ntrainer:\n  seed: 7\n",
     "trainer is given twice (lines 3 and 5); YAML would keep only the last, so merge them"),
    ("model:\n  d_model: 64\n  d_model: 128\ndata: {}\n",
     "model.d_model is given twice (lines 2 and 3); YAML would keep only the last, so merge them"),
], ids=["section", "key in a section"])
def test_duplicate_key_fails_instead_of_replacing_the_first(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("key,value,expected", [
    ("trainer.sequence_window", 1.5, "trainer.sequence_window: expected int or null; got 1.5"),
    ("data.val_source", "txt", "data.val_source: expected one of mqar, passkey, selective_copy, markov, text, "
                               "prepared, null; got txt"),
])
def test_wrong_type_of_a_nullable_key_says_what_is_expected(tmp_path, key, value, expected):
    section, name = key.split(".")
    assert fails(tmp_path, {**MINIMAL, section: {**MINIMAL.get(section, {}), name: value}}) == expected


def test_yaml_boolean_for_a_text_key_says_to_quote_it(tmp_path):
    # YAML 1.1 reads an unquoted no, off or 2024 as a boolean or a number, not as the text a str key wants.
    message = fails(tmp_path, {**MINIMAL, "logging": {"run_name": False}})
    assert message == "logging.run_name: expected str; got False (YAML reads unquoted yes/no/on/off/true/false as " \
                      "booleans and numbers as numbers: quote the value)", message
