"""Shared settings for the trainer tests: the shipped vocab-parallel CPU config
(configs/tiny-cpu-tp2.yaml: TP 2, the paper's sampled objective) and the overrides that make a run
tiny (two iterations, a few prompts, short responses, a barely trained teacher). The main job's
configs/tiny-cpu.yaml (data-parallel, exact form) is run at reduced size by test_main_job.py."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu-tp2.yaml")
TINY_CPU = os.path.join(ROOT, "configs", "tiny-cpu.yaml")  # the main job's config

TINY_RUN = [
    "training.iterations=2",
    "training.eval_interval=2",
    "training.checkpoint_interval=2",
    "rollout.max_response_tokens=24",
    "eval.max_prompts=2",
    "eval.k=2",
    "eval.max_response_tokens=24",
    "teacher_prep.iterations=4",
    "teacher_prep.batch_size=8",
    "task.synthetic.num_train=64",
    "task.synthetic.num_distill=16",
    "task.synthetic.num_eval=4",
    "logging.progress_bars=false",
    "logging.console=false",
]


def one_iteration(tmp: str, name: str) -> list[str]:
    """Overrides (after TINY_RUN) for one iteration of 4 prompts, evaluated and saved, into
    ``<tmp>/<name>``, with the tokenizer and prepared models cached under ``tmp`` (shared by
    the runs a test compares)."""
    return [
        "rollout.prompts_per_iteration=4",
        "rollout.mini_batch_size=4",
        "rollout.micro_batch_size=4",
        "student_prep.iterations=2",
        "student_prep.batch_size=8",
        "training.iterations=1",
        "optimizer.warmup_iterations=1",  # at most the run's one optimizer step
        "training.eval_interval=1",
        "training.checkpoint_interval=1",
        f"training.output_dir={tmp}/{name}",
        f"teacher_prep.cache_dir={tmp}/teachers",
        f"student_prep.cache_dir={tmp}/students",
        f"tokenizer.cache_dir={tmp}/tokenizers",
    ]


class StopAfter:
    """A preemption handler stand-in: asks to stop from its `n`-th poll on (the same on every
    rank)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def random_rollouts(prompt_lens, response_lens, vocab: int, gen):
    """A RolloutBatch with the given [rows] prompt and response lengths, random token ids in
    [1, vocab) and old log-probs in [-4, -0.05] at response positions, drawn from `gen` row by
    row (ids, then log-probs)."""
    import torch

    from megatron_eaopd.rollout import RolloutBatch

    rows = len(prompt_lens)
    width = int((prompt_lens + response_lens).max())
    tokens = torch.zeros(rows, width, dtype=torch.long)
    logprobs = torch.zeros(rows, width)
    for i in range(rows):
        n = int(prompt_lens[i] + response_lens[i])
        tokens[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        logprobs[i, prompt_lens[i] : n] = -0.05 - 3.95 * torch.rand(
            int(response_lens[i]), generator=gen
        )
    return RolloutBatch(
        tokens=tokens, prompt_lens=prompt_lens, response_lens=response_lens, logprobs=logprobs,
        entropies=torch.zeros(rows, width), finished=torch.ones(rows, dtype=torch.bool),
    )  # fmt: skip


def tiny_config(tmp_path, *overrides):
    """The main job's config (configs/tiny-cpu.yaml) with every cache and the run folder under
    ``tmp_path``, then ``overrides``."""
    from megatron_eaopd.config import load_config

    caches = [f"tokenizer.cache_dir={tmp_path / 'tok'}", f"teacher_prep.cache_dir={tmp_path / 't'}",
              f"student_prep.cache_dir={tmp_path / 's'}",
              f"training.output_dir={tmp_path / 'out'}"]  # fmt: skip
    return load_config(TINY_CPU, [*caches, *overrides])
