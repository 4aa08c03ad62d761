"""Final hidden states from a megatron-core GPTModel, for the losses fused with the output layer.

megatron-core 0.16's `GPTModel.forward` has no hidden-state return on the last pipeline stage:
with `post_process=True` it always calls `self.output_layer(hidden_states, weight=output_weight,
runtime_gather_output=...)` and returns `logits.transpose(0, 1)` ([b, s, V_pad / tp]).
`hidden_states_output(model)` swaps the output layer for an identity for the duration of a
forward, so the same call returns the final (normed) hidden states as [b, s, h], and yields the
output layer's weight shard [V_pad / tp, h] (the shared embedding's for tied embeddings) to pass
to `fused.py`. The hidden states then bypass `copy_to_tensor_model_parallel_region` (the output
layer's input all-reduce in backward), which the fused functions perform themselves
(`reduce_hidden_grad=True`). Only the forward needs the swap: backward never calls the module.
"""

from __future__ import annotations

import contextlib

import torch


class _HiddenStates(torch.nn.Module):
    """Stands in for megatron's ColumnParallelLinear output layer: returns its input, under
    sequence parallelism ([s / tp, b, h] per rank) all-gathered over the sequence as the output
    layer does; its backward then keeps this rank's part of the gradient, which the fused loss has
    already all-reduced over TP (``reduce_hidden_grad``). Keeps the layer's ``weight`` as a plain
    attribute (not a parameter of the stand-in): with tied embeddings on a last stage without the
    embedding, GPTModel reads ``output_layer.weight`` in forward."""

    def __init__(self, sequence_parallel: bool = False, tp_group=None, weight=None):
        super().__init__()
        self.sequence_parallel, self.tp_group = sequence_parallel, tp_group
        self.__dict__["weight"] = weight

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return hidden_states, None


def _unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "output_layer"):
        raise ValueError(
            f"{type(model).__name__} has no output_layer: hidden states need the last stage"
        )
    return model


def is_last_stage(model) -> bool:
    """Whether a (possibly DDP / Float16Module-wrapped) GPTModel chunk computes the output layer
    (megatron's ``post_process``: the last pipeline stage)."""
    while not hasattr(model, "post_process") and hasattr(model, "module"):
        model = model.module
    return bool(getattr(model, "post_process", False)) and hasattr(model, "output_layer")


def output_layer_weight(model) -> torch.Tensor:
    """The vocab-parallel output weight [V_pad / tp, h] of a last-stage GPTModel (the shared
    embedding weight when the embeddings are tied)."""
    gpt = _unwrap(model)
    if getattr(gpt, "share_embeddings_and_output_weights", False):
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_output(model):
    """Within the block, `model(...)` returns [b, s, h] final hidden states instead of logits.

    Yields the output weight shard [V_pad / tp, h]. The output layer is restored on exit, also
    on an exception.
    """
    gpt = _unwrap(model)
    weight = output_layer_weight(gpt)
    layer = gpt.output_layer
    gpt.output_layer = _HiddenStates(
        bool(getattr(layer, "sequence_parallel", False)),
        getattr(layer, "tp_group", None),
        getattr(layer, "weight", None),
    )
    try:
        yield weight
    finally:
        gpt.output_layer = layer


__all__ = ["hidden_states_output", "is_last_stage", "output_layer_weight"]
