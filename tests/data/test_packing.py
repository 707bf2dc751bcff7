"""Packing: sequences tile the token stream, labels continue across sequence edges, documents never leak."""

import numpy as np
import pytest

from mambatrain.data.packing import PackedStream, window_sample
from mambatrain.models.loss import IGNORE_INDEX

EOD = 99


class ListDocuments:
    """A document stream over a list, with the index of the next document as its position."""

    def __init__(self, docs, position=None):
        self.docs, self.i = docs, position or 0

    def position(self):
        return self.i

    def __next__(self):
        if self.i >= len(self.docs):
            raise StopIteration
        self.i += 1
        return self.docs[self.i - 1]


class IdTokenizer:
    """Documents are already lists of token ids."""

    eod_id = EOD

    def encode_batch(self, docs):
        return [np.asarray(doc, dtype=np.int32) for doc in docs]


def packed(docs, seq_len, reset, state=None):
    return PackedStream(lambda pos: ListDocuments(docs, pos), IdTokenizer(), seq_len, reset, state)


# Document lengths (EOD included) of 4, 4, 8 and 3 put boundaries exactly on the edges of length-4 sequences.
DOCS = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [14, 15]]
STREAM = [t for d in DOCS for t in d + [EOD]]


def test_window_sample_marks_documents_and_masks_crossing_labels():
    window = np.array([1, 2, EOD, 3, 4, EOD, 5])
    sample = window_sample(window, np.array([3, 6]), reset=True)
    assert sample["input_ids"].tolist() == [1, 2, EOD, 3, 4, EOD]
    assert sample["seq_idx"].tolist() == [0, 0, 0, 1, 1, 1]
    assert sample["seq_idx"].dtype == np.int32
    # Each EOD is the last position of its document: its next token is another document's.
    assert sample["labels"].tolist() == [2, EOD, IGNORE_INDEX, 4, EOD, IGNORE_INDEX]
    plain = window_sample(window, np.array([3, 6]), reset=False)
    assert "seq_idx" not in plain and plain["labels"].tolist() == [2, EOD, 3, 4, EOD, 5]


@pytest.mark.parametrize("reset", [True, False])
def test_sequences_tile_the_stream_and_labels_continue_across_edges(reset):
    samples = list(packed(DOCS, 4, reset))
    inputs = np.concatenate([s["input_ids"] for s in samples])
    assert inputs[:len(STREAM)].tolist() == STREAM  # nothing dropped or repeated; then end-of-stream padding
    for k, s in enumerate(samples[:-1]):
        nxt = samples[k + 1]["input_ids"][0]
        expected_last = IGNORE_INDEX if reset and s["input_ids"][-1] == EOD else nxt
        assert s["labels"][-1] == expected_last  # the next sequence's first token, unless a document ends here
        if reset:
            assert s["seq_idx"][0] == 0
            # seq_idx steps exactly after each EOD inside the sequence
            steps = np.flatnonzero(np.diff(s["seq_idx"])) + 1
            assert steps.tolist() == (np.flatnonzero(s["input_ids"][:-1] == EOD) + 1).tolist()
            assert (s["labels"][s["input_ids"] == EOD] == IGNORE_INDEX).all()
        else:
            assert (s["labels"] != IGNORE_INDEX).all()


def test_document_boundary_exactly_on_a_sequence_edge():
    samples = list(packed(DOCS, 4, reset=True))
    # Sequence 0 is exactly document 0 (3 tokens + EOD): its last label must not be document 1's first token.
    assert samples[0]["input_ids"].tolist() == [1, 2, 3, EOD]
    assert samples[0]["labels"].tolist() == [2, 3, EOD, IGNORE_INDEX]
    # Sequence 1 starts document 1 at position 0: one document, seq_idx all 0.
    assert samples[1]["input_ids"].tolist() == [4, 5, 6, EOD] and samples[1]["seq_idx"].tolist() == [0, 0, 0, 0]
    # A document longer than a sequence continues: same document, real label at the edge.
    assert samples[2]["labels"][-1] == samples[3]["input_ids"][0] == 11


def test_end_of_a_finite_stream_is_padded_and_never_labelled():
    samples = list(packed(DOCS, 5, reset=True))  # 19 tokens: the fourth window has 4 of its 6
    last = samples[-1]
    real = len(STREAM) - 5 * (len(samples) - 1)
    assert real == 4
    assert last["input_ids"][:real].tolist() == STREAM[-real:]
    assert (last["labels"][real - 1:] == IGNORE_INDEX).all()
    assert last["seq_idx"][real:].min() > last["seq_idx"][real - 1]  # padding is a document of its own


def test_resume_from_every_state_continues_exactly():
    docs = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate([5, 1, 12, 3, 7, 2, 9])]
    straight = packed(docs, 5, reset=True)
    states, samples = [], []
    for s in straight:
        samples.append(s)
        states.append(straight.state())
    for k, state in enumerate(states[:-1]):
        resumed = list(packed(docs, 5, reset=True, state=state))
        assert len(resumed) == len(samples) - k - 1
        for a, b in zip(samples[k + 1:], resumed):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
