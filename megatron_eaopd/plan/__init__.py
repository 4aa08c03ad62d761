"""Memory and communication planning: what one EOPD iteration needs per rank (`memory.py`) and the
`eaopd-plan` command (`cli.py`)."""

from megatron_eaopd.plan.memory import (
    GIB,
    GPUS,
    KEPT,
    UPDATE_PARTS,
    Batch,
    Layout,
    Report,
    Shape,
    combined,
    fits,
    korthikanti_per_layer,
    layer_activation_terms,
    layer_params,
    padded_vocab,
    plan_memory,
    stage_params,
    student_update_terms,
    teacher_kept_bytes,
)

__all__ = [
    "GIB",
    "GPUS",
    "KEPT",
    "UPDATE_PARTS",
    "Batch",
    "Layout",
    "Report",
    "Shape",
    "combined",
    "fits",
    "korthikanti_per_layer",
    "layer_activation_terms",
    "layer_params",
    "padded_vocab",
    "plan_memory",
    "stage_params",
    "student_update_terms",
    "teacher_kept_bytes",
]
