"""The recipe's data section -> a LightningDataModule whose position survives a resume.

The data position is the number of micro-batches consumed, counted from
``trainer.global_step`` at the optimizer-step boundaries where checkpoints are
written. Synthetic sources regenerate batch ``b`` from its index, so that number is
enough. Text and prepared sources are streams: each batch also carries its stream's
position, and the positions of the last batches trained on (recorded when Lightning
hands a batch to training, never when it prefetches one) are saved with the count, for
every rank. A resumed run restarts each stream there, so its batches are exactly those
an uninterrupted run would have seen. With ``trainer.carry_state`` a stream's position
is that of each of its batch rows (``rows.py``).

On another layout (a different number of data-parallel ranks or workers) the resume is
no longer exact, by necessity: synthetic samples continue from the global sample count
(nothing skipped or repeated); prepared data shares what is left of the epoch among the
new streams (``relayout.py``); text streams, whose positions are opaque datasets
states, are refused, as is trainer.carry_state (its rows are the old layout's).
"""

from __future__ import annotations

import functools
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..config.schema import Recipe, RecipeError
from .mqar import mqar_sample
from .relayout import redivide
from .rows import RowStreams
from .shards import TokenStore, read_index
from .sources import SourceReader, check_held_out
from .streaming import POSITION_KEY, PreparedStreams, StreamBatches, TextStreams, gather_across_ranks
from .synthetic import (
    SyntheticBatches, UnsizedOrder, markov_sample, markov_successors, passkey_sample, selective_copy_sample,
)
from .tokenizer import check_vocab, load_tokenizer

log = logging.getLogger("mambatrain")

VALIDATION_SEED_OFFSET = 7_777_777
STREAMING = ("text", "prepared")


def check_data(recipe: Recipe) -> None:
    """What can be checked before training: files, tokenizer, vocabulary, columns, non-empty sources."""
    data = recipe.data
    used = data.sources_used()
    if "text" in used:
        check_vocab(load_tokenizer(data.text.tokenizer, data.text.eod_token), recipe.model.vocab_size)
        groups = [("sources", data.text.sources)] + ([("val_sources", data.text.val_sources)]
                                                      if data.text.val_sources else [])
        check_held_out(data.text.sources, data.text.val_sources)
        for group, sources in groups:
            for i, source in enumerate(sources):
                # Reads one batch of documents: the files exist, the column exists, there is text.
                next(SourceReader(source, f"data.text.{group}[{i}]", 0, 1, data.text.seed, cycle=False))
    if "prepared" in used:
        index = read_index(data.prepared.path)
        if index["vocab_size"] > recipe.model.vocab_size:
            raise RecipeError(f"model.vocab_size: {data.prepared.path} was prepared with a tokenizer of "
                              f"{index['vocab_size']} tokens but model.vocab_size is {recipe.model.vocab_size}")
        TokenStore(data.prepared.path, "train")


