"""Documents -> fixed-length training sequences with document boundaries, resumable at any sequence.

The token stream of a slot is ``doc0 EOD doc1 EOD doc2 EOD ...``: the end-of-document
token closes (and belongs to) its document. Sequence k reads the window
``stream[k*L : (k+1)*L + 1]`` (L = seq_len): inputs are its first L tokens and labels
its last L, so the label of a sequence's last position is the first token of the
next sequence of the same stream: no token is lost at sequence edges.

With ``reset_at_document_boundaries`` the sample also has ``seq_idx`` (int32, the
document number of each position, from 0 in every sequence), so Mamba resets its
state and convolution and attention masks across documents; and a label that would
cross into the next document (the EOD position, whose next token starts another
document) is -100. Nothing is ever predicted across a reset. Without it, the
stream is one long text and EOD is an ordinary token that is followed by the next
document.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

import numpy as np

from ..models.loss import IGNORE_INDEX

TOKENIZE_BATCH = 32  # documents tokenized per call (their positions are taken one by one, before each)


def window_sample(window: np.ndarray, starts: np.ndarray, reset: bool, valid: Optional[int] = None) -> dict:
    """One sample from a window of L + 1 tokens.

    window (L+1,) token ids; starts: positions 1..L in the window where a document begins;
    valid: tokens of the window that are real (the rest is end-of-stream padding, never labelled).
    Returns input_ids (L,) int64, labels (L,) int64 and, with reset, seq_idx (L,) int32.
    """
    L = len(window) - 1
    sample = {"input_ids": window[:L].astype(np.int64), "labels": window[1:].astype(np.int64)}
    if valid is not None and valid < L + 1:
        sample["labels"][max(valid - 1, 0):] = IGNORE_INDEX
    if reset:
        marks = np.zeros(L + 1, dtype=np.int32)
        marks[starts] = 1
        doc = np.cumsum(marks, dtype=np.int32)  # (L+1,) document number per window position
        sample["labels"][starts - 1] = IGNORE_INDEX  # the last position of a document predicts nothing
        sample["seq_idx"] = doc[:L]
    return sample


class PackedStream:
    """Samples packed from a document stream; ``state()`` is the position of the next sample.

    The state is the document stream's position before the document that holds the
    next sample's first token, and that token's offset in the document (EOD
    included), so a resumed stream re-reads one document and skips into it.
    ``cycle=False`` ends the stream after the documents, padding the last window with EOD.
    """

    def __init__(self, open_documents, tokenizer, seq_len: int, reset: bool, state: Optional[dict] = None):
        """open_documents(position or None) -> a document stream with ``position()`` and ``__next__() -> str``."""
        self.tokenizer, self.seq_len, self.reset = tokenizer, seq_len, reset
        self.eod = np.array([tokenizer.eod_id], dtype=np.int32)
        self.docs = open_documents(state["docs"] if state else None)
        self._ahead: deque = deque()  # (position before the document, its tokens), read but not yet packed
        self._tokens: Optional[np.ndarray] = None
        self._doc_position = self.docs.position()
        self._offset = 0
        self._done = False
        if state and not self._fetch():
            raise ValueError("the saved data position is past the end of its stream")
        if state:
            self._offset = state["offset"]

    def state(self) -> dict:
        return {"docs": self._doc_position, "offset": self._offset}

    def _fetch(self) -> bool:
        if not self._ahead:
            positions, texts = [], []
            for _ in range(TOKENIZE_BATCH):
                position = self.docs.position()
                try:
                    texts.append(next(self.docs))
                except StopIteration:
                    break
                positions.append(position)
            self._ahead.extend(zip(positions, self.tokenizer.encode_batch(texts)))
            if not self._ahead:
                return False
        self._doc_position, tokens = self._ahead.popleft()
        self._tokens = np.concatenate([tokens, self.eod])
        self._offset = 0
        return True

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        need = self.seq_len + 1
        pieces, starts, n = [], [], 0
        while n < need:
            if self._tokens is None or self._offset >= len(self._tokens):
                if not self._fetch():
                    self._done = True
                    break
                if n > 0:
                    starts.append(n)
            take = min(need - n, len(self._tokens) - self._offset)
            pieces.append(self._tokens[self._offset:self._offset + take])
            self._offset += take
            n += take
        if n <= 1:  # the stream ended on a sequence edge: its last token was already a label
            raise StopIteration
        # The window's last token is the first input of the next sequence.
        self._offset -= 1 if n == need else 0
        window = np.concatenate(pieces)
        if n < need:  # end of a finite stream: pad as a document of its own
            window = np.concatenate([window, np.full(need - n, self.eod[0], dtype=np.int32)])
            starts.append(n)
        return window_sample(window, np.asarray(starts, dtype=np.int64), self.reset, valid=n)
