"""Small corpora written into tmp dirs, and readers that take a slot's stream apart again."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mambatrain.data.streaming import POSITION_KEY, StreamBatches

BYTE_EOD = 256


def doc_text(i: int) -> str:
    # Unique, varied lengths (some longer than a sequence), non-ASCII included.
    return f"doc{i}:" + "é" * (i % 5) + "x" * ((i * 37) % 150)


def write_jsonl(path: Path, ids, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(json.dumps({field: doc_text(i), "id": i}) + "\n")
    return path


def write_corpus(folder: Path, n_files: int, docs_per_file: int) -> list[str]:
    """n_files jsonl files under folder; returns every document's text."""
    for k in range(n_files):
        write_jsonl(folder / f"part{k}.jsonl", range(k * docs_per_file, (k + 1) * docs_per_file))
    return [doc_text(i) for i in range(n_files * docs_per_file)]


def read_slots(open_stream, rank: int, world: int, workers: int, batch_size: int = 2) -> dict[int, list[torch.Tensor]]:
    """Every input row of a finite stream, per stream of this rank, read through a real DataLoader."""
    dataset = StreamBatches(open_stream, batch_size, rank, world, workers)
    rows = defaultdict(list)
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        rows[batch[POSITION_KEY]["stream"]].extend(batch["input_ids"])
    return rows


def documents_of(rows: list[torch.Tensor], eod: int = BYTE_EOD) -> list[str]:
    """Byte-tokenized rows of one stream back to its documents (end-of-stream padding is EOD too)."""
    ids = torch.cat(rows).tolist()
    docs, current = [], []
    for token in ids:
        if token == eod:
            docs.append(bytes(current).decode("utf-8"))
            current = []
        else:
            current.append(token)
    if current:
        docs.append(bytes(current).decode("utf-8"))
    return [d for d in docs if d]
