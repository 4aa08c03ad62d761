"""Deterministic, resumable prompt order for the distillation loop.

Each epoch is a fresh permutation of the prompts, drawn from a generator seeded by ``(seed,
epoch)`` only, so the order does not depend on the global RNG, and a sampler restored from
:meth:`PromptSampler.state_dict` continues exactly where the saved one stopped. Batches never
straddle epochs; the last incomplete batch of an epoch is dropped (the paper: 7,500 MATH prompts at
128 per iteration give 58 iterations per epoch, 174 over 3 epochs).
"""

from __future__ import annotations

import hashlib
import math
import random

__all__ = ["PromptSampler", "length_text", "run_iterations", "total_iterations"]


def total_iterations(num_prompts: int, prompts_per_iteration: int, epochs: float) -> int:
    """Iterations in ``epochs`` passes over ``num_prompts`` (incomplete last batches dropped).

    Raises:
        ValueError: when one iteration needs more prompts than there are.
    """
    per_epoch = num_prompts // prompts_per_iteration
    if per_epoch == 0:
        raise ValueError(
            f"rollout.prompts_per_iteration={prompts_per_iteration} exceeds the {num_prompts} "
            "distillation prompts"
        )
    return max(1, math.floor(per_epoch * epochs + 1e-9))


def run_iterations(cfg, num_prompts: int) -> int:
    """A run's length: ``training.iterations``, else ``training.epochs`` passes over its
    ``num_prompts`` distillation prompts (:func:`total_iterations`; ValueError as there)."""
    t = cfg.training
    return t.iterations or total_iterations(num_prompts, cfg.rollout.prompts_per_iteration,
                                            t.epochs)  # fmt: skip


def length_text(cfg, num_prompts: int) -> str:
    """The line the trainer prints at its start: the run's length and where it comes from (a set
    ``training.iterations`` overrides ``training.epochs``, which base.yaml gives every config)."""
    t, per = cfg.training, cfg.rollout.prompts_per_iteration
    total = run_iterations(cfg, num_prompts)
    per_epoch, left = num_prompts // per, num_prompts % per
    steps = total * (per // cfg.rollout.mini_batch_size)
    source = ("training.iterations (training.epochs is not used)" if t.iterations else
              f"training.epochs={t.epochs:g}")  # fmt: skip
    dropped = f", each leaving out the last {left} of its shuffled order" if left else ""
    return (f"run length: {total} iterations ({steps} optimizer steps, {per} prompts each) from "
            f"{source}: {total / per_epoch:.2f} epochs of {per_epoch} iterations over the "
            f"{num_prompts} distillation prompts{dropped}")  # fmt: skip


class PromptSampler:
    """Batches of prompt indices in a seeded per-epoch shuffled order.

    Args:
        num_prompts: size of the prompt set.
        batch_size: prompts per iteration.
        seed: seed of the order (``training.seed``).
        shuffle: False keeps the file order (every epoch).
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1 or num_prompts < batch_size:
            raise ValueError(
                f"need 1 <= batch_size <= num_prompts, got {batch_size}, {num_prompts}"
            )
        self.num_prompts, self.batch_size = num_prompts, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Complete batches per epoch."""
        return self.num_prompts // self.batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            digest = hashlib.sha256(f"eaopd-prompts/{self.seed}/{epoch}".encode()).digest()
            random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        """The next batch of prompt indices (advances the state)."""
        if self.position + self.batch_size > self.num_prompts:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        """Everything needed to continue the same order (store it in the checkpoint)."""
        return {
            "num_prompts": self.num_prompts,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved position; the prompt set and settings must be the same."""
        for key in ("num_prompts", "batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the prompt order: {key} was {state[key]!r}, now "
                    f"{getattr(self, key)!r}"
                )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
