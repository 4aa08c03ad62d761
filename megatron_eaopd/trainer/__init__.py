"""The training loop: sample, score, update, log, checkpoint (and stop cleanly on preemption)."""