class RecipeDataModule(L.LightningDataModule):
    def __init__(self, recipe: Recipe, check: bool = True):
        super().__init__()
        self.recipe = recipe
        self.start_batch = 0  # micro-batches this rank had trained on when the run (re)started
        self.start_step = 0  # optimizer steps then
        self.first_sample: int | None = None  # synthetic: global number of the resumed run's first sample
        self.stream_states: list | None = None  # per stream of this rank: position after its last trained batch
        self._train_tokens: int | None = None  # prepared: tokens of the train split (checkpoints record it)
        if check:
            check_data(recipe)
        data = recipe.data
        if data.val_source is None and data.source == "text" and not data.text.val_sources:
            log.warning("data.text.val_sources is empty: validation reads the training sources, so val/loss "
                        "measures fit, not generalisation")
        if data.val_source is None and data.source == "prepared" and not self._prepared_has_val():
            log.warning("%s has no val split: validation reads the training shards", data.prepared.path)

    def _prepared_has_val(self) -> bool:
        try:
            return "val" in read_index(self.recipe.data.prepared.path)["splits"]
        except RecipeError:
            return False

    def _batches_per_step(self) -> int:
        return self.recipe.trainer.accumulate_grad_batches

    def batches_consumed(self, step: int) -> int:
        """Micro-batches this rank has trained on after optimizer step ``step``: the steps before a resume count
        with the accumulation they ran with (a resumed run may change it)."""
        return self.start_batch + (step - self.start_step) * self._batches_per_step()

    def _rank_world(self) -> tuple[int, int]:
        """This rank's data-parallel rank and their number: the ranks of one context-parallel group (consecutive
        ranks, trainer.context_parallel of them) read the same batches, each training on its slice of the length."""
        trainer, cp = self.trainer, self.recipe.trainer.context_parallel
        return (trainer.global_rank // cp, trainer.world_size // cp) if trainer is not None else (0, 1)

    # -------------------------------------------------------------------------------------- synthetic sources

    def _sample_fn(self, source: str, validation: bool):
        data, vocab = self.recipe.data, self.recipe.model.vocab_size
        config = getattr(data, source)
        seed = config.train_samples_seed + (VALIDATION_SEED_OFFSET if validation else 0)
        if source == "mqar":
            return functools.partial(mqar_sample, seed=seed, seq_len=data.seq_len, vocab_size=vocab,
                                     num_kv_pairs=config.num_kv_pairs)
        if source == "passkey":
            return functools.partial(passkey_sample, seed=seed, seq_len=data.seq_len, vocab_size=vocab,
                                     digits=config.digits, depth=config.depth)
        if source == "markov":
            return functools.partial(markov_sample, seed=seed, seq_len=data.seq_len,
                                     successors=markov_successors(config.graph_seed, vocab, config.branches))
        return functools.partial(selective_copy_sample, seed=seed, seq_len=data.seq_len, vocab_size=vocab,
                                 num_tokens=config.num_tokens)

    # -------------------------------------------------------------------------------------- streaming sources

    def _streams(self, source: str, validation: bool):
        data = self.recipe.data
        reset = data.reset_at_document_boundaries
        if source == "text":
            text = data.text
            val = validation and bool(text.val_sources)
            return TextStreams(text.val_sources if val else text.sources,
                               "data.text.val_sources" if val else "data.text.sources", text.tokenizer,
                               text.eod_token, text.seed, text.shuffle_files, data.seq_len, reset)
        split = "val" if validation and self._prepared_has_val() else "train"
        return PreparedStreams(data.prepared.path, split, data.seq_len, reset)

    # -------------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        data = self.recipe.data
        rank, world = self._rank_world()
        if data.source in STREAMING:
            streams = max(data.num_workers, 1)
            open_stream = self._streams(data.source, validation=False)
            if self.recipe.trainer.carry_state:  # row i of every batch continues row i of the batch before
                open_stream = RowStreams(open_stream, data.batch_size)
            dataset = StreamBatches(open_stream, data.batch_size, rank, world, data.num_workers, self.stream_states,
                                    first_stream=self.start_batch % streams)
            return self._loader(dataset)
        left = max((self.recipe.trainer.max_steps - self.start_step) * self._batches_per_step(), 0)
        return self._loader(SyntheticBatches(self._sample_fn(data.source, validation=False), left, data.batch_size,
                                             rank, world, first_sample=self._first_sample()), UnsizedOrder(left))

    def _first_sample(self) -> int:
        """Samples the whole run had trained on when this loader starts (global, over every rank)."""
        if self.first_sample is not None:
            return self.first_sample
        return self.start_batch * self.recipe.data.batch_size * self._rank_world()[1]

    def val_dataloader(self) -> DataLoader:
        data = self.recipe.data
        source = data.val_source or data.source
        rank, world = self._rank_world()
        if source in STREAMING:
            # Streams never end: every validation run reads the same first limit_val_batches batches.
            return self._loader(StreamBatches(self._streams(source, validation=True), data.batch_size, rank, world,
                                              data.num_workers, with_position=False))
        config = getattr(data, source)
        batches = max(1, config.val_samples // (data.batch_size * world))
        return self._loader(SyntheticBatches(self._sample_fn(source, validation=True), batches, data.batch_size,
                                             rank, world))

    def _loader(self, dataset, sampler=None) -> DataLoader:
        workers = self.recipe.data.num_workers
        # batch_size=None: the dataset yields whole batches, in order, from any number of workers.
        return DataLoader(dataset, batch_size=None, shuffle=False, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    # -------------------------------------------------------------------------------------- position

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this for the batch it is about to train on, after any prefetching.
        position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        if position is not None:
            if self.stream_states is None:
                self.stream_states = [None] * max(self.recipe.data.num_workers, 1)
            self.stream_states[position["stream"]] = position["state"]
        return batch

    def state_dict(self) -> dict:
        # Checkpoints are written at optimizer-step boundaries, so this counts exactly the batches trained on
        # (Lightning's prefetched next batch is not counted).
        step = self.trainer.global_step if self.trainer is not None else 0
        batches = self.batches_consumed(step)
        world = self._rank_world()[1]
        state = {"batches_consumed": batches, "global_step": step, "data_parallel_ranks": world}
        if self.recipe.data.source not in STREAMING:
            trained = (batches - self.start_batch) * self.recipe.data.batch_size * world
            state["samples_consumed"] = self._first_sample() + trained
        else:
            # One entry per data-parallel rank (a group's ranks hold the same positions): a run may resume with
            # another trainer.context_parallel as long as the data-parallel ranks stay as many.
            state["streams"] = gather_across_ranks(self.stream_states)[::self.recipe.trainer.context_parallel]
            state["num_streams"] = max(self.recipe.data.num_workers, 1)
            state["row_streams"] = self.recipe.trainer.carry_state
            state["source"] = self.recipe.data.source
            if self.recipe.data.source == "prepared":  # positions are token offsets into exactly these shards
                state["prepared_tokens"] = self._prepared_tokens()
        return state

    def _prepared_tokens(self) -> int:
        if self._train_tokens is None:
            self._train_tokens = TokenStore(self.recipe.data.prepared.path, "train").n_tokens
        return self._train_tokens

    def load_state_dict(self, state: dict) -> None:
        self.start_batch = int(state["batches_consumed"])
        # older checkpoints do not record the step: taken to have run with this run's accumulation
        self.start_step = int(state.get("global_step", self.start_batch // self._batches_per_step()))
        if self.recipe.data.source not in STREAMING:
            self._load_sample_count(state)
            return
        if "streams" not in state:
            log.warning("the checkpoint holds no stream position (it was not trained on %s data): "
                        "the %s streams start from the beginning", self.recipe.data.source, self.recipe.data.source)
            return
        source = self.recipe.data.source
        saved = state.get("source", source)  # older checkpoints do not say: taken to be this run's source
        if saved != source:
            raise RecipeError(f"data.source: the checkpoint holds the position of {saved} streams, which {source} "
                              f"streams cannot continue; resume with data.source: {saved}, or start a new run from "
                              f"its weights (finetune.init_from)")
        saved_tokens = state.get("prepared_tokens")  # older checkpoints do not say
        if source == "prepared" and saved_tokens is not None and saved_tokens != self._prepared_tokens():
            raise RecipeError(f"data.prepared.path: the checkpoint's data position is in a train split of "
                              f"{saved_tokens:,} tokens, but {self.recipe.data.prepared.path} holds "
                              f"{self._prepared_tokens():,}: the shards changed since (prepared again, or another "
                              f"folder); resume on the shards it trained on, or start a new run from its weights "
                              f"(finetune.init_from)")
        carry = self.recipe.trainer.carry_state
        if state.get("row_streams", False) != carry:
            raise RecipeError(f"trainer.carry_state: the checkpoint was written with carry_state: "
                              f"{str(not carry).lower()}, whose data position (one stream per "
                              f"{'batch row' if not carry else 'worker'}) cannot continue with {str(carry).lower()}")
        streams = max(self.recipe.data.num_workers, 1)
        rank, world = self._rank_world()
        old_ranks, old_streams = len(state["streams"]), state["num_streams"]
        if (old_ranks, old_streams) == (world, streams):
            self.stream_states = state["streams"][rank]
            return
        layout = (f"the checkpoint was written by {old_ranks} data-parallel ranks x {old_streams} streams "
                  f"(data.num_workers), this run has {world} x {streams}")
        if carry:
            raise RecipeError(f"trainer.carry_state: {layout}; carried rows resume only on the same layout")
        if self.recipe.data.source == "text":
            raise RecipeError(f"data.source: {layout}; text streams resume only on the same layout (prepare the "
                              f"data with `mambatrain data prepare` to resume on any layout)")
        new = redivide(TokenStore(self.recipe.data.prepared.path, "train"), state["streams"], old_streams, world,
                       streams)
        self.stream_states = new.states[rank]
        log.info("data layout changed: %s; the %s tokens left in epoch %d of %s are shared among the %d new "
                 "streams (0 tokens skipped, no document read twice in the epoch)%s", layout, f"{new.tokens_left:,}",
                 new.epoch, self.recipe.data.prepared.path, world * streams,
                 f"; {new.ahead} old streams had begun epoch {new.epoch + 1}, whose start they read again"
                 if new.ahead else "")

    def _load_sample_count(self, state: dict) -> None:
        """Synthetic samples are numbered: on any layout the run continues at the next global sample."""
        world = self._rank_world()[1]
        old_world = state.get("data_parallel_ranks", world)  # older checkpoints: written on this layout
        self.first_sample = state.get("samples_consumed", self.start_batch * self.recipe.data.batch_size * old_world)
        if old_world != world:
            log.info("data layout changed: the checkpoint was written by %d data-parallel ranks, this run has %d; "
                     "%s synthetic samples were trained on, the run continues at sample %d (0 skipped, none "
                     "repeated)", old_world, world, f"{self.first_sample:,}", self.first_sample)
