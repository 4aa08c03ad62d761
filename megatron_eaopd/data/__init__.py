"""Tasks (prompt sets with answer checking), the built-in synthetic task, and tokenizers."""

from megatron_eaopd.data.answers import check_answer, extract_boxed, normalize_answer
from megatron_eaopd.data.jsonl import JsonlTask, read_prompt_file
from megatron_eaopd.data.prepare import PreparedData, prepare_data
from megatron_eaopd.data.synthetic import SyntheticArithmeticTask
from megatron_eaopd.data.task import (
    Problem,
    Task,
    TaskError,
    import_task_class,
    load_task,
    validate_prompt_lengths,
)
from megatron_eaopd.data.tokenizer import Tokenizer, build_tokenizer, train_tokenizer

__all__ = [
    "JsonlTask",
    "PreparedData",
    "Problem",
    "SyntheticArithmeticTask",
    "Task",
    "TaskError",
    "Tokenizer",
    "build_tokenizer",
    "check_answer",
    "extract_boxed",
    "import_task_class",
    "load_task",
    "normalize_answer",
    "prepare_data",
    "read_prompt_file",
    "train_tokenizer",
    "validate_prompt_lengths",
]
