"""The Mamba state carried from one training micro-batch into the next (trainer.carry_state).

Row i of every batch continues row i of the one before (``data/rows.py``), so each Mamba
layer's state after micro-batch k is the initial state of micro-batch k+1. It is detached
after each forward: gradients stop at the micro-batch edge (truncated backprop through
time), and the graph of the step before is freed. Attention layers carry nothing.

The state is saved in checkpoints, one entry per data-parallel rank (each rank trains its
own rows), as plain tensors on the CPU, so a resumed run continues exactly: per Mamba layer
(B, heads, head_dim, d_state) fp32 (Mamba-2) plus the conv tail and the last document id.
"""

from __future__ import annotations

import logging

import torch

from ..config.schema import RecipeError
from ..data.streaming import gather_across_ranks
from ..models.blocks.mamba import MambaState

log = logging.getLogger("mambatrain")

FIELDS = ("conv", "ssm", "doc")


class CarriedState:
    def __init__(self):
        self.states: list | None = None  # per block: MambaState (Mamba) or None (attention); None until the first step

    def for_batch(self, model, batch_size: int, device) -> list:
        """The states the next training micro-batch continues (zero at the very start)."""
        if self.states is None:
            self.states = model.empty_states(batch_size, device)
        elif self._batch_size() != batch_size:
            raise RecipeError(f"data.batch_size: the carried state has {self._batch_size()} rows, the batch "
                              f"{batch_size}; with trainer.carry_state every batch must have the same rows")
        else:  # loaded from a checkpoint onto the CPU
            for state in self.states:
                if state is not None and state.ssm.device != torch.device(device):
                    state.conv, state.ssm, state.doc = (getattr(state, f).to(device) for f in FIELDS)
        return self.states

    def detach_(self) -> None:
        """Cut the graph at the step edge; a row whose state is no longer finite starts again from zero."""
        for state in self.states or []:
            if state is None:
                continue
            state.detach_()
            # A skipped non-finite step must not poison every later step of that row (no host sync here).
            finite = torch.isfinite(state.ssm.flatten(1)).all(1) & torch.isfinite(state.conv.flatten(1)).all(1)
            state.ssm = torch.where(finite.view(-1, *([1] * (state.ssm.dim() - 1))), state.ssm, 0.0)
            state.conv = torch.where(finite.view(-1, 1, 1), state.conv, 0.0)

    def _batch_size(self) -> int:
        return next(s.doc.shape[0] for s in self.states if s is not None)

    def state_dict(self) -> list:
        """Every data-parallel rank's state, in rank order (all ranks call this at the same checkpoint)."""
        mine = None if self.states is None else [
            None if s is None else {f: getattr(s, f).detach().cpu() for f in FIELDS} for s in self.states]
        return gather_across_ranks(mine)

    def load_state_dict(self, saved: list | None, rank: int, world: int) -> None:
        if saved is None:
            log.warning("the checkpoint holds no carried state (trainer.carry_state was off): every row starts "
                        "from zero state")
            self.states = None
            return
        if len(saved) != world:
            raise RecipeError(f"trainer.devices: the checkpoint's carried state comes from {len(saved)} data-parallel "
                              f"ranks; trainer.carry_state resumes only with as many, got {world}")
        mine = saved[rank]
        self.states = None if mine is None else [None if s is None else MambaState(**s) for s in mine]
