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
"""

from __future__ import annotations

import torch


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
    ) -> list:
        """Forward-only teacher pass over `batches` (one dict per micro-batch).

        Each batch holds "tokens" [b, s] and "position_ids" [b, s] (and "labels" [b, s], the token
        sampled at each position, when `payload_k` is set); optional "attention_mask". Returns on
        the last pipeline stage one entry per micro-batch: logits [s, b, V_pad / tp] (fp32), or
        with `payload_k` a TeacherPayload over the first `vocab_size` columns (the shared real
        vocabulary); an empty list on other stages. Collectives: the pipeline p2p sends/receives,
        the model's TP all-reduces, and one TP all-gather per micro-batch for the payload.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = list(batches)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

            def collect(logits, non_loss_data=True):  # logits: [b, s, V_pad / tp]
                sb_logits = logits.transpose(0, 1).float().contiguous()
                if payload_k is None:
                    return sb_logits
                from megatron_eaopd.losses import vocab_parallel_teacher_payload

                labels = batch["labels"].transpose(0, 1).contiguous()
                return vocab_parallel_teacher_payload(
                    sb_logits, labels, payload_k, temperature=temperature, vocab_size=vocab_size
                )

            return output, collect

        iterators = iter(batches) if len(self.chunks) == 1 else [iter(batches) for _ in self.chunks]
        with torch.no_grad():
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
        return list(out) if out else []


def score_for_student(
    teacher: FrozenTeacher,
    batches,
    *,
    k: int,
    vocab_size: int,
    teacher_layout: str = "teacher",
    student_layout: str = "student",
    temperature: float = 1.0,
) -> list:
    """Score the student's micro-batches with a teacher that runs under its own TP/PP layout.

    Call on every rank, under any layout, with this rank's student micro-batches (the same on all
    ranks of one student data-parallel replica): dicts of "tokens", "labels", "position_ids", each
    [b, s]. Layouts are names registered with `parallel.init.initialize_layouts`.

    1. Under the student layout, the micro-batches of all student DP replicas are all-gathered
       (one all-gather over the student DP group): the global batch of G = dp_s * M micro-batches.
    2. Under the teacher layout, teacher DP replica r scores micro-batches [r * G / dp_t, (r + 1) *
       G / dp_t) through its pipeline (`FrozenTeacher.score` with the payload).
    3. The payloads travel in one fp32 all-reduce (SUM) over the world of [G, s, b, 2 + 2k]
       (entropy, sampled-token log-prob, top-k log-probs, top-k ids; ids are exact in fp32 below
       2**24), filled by TP rank 0 of each teacher replica's last stage.

    Returns this rank's M TeacherPayloads (entropy [s, b], token_logprobs [s, b], topk_logprobs
    [s, b, k], topk_ids [s, b, k] int64), identical on every rank of the student replica.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eaopd.losses import TeacherPayload
    from megatron_eaopd.parallel.init import compute_device, use_layout

    if vocab_size >= 2**24:
        raise ValueError(f"vocab_size={vocab_size} too large for the fp32 id transport (< 2**24)")
    batches = list(batches)
    keys = ("tokens", "labels", "position_ids")
    device = compute_device()
    local = torch.stack([torch.stack([b[key] for key in keys]) for b in batches]).to(device)
    num_local, _, mbs, seq = local.shape
    with use_layout(student_layout):
        dp_s, dp_rank_s = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        # [dp_s * M, 3, b, s], ordered by student DP rank
        shape = (dp_s * num_local,) + tuple(local.shape[1:])
        everything = torch.empty(shape, dtype=local.dtype, device=device)
        dist.all_gather_into_tensor(
            everything, local.contiguous(), group=ps.get_data_parallel_group()
        )
    total = everything.shape[0]
    width = 2 + 2 * k
    buffer = torch.zeros(total, seq, mbs, width, device=device)
    with use_layout(teacher_layout):
        dp_t, dp_rank_t = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if total % dp_t != 0:
            raise ValueError(
                f"{total} micro-batches in the global batch do not split over the teacher's "
                f"{dp_t} data-parallel replicas: make micro-batches per student replica x student "
                f"DP size a multiple of the teacher DP size."
            )
        share = total // dp_t
        start = dp_rank_t * share
        mine = [dict(zip(keys, everything[i].unbind(0))) for i in range(start, start + share)]
        payloads = teacher.score(
            mine, seq, mbs, payload_k=k, vocab_size=vocab_size, temperature=temperature
        )
        if payloads and ps.get_tensor_model_parallel_rank() == 0:
            for i, p in enumerate(payloads):
                buffer[start + i, :, :, 0] = p.entropy
                buffer[start + i, :, :, 1] = p.token_logprobs
                buffer[start + i, :, :, 2 : 2 + k] = p.topk_logprobs
                buffer[start + i, :, :, 2 + k :] = p.topk_ids.float()
    dist.all_reduce(buffer)
    mine = buffer[dp_rank_s * num_local : (dp_rank_s + 1) * num_local]
    return [
        TeacherPayload(
            m[..., 0], m[..., 1], m[..., 2 : 2 + k].contiguous(), m[..., 2 + k :].round().long()
        )
        for m in mine
    ]
