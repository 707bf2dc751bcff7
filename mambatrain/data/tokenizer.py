"""Text -> token ids: a byte-level tokenizer that needs no training, or a Hugging Face ``tokenizer.json``.

Both append nothing themselves; the packer adds the end-of-document id after each
document. ``train_bpe`` trains a byte-level BPE on a stream of texts and writes a
folder that ``transformers.AutoTokenizer.from_pretrained`` can load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config.schema import BYTE_TOKENIZER_VOCAB, RecipeError

EOD_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 is end-of-document."""

    name = "byte"
    vocab_size = BYTE_TOKENIZER_VOCAB
    eod_id = 256

    def encode(self, text: str) -> np.ndarray:
        # Lone surrogates (possible in JSON strings) cannot be UTF-8: they become U+FFFD rather than stop a run.
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer read from tokenizer.json; special tokens are never parsed out of document text."""

    def __init__(self, path: Path, eod_token: str):
        from tokenizers import Tokenizer

        self.name = str(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise RecipeError(f"data.text.tokenizer: {path} is not a readable tokenizer.json ({error})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        eod_id = self.tokenizer.token_to_id(eod_token)
        if eod_id is None:
            raise RecipeError(f"data.text.eod_token: {eod_token!r} is not in the vocabulary of {path}; "
                              f"name the tokenizer's end-of-document token")
        self.eod_id = eod_id
        # A document that contains the text "<|endoftext|>" must not end itself early: specials stay plain text.
        self.tokenizer.encode_special_tokens = True

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # One call per batch of documents: about 30% faster than document by document (no offsets kept).
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_file(spec: str) -> Path:
    """The tokenizer.json that ``data.text.tokenizer`` names (a file, or a folder holding one)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise RecipeError(f"data.text.tokenizer: {path} not found; use byte, a tokenizer.json, or train one "
                          f"with `mambatrain tokenizer train RECIPE`")
    return path


def load_tokenizer(spec: str, eod_token: str = EOD_TOKEN) -> ByteTokenizer | HFTokenizer:
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(tokenizer_file(spec), eod_token)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Every id the tokenizer can emit must have an embedding row."""
    if tokenizer.vocab_size > model_vocab_size:
        raise RecipeError(f"model.vocab_size: the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size is {model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, eod_token: str = EOD_TOKEN,
              model_max_length: int = 1 << 20) -> Path:
    """Train a byte-level BPE (GPT-2 style, lossless on any UTF-8) and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + 1:
        raise RecipeError(f"--vocab-size: a byte-level BPE needs at least 257 ids (256 bytes + {eod_token}), "
                          f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    # What transformers' AutoTokenizer needs to load the folder as a fast tokenizer.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod_token, "eos_token": eod_token,
              "unk_token": None, "pad_token": eod_token, "add_prefix_space": False,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": eod_token, "eos_token": eod_token, "pad_token": eod_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out / "tokenizer.json"


def tokenizer_output(spec: str, out: str | None) -> Path:
    """Where `tokenizer train` writes: --out, else the folder data.text.tokenizer names."""
    if out:
        return Path(out).expanduser()
    if spec == "byte":
        raise RecipeError("data.text.tokenizer: is byte, so there is no folder to write a trained tokenizer to; "
                          "set it to e.g. tokenizers/mine (the folder to create) or pass --out")
    path = Path(spec).expanduser()
    return path.parent if path.suffix == ".json" else path


def train_tokenizer(recipe, out: str | None = None, vocab_size: int | None = None,
                    max_documents: int | None = None) -> Path:
    """Train a byte-level BPE of vocab_size (default model.vocab_size) on one pass over data.text.sources."""
    from .sources import DocumentStream

    text = recipe.data.text
    if not text.sources:
        raise RecipeError("data.text.sources: `tokenizer train` reads data.text.sources; none are given")
    folder = tokenizer_output(text.tokenizer, out)
    docs = DocumentStream(text.sources, "data.text.sources", slot=0, n_slots=1, seed=text.seed, cycle=False,
                          shuffle_files=text.shuffle_files)
    if max_documents is not None:
        docs = (doc for _, doc in zip(range(max_documents), docs))
    return train_bpe(docs, vocab_size or recipe.model.vocab_size, folder, text.eod_token)
