"""Prepared shards: documents tokenized once into memory-mapped token files, then streamed at memory speed.

Layout of ``data.prepared.path``::

    index.json                 format, dtype, vocab_size, eod_id, tokenizer, splits -> shards and counts
    train/tokens-00000.bin     the tokens, raw uint16 (vocab <= 65536) or uint32, documents each closed by EOD
    train/docs-00000.npy       int64 (n_docs,): the end offset of each document in that shard
    val/...                    the same for data.text.val_sources (if any)

A split is one token space (its shards back to back). Slot s of n (one per rank and
dataloader worker) reads the documents in [s/n, (s+1)/n) of the split's tokens,
snapped to document starts, in order, epoch after epoch; its position is (epoch,
token offset). Shuffling happens once, when preparing: file order and a buffer of
documents.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..config.schema import Recipe, RecipeError
from .packing import window_sample
from .sources import DataError, DocumentStream, check_held_out
from .tokenizer import check_vocab, load_tokenizer

log = logging.getLogger("mambatrain")

FORMAT = 1
INDEX = "index.json"
FLUSH_TOKENS = 1 << 24


# ------------------------------------------------------------------------------------------------ writing

class _SplitWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._ends: list[int] = []
        self._shard_tokens = 0
        self._file = None

    def _open_shard(self) -> None:
        i = len(self.shards)
        self.shards.append({"tokens": f"{self.split}/tokens-{i:05d}.bin", "docs": f"{self.split}/docs-{i:05d}.npy",
                            "n_tokens": 0, "n_docs": 0})
        self._file = open(self.root / self.shards[-1]["tokens"], "wb")
        self._ends, self._shard_tokens = [], 0

    def add(self, tokens: np.ndarray) -> None:
        # A document is never cut between shards, so a shard may run over shard_tokens by one document.
        if self._file is None or self._shard_tokens >= self.shard_tokens:
            self._close_shard()
            self._open_shard()
        self._buffer.append(tokens.astype(self.dtype, copy=False))
        self._buffered += len(tokens)
        self._shard_tokens += len(tokens)
        self._ends.append(self._shard_tokens)
        if self._buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).tofile(self._file)
        self._buffer, self._buffered = [], 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._flush()
        self._file.close()
        self._file = None
        np.save(self.root / self.shards[-1]["docs"], np.asarray(self._ends, dtype=np.int64))
        self.shards[-1].update(n_tokens=self._shard_tokens, n_docs=len(self._ends))

    def close(self) -> dict:
        self._close_shard()
        return {"shards": self.shards, "n_tokens": sum(s["n_tokens"] for s in self.shards),
                "n_docs": sum(s["n_docs"] for s in self.shards)}


def _shuffled(docs, buffer_size: int, seed: int):
    """Documents in a seeded random order within a window of buffer_size (bounded memory)."""
    if buffer_size <= 1:
        yield from docs
        return
    rng = np.random.default_rng(seed)
    buffer: list = []
    for doc in docs:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], doc = doc, buffer[i]
        yield doc
    rng.shuffle(buffer)
    yield from buffer


def prepare(recipe: Recipe, out: Optional[str] = None) -> Path:
    """Tokenize data.text's sources (and val_sources) once into shards under ``out`` (default data.prepared.path).

    Every document of every source is written once (weights only set the interleaving order).
    """
    text, prepared = recipe.data.text, recipe.data.prepared
    root = Path(out or prepared.path).expanduser()
    if not str(root) or str(root) == ".":
        raise RecipeError("data.prepared.path: name the folder to write the shards to (or pass --out)")
    if not text.sources:
        raise RecipeError("data.text.sources: `data prepare` reads data.text.sources; none are given")
    check_held_out(text.sources, text.val_sources)
    tokenizer = load_tokenizer(text.tokenizer, text.eod_token)
    check_vocab(tokenizer, recipe.model.vocab_size)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, sources, key in (("train", text.sources, "data.text.sources"),
                                ("val", text.val_sources, "data.text.val_sources")):
        if not sources:
            continue
        start = time.perf_counter()
        writer = _SplitWriter(root, split, dtype, prepared.shard_tokens)
        docs = DocumentStream(sources, key, slot=0, n_slots=1, seed=text.seed, cycle=False,
                              shuffle_files=text.shuffle_files)
        eod = np.array([tokenizer.eod_id], dtype=np.int32)
        for doc in _shuffled(docs, prepared.shuffle_documents, text.seed):
            writer.add(np.concatenate([tokenizer.encode(doc), eod]))
        splits[split] = writer.close()
        seconds = time.perf_counter() - start
        log.info("%s: %d documents, %d tokens in %d shards (%.0f tokens/s)", split, splits[split]["n_docs"],
                 splits[split]["n_tokens"], len(splits[split]["shards"]), splits[split]["n_tokens"] / seconds)
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
             "tokenizer": tokenizer.name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "sources": [s.path for s in text.sources], "splits": splits}
    (root / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return root


# ------------------------------------------------------------------------------------------------ reading

def read_index(path: str) -> dict:
    root = Path(path).expanduser()
    if not (root / INDEX).is_file():
        raise RecipeError(f"data.prepared.path: no {INDEX} in {root}; write the shards first with "
                          f"`mambatrain data prepare RECIPE`")
    index = json.loads((root / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise RecipeError(f"data.prepared.path: {root / INDEX} has format {index.get('format')}, this version "
                          f"reads format {FORMAT}; prepare the data again")
    return index


class TokenStore:
    """One split of a prepared folder as a single token space, memory-mapped."""

    def __init__(self, path: str, split: str = "train"):
        self.root = Path(path).expanduser()
        index = read_index(path)
        if split not in index["splits"]:
            raise RecipeError(f"data.prepared.path: {self.root} has no {split} split (it has "
                              f"{', '.join(index['splits']) or 'none'})")
        self.vocab_size, self.eod_id = index["vocab_size"], index["eod_id"]
        shards = index["splits"][split]["shards"]
        for shard in shards:
            for name in (shard["tokens"], shard["docs"]):
                if not (self.root / name).is_file():
                    raise DataError(f"data.prepared.path: {self.root / name} is missing; prepare the data again")
        self.tokens = [np.memmap(self.root / s["tokens"], dtype=index["dtype"], mode="r") for s in shards
                       if s["n_tokens"]]
        self.doc_ends = [np.load(self.root / s["docs"], mmap_mode="r") for s in shards if s["n_tokens"]]
        sizes = [len(t) for t in self.tokens]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_shards + 1,)
        self.n_tokens = int(self.starts[-1])
        if self.n_tokens == 0:
            raise DataError(f"data.prepared.path: the {split} split of {self.root} holds no tokens")

    def doc_start_at_or_after(self, position: int) -> int:
        """The first document start >= position (n_tokens if none)."""
        if position <= 0:
            return 0
        if position >= self.n_tokens:
            return self.n_tokens
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        local = position - self.starts[shard]
        ends = self.doc_ends[shard]
        i = int(np.searchsorted(ends, local, side="left"))  # first document end >= local
        return int(self.starts[shard] + ends[i]) if i < len(ends) else int(self.starts[shard + 1])

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, b) and the positions (relative to a, in 1..b-a-1) where a document starts."""
        origin, pieces, starts = a, [], []
        b = min(b, self.n_tokens)
        shard = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            base = int(self.starts[shard])
            lo, hi = a - base, min(b, int(self.starts[shard + 1])) - base
            pieces.append(self.tokens[shard][lo:hi])
            ends = self.doc_ends[shard]
            # A document end e with lo < e < hi is the start of the next document.
            i, j = np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi, side="left")
            starts.append(np.asarray(ends[i:j], dtype=np.int64) + (base - origin))
            a = base + hi
            shard += 1
            if a < b:  # the next shard begins with a document
                starts.append(np.array([a - origin], dtype=np.int64))
        tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return tokens, np.concatenate(starts)


