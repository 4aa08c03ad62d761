"""Megatron sequence parallelism (``parallel.sequence_parallel``) for the models of ``builder``.

With ``TransformerConfig(sequence_parallel=True)`` and TP > 1, megatron-core 0.16 keeps the
activations outside the tensor-parallel regions (embedding output, residual stream, norms, dropout)
split over the sequence: each TP rank holds ``s / tp`` positions. The embedding reduce-scatters
instead of all-reducing, every ``ColumnParallelLinear`` all-gathers its input over the sequence
(and reduce-scatters the input gradient), every ``RowParallelLinear`` reduce-scatters its output
instead of all-reducing it, and the output layer (a ``ColumnParallelLinear``) gathers the sequence
back before the vocabulary projection, so the logits are ``[b, s, V_pad / tp]`` exactly as
without it. Same communication volume, ``1 / tp`` of the activation memory outside attention and
MLP. Three things follow, handled here and by the callers:

* **Norms.** The norm weights (and LayerNorm biases, and row-parallel linear biases) see only
  this rank's positions, so their gradients are partial sums: megatron's ``finalize_model_grads``
  all-reduces over TP every parameter tagged ``sequence_parallel = True`` (when
  ``config.sequence_parallel`` is true at that time). TE and apex norms tag their weights; the
  local spec's torch norm (``WrappedTorchNorm``) refuses sequence parallelism instead, so
  :func:`local_layer_spec` builds the local spec with :class:`SequenceParallelTorchNorm`: the same
  ``torch.nn.LayerNorm`` / ``RMSNorm``, its parameters tagged. This is what makes sequence
  parallelism run on CPU; the collectives (``reduce_scatter_tensor``, ``all_gather_into_tensor``)
  are supported by gloo in torch 2.13.
* **Sequence length.** The sequence dim must be a multiple of tp: the training micro-batches are
  padded at the end (``trainer.batches.collate(..., multiple=sequence_multiple(...))``; the padded
  positions are masked out of the loss and, with causal attention, change no other position).
* **Decoding.** A KV-cache decode step feeds one position, which cannot be split over tp ranks.
  :func:`sequence_parallel_off` switches sequence parallelism off in a built model for a block
  (``rollout.generate`` wraps every generation in it): megatron reads the flag from
  ``config.sequence_parallel`` at every forward
  (embedding, transformer block, rotary length, pipeline tensor shapes) and from attributes fixed
  when the layers were built (``sequence_parallel`` on linear layers and TE modules,
  ``reduce_scatter_embeddings`` on the embedding, ``allreduce_dgrad`` on column-parallel linears);
  all are switched and restored. The weights are the same either way, so the model computes the
  same function with the flag on or off.

The student is built with it when ``parallel.sequence_parallel`` is true; the teacher is not (its
scoring pass runs through the fused output-layer path on arbitrary lengths and saves little
activation memory being forward-only).
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "SequenceParallelTorchNorm",
    "is_sequence_parallel",
    "local_layer_spec",
    "sequence_multiple",
    "sequence_parallel_off",
]


class SequenceParallelTorchNorm:
    """megatron's ``WrappedTorchNorm`` without its sequence-parallel refusal: a torch
    ``LayerNorm`` / ``RMSNorm`` whose parameters carry ``sequence_parallel`` (the config's value)
    so that ``finalize_model_grads`` all-reduces their gradients over TP under sequence
    parallelism. Numerically identical to ``WrappedTorchNorm`` (the same torch module)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(
                f"normalization={config.normalization!r}: only LayerNorm and RMSNorm are supported"
            )
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def local_layer_spec(qk_layernorm: bool, normalization: str, num_layers: int):
    """megatron's local GPT spec with every norm a :class:`SequenceParallelTorchNorm`, as a
    ``TransformerBlock`` spec of ``num_layers`` layers (the final norm is the block's)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    sub = layer.submodules
    sub.input_layernorm = SequenceParallelTorchNorm
    sub.pre_mlp_layernorm = SequenceParallelTorchNorm
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn, name) is not IdentityOp:
            setattr(attn, name, SequenceParallelTorchNorm)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm
        ),
    )


def _bare_modules(models) -> list:
    """The GPTModels inside chunk lists, FrozenTeachers and DDP / Float16Module wrappers."""
    out = []
    stack = list(models)
    while stack:
        m = stack.pop(0)
        if m is None:
            continue
        if isinstance(m, (list, tuple)):
            stack[:0] = list(m)
            continue
        if hasattr(m, "chunks") and not isinstance(m, torch.nn.Module):  # FrozenTeacher
            stack[:0] = list(m.chunks)
            continue
        while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
            m = m.module
        if all(m is not seen for seen in out):
            out.append(m)
    return out


def is_sequence_parallel(*models) -> bool:
    """Whether any of the models (chunks, lists, wrappers) runs with sequence parallelism now."""
    return any(getattr(getattr(m, "config", None), "sequence_parallel", False)
               for m in _bare_modules(models))  # fmt: skip


def sequence_multiple(*models) -> int:
    """What the sequence length of a forward must be a multiple of: the least common multiple of
    the TP sizes of the models that run with sequence parallelism (1 when none does)."""
    multiple = 1
    for m in _bare_modules(models):
        cfg = getattr(m, "config", None)
        if getattr(cfg, "sequence_parallel", False):
            multiple = math.lcm(multiple, int(cfg.tensor_model_parallel_size))
    return multiple


@contextlib.contextmanager
def sequence_parallel_off(*models):
    """Run the block with sequence parallelism switched off in the given built models.

    Switches ``config.sequence_parallel`` of every module config, every module's boolean
    ``sequence_parallel`` attribute (megatron's and TE's linear layers, apex/TE norms, TE
    attention), the embeddings' ``reduce_scatter_embeddings``, and sets ``allreduce_dgrad`` of
    megatron's column-parallel linears to its non-sequence-parallel value; everything is restored
    on exit, also on an exception. Parameters keep their ``sequence_parallel`` tags (they matter
    only to ``finalize_model_grads``, which reads the config too). A no-op for models without
    sequence parallelism. No communication.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    saved: list[tuple[object, str, object]] = []

    def switch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    on = [m for m in _bare_modules(models)
          if getattr(getattr(m, "config", None), "sequence_parallel", False)]  # fmt: skip
    configs: list = []
    try:
        for model in on:
            for sub in model.modules():
                cfg = getattr(sub, "config", None)
                if getattr(cfg, "sequence_parallel", False) and all(cfg is not c for c in configs):
                    configs.append(cfg)
                if getattr(sub, "sequence_parallel", None) is True:
                    switch(sub, "sequence_parallel", False)
                if getattr(sub, "reduce_scatter_embeddings", None) is True:
                    switch(sub, "reduce_scatter_embeddings", False)
                if isinstance(sub, ColumnParallelLinear):
                    tp = sub.tp_group.size() if sub.tp_group is not None else 1
                    reduce = not getattr(sub, "disable_grad_reduce", False)
                    switch(sub, "allreduce_dgrad", tp > 1 and reduce)
        for cfg in configs:
            switch(cfg, "sequence_parallel", False)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
