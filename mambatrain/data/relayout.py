"""Resuming prepared data on another layout: a different number of (rank x worker) streams.

The checkpoint holds, per old stream, where it stands in the split; a stream of the new
layout reads another token range, so positions cannot be carried over one to one. What
is left of the current epoch is known exactly, though: for every old stream, the tokens
from its position to the end of its range (or of the intervals it was given by an
earlier re-division). Those intervals, in slot order, are cut into as many equal shares
as there are new streams, at document starts, and each new stream reads its share, then
goes on with its own range from the next epoch. So no document is trained twice in the
epoch and no token is skipped; the order differs from an uninterrupted run, which a
changed global batch changes anyway.

An old stream already in a later epoch than the others (it ran past the end of its
range first) has nothing left in the earliest one; what it read of the later epoch is
read again there, once, by the new layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from .shards import TokenStore, slot_range


@dataclass
class Redivision:
    """New stream states, per new rank and stream, and what a log line should say about them."""

    states: list[list[dict]]
    epoch: int
    tokens_left: int  # tokens of the epoch not yet read, now shared by the new streams
    ahead: int  # old streams already in the next epoch


def _left_of(store: TokenStore, state: dict | None, slot: int, n_slots: int) -> tuple[int, list[list[int]]]:
    """(epoch, intervals still to read in it) of one old stream (None: it never trained a batch)."""
    lo, hi = slot_range(store, slot, n_slots)
    if state is None:
        return 0, [[lo, hi]]
    return state["epoch"], [[state["pos"], state.get("end", hi)]] + [list(i) for i in state.get("plan", [])]


def _cut(store: TokenStore, intervals: list[list[int]], offset: int) -> tuple[int, int]:
    """(interval index, token position) ``offset`` tokens into the intervals, moved on to a document start."""
    for i, (a, b) in enumerate(intervals):
        if offset < b - a:
            return i, a if offset == 0 else min(store.doc_start_at_or_after(a + offset), b)
        offset -= b - a
    return len(intervals), 0


def _between(intervals: list[list[int]], start: tuple[int, int], stop: tuple[int, int]) -> list[list[int]]:
    (i, p), (j, q) = start, stop
    if i == j:
        return [[p, q]] if q > p else []
    share = [[p, intervals[i][1]]] + [list(x) for x in intervals[i + 1:j]]
    if j < len(intervals):
        share.append([intervals[j][0], q])
    return [x for x in share if x[1] > x[0]]


def redivide(store: TokenStore, saved: list, old_streams: int, new_ranks: int, new_streams: int) -> Redivision:
    """``saved``: per old rank, its streams' states (or None); returns the states of ``new_ranks x new_streams``."""
    old_slots = len(saved) * old_streams
    left = [_left_of(store, None if saved[s // old_streams] is None else saved[s // old_streams][s % old_streams],
                     s, old_slots) for s in range(old_slots)]
    epoch = min(e for e, _ in left)
    intervals = [x for e, xs in left if e == epoch for x in xs if x[1] > x[0]]
    total = sum(b - a for a, b in intervals)
    n = new_ranks * new_streams
    cuts = [_cut(store, intervals, total * k // n) for k in range(n)] + [(len(intervals), 0)]
    states = []
    for k in range(n):
        share = _between(intervals, cuts[k], cuts[k + 1])
        # An empty share (fewer tokens left than streams) ends at once and starts the next epoch.
        first = share[0] if share else [0, 0]
        states.append({"epoch": epoch, "pos": first[0], "end": first[1], "plan": share[1:]})
    return Redivision([states[r * new_streams:(r + 1) * new_streams] for r in range(new_ranks)], epoch, total,
                      sum(e > epoch for e, _ in left))
