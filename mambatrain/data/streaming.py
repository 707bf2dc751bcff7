"""Streams of samples -> batches, one stream per (rank, dataloader worker), each batch tagged with its position.

With W workers, batch b of a rank comes from stream ``b % W`` (the DataLoader asks its
workers in turn, and our streams never end). Each batch carries the position of its
stream *after* that batch; the datamodule keeps, per stream, the position of the last
batch actually trained on, which is what a checkpoint must hold (the batch Lightning has
already fetched for the next step is not counted). A resumed loader whose first batch
is global batch C starts worker w on stream ``(C + w) % W`` at that stream's position,
so batch C + i again comes from stream ``(C + i) % W``: the uninterrupted order.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Optional

import numpy as np
import torch

from ..config.schema import TextSourceConfig
from .packing import PackedStream
from .shards import PreparedStream, TokenStore
from .sources import DocumentStream
from .tokenizer import load_tokenizer

POSITION_KEY = "data_position"  # not a tensor: removed in the datamodule before the batch reaches the model


@dataclass
class TextStreams:
    """Opens the packed text stream of one slot (picklable, so each worker opens its own)."""

    sources: list[TextSourceConfig]
    group_key: str
    tokenizer: str
    eod_token: str
    seed: int
    shuffle_files: bool
    seq_len: int
    reset: bool
    cycle: bool = True

    def __call__(self, slot: int, n_slots: int, state: Optional[dict]) -> PackedStream:
        tokenizer = load_tokenizer(self.tokenizer, self.eod_token)

        def open_documents(position):
            return DocumentStream(self.sources, self.group_key, slot, n_slots, self.seed, position, self.cycle,
                                  self.shuffle_files)

        return PackedStream(open_documents, tokenizer, self.seq_len, self.reset, state)


@dataclass
class PreparedStreams:
    """Opens the stream of one slot of a prepared split."""

    path: str
    split: str
    seq_len: int
    reset: bool
    cycle: bool = True

    def __call__(self, slot: int, n_slots: int, state: Optional[dict]) -> PreparedStream:
        return PreparedStream(TokenStore(self.path, self.split), slot, n_slots, self.seq_len, self.reset, state,
                              self.cycle)


class StreamBatches(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` samples from the stream this process (main or worker) owns.

    ``states[j]`` is where stream j resumes (None: from the start); ``first_stream`` is the
    stream of the first batch (global batch index modulo the stream count).
    """

    def __init__(self, open_stream: Callable, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, states: Optional[list] = None, first_stream: int = 0,
                 with_position: bool = True):
        self.open_stream, self.batch_size = open_stream, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_streams = max(num_workers, 1)
        self.states, self.first_stream, self.with_position = states, first_stream, with_position

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream_id = (self.first_stream + worker) % self.num_streams
        slot = self.rank * self.num_streams + stream_id
        state = self.states[stream_id] if self.states else None
        stream = self.open_stream(slot, self.world_size * self.num_streams, state)
        while True:
            samples = list(islice(stream, self.batch_size))
            if not samples:  # only finite streams end
                return
            batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
            if self.with_position:
                batch[POSITION_KEY] = {"stream": stream_id, "state": stream.state()}
            yield batch


def gather_across_ranks(obj) -> list:
    """``obj`` of every data-parallel rank, in rank order (every rank calls this at the same checkpoint)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]
