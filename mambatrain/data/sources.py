"""Documents from local files or hub datasets, read in streaming mode, split into disjoint slots, resumable.

A *slot* is one (rank, dataloader worker) pair; there are ``world_size * num_workers``
of them and each reads a disjoint part of every source (``split_dataset_by_node``:
whole files when the file count is a multiple of the slot count, otherwise every
n-th document of each file). Each source cycles through epochs on its own; within
an epoch a slot sees each of its documents exactly once. Several sources are mixed
by drawing, for each next document, a source with probability proportional to its
weight (a pure function of the seed, slot and draw number).

A *position* is a small dict that names the next document: per source, the epoch,
the datasets ``state_dict`` before the read batch that holds it and its index in
that batch; for the mixture, the draw number. Reopening a stream at a position
yields exactly the documents that would have followed.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config.schema import RecipeError, TextSourceConfig

log = logging.getLogger("mambatrain")

READ_BATCH = 64  # documents per datasets read: amortises its per-row cost and the state_dict copy
DRAW_BLOCK = 4096  # mixture draws generated at once
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class DataError(RecipeError):
    """Data that cannot be trained on (missing, empty, unreadable); the message names the recipe key and file."""


def _builder_of(path: Path) -> Optional[str]:
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    return BUILDERS.get(suffixes[-1].lower()) if suffixes else None


def looks_local(path: str) -> bool:
    """A hub name is ``name`` or ``org/name``; anything that exists, has a glob or a file extension is local."""
    p = Path(path).expanduser()
    return (p.exists() or any(c in path for c in "*?[") or path.startswith((".", "/", "~"))
            or _builder_of(p) is not None)


def resolve_files(path: str, key: str) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) of a local file, folder or glob; a missing or mixed path is a RecipeError."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = sorted(str(f) for f in p.rglob("*") if f.is_file() and _builder_of(f) is not None)
    elif p.is_file():
        candidates = [str(p)]
    else:
        candidates = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not candidates:
        raise RecipeError(f"{key}: {path} matches no file (expected a .jsonl, .json, .parquet, .txt or .arrow file, "
                          f"a folder of them, or a glob)")
    builders = {_builder_of(Path(f)) for f in candidates}
    if None in builders:
        unknown = next(f for f in candidates if _builder_of(Path(f)) is None)
        raise RecipeError(f"{key}: {unknown} has an unknown extension; use .jsonl, .json, .parquet, .txt or .arrow")
    if len(builders) > 1:
        raise RecipeError(f"{key}: {path} mixes formats ({', '.join(sorted(builders))}); give one source per format")
    return builders.pop(), candidates


def check_held_out(sources: list[TextSourceConfig], val_sources: list[TextSourceConfig]) -> None:
    """No validation source reads a file (or hub dataset split) that a training source reads; a RecipeError if one does.

    Validating on documents the model trains on measures fit, not generalisation, and nothing else would tell.
    """
    def reads(source: TextSourceConfig, key: str) -> set:
        if looks_local(source.path):
            return {str(Path(f).resolve()) for f in resolve_files(source.path, f"{key}.path")[1]}
        return {f"hub dataset {source.path} ({source.name or 'default'}, split {source.split})"}

    training = [reads(s, f"data.text.sources[{i}]") for i, s in enumerate(sources)]
    for j, source in enumerate(val_sources):
        for shared in sorted(reads(source, f"data.text.val_sources[{j}]")):
            i = next((i for i, files in enumerate(training) if shared in files), None)
            if i is not None:
                raise RecipeError(f"data.text.val_sources[{j}]: {shared} is also read by data.text.sources[{i}] "
                                  f"({sources[i].path}); validation must be held out, or val/loss measures fit: "
                                  f"take it out of the training sources")


def _first_invalid_utf8(files: list[str], chunk: int = 1 << 24) -> Optional[str]:
    """'file at byte N' for the first file that is not valid UTF-8 (only called after a decode error)."""
    import codecs

    for name in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(name, "rb") as f:
            while True:
                data = f.read(chunk)
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as error:
                    return f"{name} at byte {offset + error.start}"
                if not data:
                    break
                offset += len(data)
    return None


class SourceReader:
    """One source's documents for one slot, epoch after epoch (or one epoch when ``cycle`` is false)."""

    def __init__(self, source: TextSourceConfig, key: str, slot: int, n_slots: int, seed: int,
                 position: Optional[dict] = None, cycle: bool = True, shuffle_files: bool = True):
        self.source, self.key, self.slot, self.n_slots, self.seed, self.cycle = source, key, slot, n_slots, seed, cycle
        self.shuffle_files = shuffle_files
        self.local = looks_local(source.path)
        self.builder, self.files = resolve_files(source.path, f"{key}.path") if self.local else (None, [])
        self.position = dict(position) if position else {"epoch": 0, "hf": None, "index": 0}
        self.skipped_empty = 0
        self._texts = self._generate()

    def _open(self, epoch: int):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        if self.local:
            files = list(self.files)
            if self.shuffle_files:  # a new file order every epoch, the same on every slot
                np.random.default_rng([self.seed, epoch]).shuffle(files)
            try:
                ds = load_dataset(self.builder, data_files=files, split="train", streaming=True)
            except StopIteration:  # datasets' way of saying the first file has no rows
                raise DataError(f"{self.key}.path: no documents in {self._describe()}") from None
        else:
            try:
                ds = load_dataset(self.source.path, self.source.name, split=self.source.split, streaming=True)
            except Exception as error:
                raise RecipeError(f"{self.key}.path: {self.source.path!r} is not a local file, folder or glob, and "
                                  f"loading it as a hub dataset failed ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]})") from None
        if self.n_slots > 1:
            ds = split_dataset_by_node(ds, rank=self.slot, world_size=self.n_slots)
        return ds

    def _describe(self) -> str:
        if not self.local:
            return f"hub dataset {self.source.path}"
        shown = ", ".join(self.files[:3])
        return shown + (f" and {len(self.files) - 3} more files" if len(self.files) > 3 else "")

    def _column(self, batch: dict) -> list:
        field = self.source.text_field
        if field not in batch:
            raise DataError(f"{self.key}.text_field: no column {field!r} in {self._describe()}; "
                            f"its columns are {', '.join(batch) or '(none)'}")
        return batch[field]

    def _read_error(self, error: Exception) -> DataError:
        where = self._describe()
        if isinstance(error, UnicodeDecodeError) and self.local:
            where = _first_invalid_utf8(self.files) or where
            return DataError(f"{self.key}.path: {where} is not valid UTF-8 ({error.reason}); "
                             f"re-encode the file, e.g. with iconv -f latin1 -t utf-8")
        return DataError(f"{self.key}.path: could not read {where} ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:300]})")

    def _generate(self) -> Iterator[str]:
        epoch, state, skip = self.position["epoch"], self.position["hf"], self.position["index"]
        while True:
            ds = self._open(epoch)
            if state is not None:
                ds.load_state_dict(state)
            found = state is not None or skip > 0  # resumed mid-epoch: earlier documents were found before
            batches = ds.iter(batch_size=READ_BATCH)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except DataError:
                    raise
                except Exception as error:
                    raise self._read_error(error) from error
                texts = self._column(batch)
                after = ds.state_dict()
                for i in range(skip, len(texts)):
                    self.position = {"epoch": epoch, "hf": state, "index": i + 1}
                    text = texts[i]
                    if not text:  # None or "": nothing to learn, and an empty document would only add an EOD
                        self.skipped_empty += 1
                        continue
                    found = True
                    yield text
                state, skip = after, 0
                self.position = {"epoch": epoch, "hf": state, "index": 0}
            if not found:
                share = (f" for slot {self.slot} of {self.n_slots} (ranks x workers); the source has fewer documents "
                         f"than slots, or split it into more files" if self.n_slots > 1 else "")
                raise DataError(f"{self.key}.path: no documents with text in {self._describe()}{share}")
            if self.skipped_empty:
                log.warning("%s: skipped %d empty documents in epoch %d of slot %d", self.key, self.skipped_empty,
                            epoch, self.slot)
                self.skipped_empty = 0
            if not self.cycle:
                return
            epoch, state, skip = epoch + 1, None, 0
            self.position = {"epoch": epoch, "hf": None, "index": 0}

    def __next__(self) -> str:
        return next(self._texts)


