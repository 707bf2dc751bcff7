"""Row streams (trainer.carry_state): every batch row is its own contiguous token stream.

Row i of batch k+1 continues row i of batch k: a slot's stream of samples is split into
``rows`` sub-streams, each a slot of its own (``slot * rows + i`` of ``n_slots * rows``),
so rows, ranks and workers read disjoint documents. ``InterleavedRows`` yields their
samples in turn (row 0, row 1, ..., row B-1, row 0, ...), so ``StreamBatches`` taking
``batch_size`` samples at a time builds batches whose row i always comes from sub-stream
i, and its ``state()`` at a batch edge (a list, one position per row) is all an exact
resume needs.

Document ids keep counting along each row's stream, so the Mamba state carried from one
step into the next resets exactly where a document begins, including at a step edge:
a window's ``seq_idx`` counts documents from 0, and a row adds the documents begun
before it. That count comes from the window's last label: with
``reset_at_document_boundaries`` a position's label is ignored exactly when the next
position begins another document (or is end-of-stream padding, a document of its own;
see ``packing.window_sample``), so the next window opens a new document iff
``labels[-1]`` is ignored. Ids are compared for equality only (Mamba, attention masks),
so their size does not matter; they wrap at 2**31 to stay int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..config.schema import RecipeError
from ..models.loss import IGNORE_INDEX

ID_WRAP = 1 << 31


class ContinuedDocuments:
    """One row's samples with document ids counted along the whole stream; ``state()`` resumes both."""

    def __init__(self, samples, state: Optional[dict]):
        self.samples = samples
        self.docs_before = state["docs_before"] if state else 0

    def state(self) -> dict:
        return {"stream": self.samples.state(), "docs_before": self.docs_before}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        sample = next(self.samples)
        if "seq_idx" in sample:  # without reset_at_document_boundaries the stream is one long text
            relative = sample["seq_idx"]  # (L,) int32 from 0
            next_opens = int(sample["labels"][-1] == IGNORE_INDEX)
            sample["seq_idx"] = ((relative.astype("int64") + self.docs_before) % ID_WRAP).astype(relative.dtype)
            self.docs_before = (self.docs_before + int(relative[-1]) + next_opens) % ID_WRAP
        return sample


class InterleavedRows:
    """Samples of ``rows`` disjoint sub-streams of one slot, taken one per row in turn."""

    def __init__(self, open_stream: Callable, rows: int, slot: int, n_slots: int, state: Optional[list]):
        if state is not None and len(state) != rows:
            raise RecipeError(f"data.batch_size: the checkpoint holds {len(state)} row streams (its batch size with "
                              f"trainer.carry_state); an exact resume needs the same batch size, got {rows}")
        self.rows = [ContinuedDocuments(open_stream(slot * rows + i, n_slots * rows, None if state is None
                                                    else state[i]["stream"]), None if state is None else state[i])
                     for i in range(rows)]
        self.next_row = 0

    def state(self) -> list:
        # Only asked at batch edges (next_row == 0), where every row stands before its next sample.
        return [row.state() for row in self.rows]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        sample = next(self.rows[self.next_row])
        self.next_row = (self.next_row + 1) % len(self.rows)
        return sample


@dataclass
class RowStreams:
    """Opens the row streams of one slot (picklable, like the ``open_stream`` it wraps)."""

    open_stream: Callable
    rows: int

    def __call__(self, slot: int, n_slots: int, state: Optional[list]) -> InterleavedRows:
        return InterleavedRows(self.open_stream, self.rows, slot, n_slots, state)
