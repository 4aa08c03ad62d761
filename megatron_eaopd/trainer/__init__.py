"""The training loop: sample, score, update, log, checkpoint (and stop cleanly on preemption).

``Trainer`` and ``check_trainer_config`` are imported lazily, so ``trainer.preemption`` stays cheap
to import.
"""

__all__ = ["Trainer", "check_trainer_config"]


def __getattr__(name):
    if name in __all__:
        from megatron_eaopd.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
