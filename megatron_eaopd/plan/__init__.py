"""Memory and communication planning: what one EOPD iteration needs per rank (`memory.py`) and the
`eaopd-plan` command (`cli.py`)."""

from megatron_eaopd.plan.memory import (
    GIB,
    GPUS,
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
)

__all__ = [
    "GIB",
    "GPUS",
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
]
