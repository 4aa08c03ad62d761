"""Shared settings for the trainer tests: the shipped vocab-parallel CPU config
(configs/tiny-cpu-tp2.yaml: TP 2, the paper's sampled objective) and the overrides that make a run
tiny (two iterations, a few prompts, short responses, a barely trained teacher). The main job's
configs/tiny-cpu.yaml (data-parallel, exact form) is run at reduced size by test_main_job.py."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu-tp2.yaml")

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
