"""The frozen teacher and its scoring pass.

`FrozenTeacher(chunks)` puts the teacher's model chunks in eval mode with requires_grad off and
runs them under torch.no_grad(); it exposes no trainable parameters, so no optimizer (and no
optimizer state) is ever built for it, and it is never wrapped in DDP.

`FrozenTeacher.score(batches, ...)` is the forward-only teacher pass over token sequences (the
student's rollouts) under the teacher's own TP/PP layout, through megatron's pipeline schedule. On
the last pipeline stage it returns, per micro-batch, either the vocab-parallel logits
[s, b, V_pad / tp] or, with `payload_k`, the compact payload of
`megatron_eaopd.losses.vocab_parallel_teacher_payload` (entropy, log-prob of the sampled token,
top-k log-probs and global ids over the real vocabulary). Other stages return an empty list.

`score_for_student` (in :mod:`megatron_eaopd.models.scoring`, re-exported here) routes a student's
micro-batches to a teacher at another layout and the payloads back.
"""

from __future__ import annotations

import torch

from megatron_eaopd.models.scoring import score_for_student

__all__ = ["FrozenTeacher", "score_for_student"]


class FrozenTeacher:
    """A teacher that cannot train: eval mode, no gradients, no optimizer state.

    Args:
        chunks: the teacher's GPTModel chunks on this rank (from `build_model`).
    """

    def __init__(self, chunks):
        self.chunks = list(chunks)
        if not self.chunks:
            raise ValueError("FrozenTeacher needs at least one model chunk")
        for chunk in self.chunks:
            if hasattr(chunk, "no_sync"):
                raise TypeError("pass the bare GPTModel chunks, not a DDP-wrapped model")
            chunk.eval()
            chunk.requires_grad_(False)
            for p in chunk.parameters():
                p.grad = None

    def train(self, mode: bool = True):
        """The teacher stays in eval mode; train(True) is refused."""
        if mode:
            raise RuntimeError("the teacher is frozen: it stays in eval mode")
        return self

    def trainable_parameters(self) -> list:
        """Always empty: nothing of the teacher is optimised."""
        return [p for c in self.chunks for p in c.parameters() if p.requires_grad]

    def __call__(self, *args, chunk: int = 0, **kwargs):
        """Forward of one chunk under torch.no_grad() (see GPTModel.forward for arguments)."""
        with torch.no_grad():
            return self.chunks[chunk](*args, **kwargs)

    def state_dict_for_checkpoint(self):
        """The chunks' sharded state dicts, for `models.checkpoint.load_teacher`."""
        return self.chunks

    def score(
        self,
        batches,
        seq_length: int,
        micro_batch_size: int,
        payload_k: int | None = None,
        *,
        vocab_size: int | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        fused: bool = False,
        fused_chunk_size: int | None = None,
    ) -> list:
        """Forward-only teacher pass over `batches` (one dict per micro-batch).

        Each batch holds "tokens" [b, s] and "position_ids" [b, s] (and "labels" [b, s], the token
        sampled at each position, when `payload_k` is set); optional "attention_mask". Batches
        may differ in width s and rows b (`seq_length` and `micro_batch_size` are then the
        largest; under pipeline parallelism the schedule sends each activation's shape first:
        `models.student.variable_shapes`). Returns on
        the last pipeline stage one entry per micro-batch: logits [s, b, V_pad / tp] (fp32), or
        with `payload_k` a TeacherPayload over the first `vocab_size` columns (the shared real
        vocabulary); an empty list on other stages.

        With `payload_k` and `fused` the last stage runs with its output layer swapped for an
        identity (`losses.output_layer.hidden_states_output`) and the payload comes from the
        final hidden states [s, b, h] and the output weight shard [V_pad / tp, h],
        `fused_chunk_size` tokens at a time (`losses.vocab_parallel_linear_teacher_payload`):
        transient memory one [chunk, V_pad / tp] logits chunk instead of the [s, b, V_pad / tp]
        logits and their fp32 copy. Otherwise the payload kernels read the logits in chunks of
        `chunk_size` tokens. Collectives: the pipeline p2p sends/receives, the model's TP
        all-reduces, and one TP all-gather per micro-batch for the payload (either way).
        Non-finite logits (``NonFiniteLogitsError``) are raised on the last stage after the
        schedule has run every micro-batch, so that no other stage waits on a send.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_eaopd.losses._common import NonFiniteLogitsError
        from megatron_eaopd.losses.output_layer import hidden_states_output, is_last_stage
        from megatron_eaopd.models.student import variable_shapes

        batches = list(batches)
        fuse = fused and payload_k is not None
        failed = []  # non-finite logits: raised after the schedule, not inside it

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            args = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
            weight = None
            if fuse and is_last_stage(model):
                with hidden_states_output(model) as weight:
                    output = model(*args)  # [b, s, h]
            else:
                output = model(*args)

            def collect(out, non_loss_data=True):
                try:
                    return payload(out)
                except NonFiniteLogitsError as err:  # every TP rank of the stage alike
                    failed.append(err)
                    return None

            def payload(out):  # [b, s, V_pad / tp] logits or [b, s, h]
                labels = None
                if payload_k is not None:
                    labels = batch["labels"].transpose(0, 1).contiguous()
                if weight is not None:
                    from megatron_eaopd.losses import vocab_parallel_linear_teacher_payload

                    return vocab_parallel_linear_teacher_payload(
                        out.transpose(0, 1), weight, labels, payload_k, temperature=temperature,
                        vocab_size=vocab_size, chunk_size=fused_chunk_size,
                    )  # fmt: skip
                sb_logits = out.transpose(0, 1).float().contiguous()
                if payload_k is None:
                    return sb_logits
                from megatron_eaopd.losses import vocab_parallel_teacher_payload

                return vocab_parallel_teacher_payload(
                    sb_logits, labels, payload_k, temperature=temperature, vocab_size=vocab_size,
                    chunk_size=chunk_size,
                )  # fmt: skip

            return output, collect

        iterators = iter(batches) if len(self.chunks) == 1 else [iter(batches) for _ in self.chunks]
        with (
            torch.no_grad(),
            variable_shapes(self.chunks, batches, seq_length, micro_batch_size),
        ):
            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators,
                model=self.chunks,
                num_microbatches=len(batches),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
                collect_non_loss_data=True,
            )
        if failed:  # after every micro-batch: the other stages' sends were all received
            raise failed[0]
        return list(out) if out else []