def slot_range(store: TokenStore, slot: int, n_slots: int) -> tuple[int, int]:
    """Token range [lo, hi) of slot ``slot`` of ``n_slots``: an equal share, snapped to document starts."""
    return (store.doc_start_at_or_after(slot * store.n_tokens // n_slots),
            store.doc_start_at_or_after((slot + 1) * store.n_tokens // n_slots))


class PreparedStream:
    """Samples of one slot of a prepared split; ``state()`` is (epoch, token offset) of the next sample.

    A stream re-divided after a change of layout (``relayout.py``) first reads the token
    intervals it was given for the rest of the epoch: its state then also holds ``end``
    (where the current interval stops) and ``plan`` (the intervals after it). Its next
    epoch is its own slot range, like any stream's.
    """

    def __init__(self, store: TokenStore, slot: int, n_slots: int, seq_len: int, reset: bool,
                 state: Optional[dict] = None, cycle: bool = True):
        self.store, self.seq_len, self.reset, self.cycle = store, seq_len, reset, cycle
        self.lo, self.hi = slot_range(store, slot, n_slots)
        if self.hi <= self.lo:
            raise DataError(f"data.prepared.path: slot {slot} of {n_slots} (ranks x workers, x batch rows with "
                            f"trainer.carry_state) gets no document of {store.root}, which holds {store.n_tokens} "
                            f"tokens; use fewer workers or more data")
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, self.lo)
        self.end = state.get("end", self.hi) if state else self.hi
        self.plan = [list(interval) for interval in state.get("plan", [])] if state else []
        self._done = False

    def state(self) -> dict:
        state = {"epoch": self.epoch, "pos": self.pos}
        if self.end != self.hi or self.plan:  # still inside intervals given by a re-division
            state.update(end=self.end, plan=[list(interval) for interval in self.plan])
        return state

    def __iter__(self) -> "PreparedStream":
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        need = self.seq_len + 1
        pieces, starts, n = [], [], 0
        while n < need:
            if self.pos >= self.end:
                if self.plan:  # the next interval of a re-divided epoch: it begins a document (or its tail)
                    self.pos, self.end = self.plan.pop(0)
                elif not self.cycle:
                    self._done = True
                    break
                else:
                    self.epoch, self.pos, self.end = self.epoch + 1, self.lo, self.hi
                if n > 0:
                    starts.append(np.array([n], dtype=np.int64))
                continue
            take = min(need - n, self.end - self.pos)
            tokens, doc_starts = self.store.read(self.pos, self.pos + take)
            pieces.append(tokens)
            starts.append(doc_starts + n)
            self.pos += take
            n += take
        if n <= 1:
            raise StopIteration
        self.pos -= 1 if n == need else 0  # the window's last token is the next sequence's first input
        window = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        if n < need:
            window = np.concatenate([window, np.full(need - n, self.store.eod_id, dtype=window.dtype)])
            starts = np.append(starts, n)
        return window_sample(window, starts, self.reset, valid=n)
