"""Tokenizers: the byte tokenizer and a trained byte-level BPE both round-trip any text."""

import json
import subprocess
import sys

import pytest

from mambatrain.config.schema import RecipeError
from mambatrain.data.tokenizer import ByteTokenizer, check_vocab, load_tokenizer

from corpus_helpers import write_corpus

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines", "café naïve 日本語 🚀", "<|endoftext|> as text"]


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eod_id == 256


def test_tokenizer_train_command_writes_a_loadable_round_tripping_tokenizer(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=50)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{kind: mamba, vocab_size: 400}}\n"
                      f"data: {{source: text, text: {{sources: [{{path: {tmp_path / 'corpus'}}}], "
                      f"tokenizer: {tmp_path / 'tok'}}}}}\n")
    result = subprocess.run([sys.executable, "-m", "mambatrain", "tokenizer", "train", str(recipe),
                             "--vocab-size", "300"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<|endoftext|>"
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 300
    for text in TEXTS + ["doc17:éé" + "x" * 40]:
        ids = tok.encode(text)
        assert tok.eod_id not in ids.tolist()  # the special token's text stays text
        assert tok.decode(ids) == text
    assert len(tok.encode("doc17:" + "x" * 40)) < 20  # merges learned from the corpus


def test_vocabulary_larger_than_the_model_is_a_recipe_error():
    with pytest.raises(RecipeError, match="model.vocab_size: the tokenizer byte has 257 tokens .* >= 257"):
        check_vocab(ByteTokenizer(), 256)