class DocumentStream:
    """Documents of one slot, drawn from weighted sources; ``position()`` names the next one."""

    def __init__(self, sources: list[TextSourceConfig], group_key: str, slot: int, n_slots: int, seed: int,
                 position: Optional[dict] = None, cycle: bool = True, shuffle_files: bool = True):
        if not sources:
            raise RecipeError(f"{group_key}: no sources")
        positions = position["sources"] if position else [None] * len(sources)
        self.readers = [SourceReader(s, f"{group_key}[{i}]", slot, n_slots, seed, positions[i], cycle,
                                     shuffle_files)
                        for i, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.seed, self.slot, self.cycle = seed, slot, cycle
        self.draw = position["draw"] if position else 0
        self._block, self._choices = -1, None
        self._exhausted: set[int] = set()

    def position(self) -> dict:
        # Readers replace their position dict on every step, so this list is a snapshot.
        return {"draw": self.draw, "sources": [r.position for r in self.readers]}

    def _choose(self, draw: int) -> int:
        if len(self.readers) == 1:
            return 0
        block = draw // DRAW_BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, self.slot, block])
            self._block, self._choices = block, rng.choice(len(self.readers), size=DRAW_BLOCK, p=self.weights)
        return int(self._choices[draw % DRAW_BLOCK])

    def __iter__(self) -> "DocumentStream":
        return self

    def __next__(self) -> str:
        while True:
            if len(self._exhausted) == len(self.readers):
                raise StopIteration
            i = self._choose(self.draw)
            self.draw += 1
            if i in self._exhausted:
                continue
            try:
                return next(self.readers[i])
            except StopIteration:  # only without cycling: the other sources go on
                self._exhausted.add(i)
