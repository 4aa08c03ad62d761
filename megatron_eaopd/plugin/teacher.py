"""A frozen EOPD teacher inside a parallel state the caller already owns.

    teacher = EOPDTeacher.load("checkpoints/hf/Qwen3-8B", tp=2, pp=2)   # after the caller's
                                                                        # initialize_model_parallel
    teacher.attach(micro_batches, k=16, vocab_size=V)    # every rank, before the schedule runs

The caller's current megatron state is registered as the layout ``"eopd_student"`` and the
teacher gets its own groups (``"eopd_teacher"``) at its own TP x PP on the same ranks; the caller's
state, megatron's RNG tracker and torch's RNG are left as they were. The teacher runs under its
layout only inside :meth:`EOPDTeacher.score` / :meth:`attach` / :meth:`attach_logits`.
"""

from __future__ import annotations

import os

__all__ = ["STUDENT_LAYOUT", "TEACHER_LAYOUT", "EOPDTeacher"]


STUDENT_LAYOUT, TEACHER_LAYOUT = "eopd_student", "eopd_teacher"


class EOPDTeacher:
    """A loaded, frozen teacher and the two layouts it is scored between.

    Build it with :meth:`load`. Attributes: ``frozen`` (the ``models.teacher.FrozenTeacher``),
    ``model_config`` (its ``models.ModelConfig``), ``layout`` (its ``ParallelLayout``).
    """

    def __init__(self, frozen, model_config, layout):
        self.frozen, self.model_config, self.layout = frozen, model_config, layout
        self._tp_checked = False  # attach_logits' first call compares the TP ranks' tokens

    @classmethod
    def load(
        cls,
        source: str,
        *,
        tp: int | None = None,
        pp: int | None = None,
        model_config=None,
        dtype: str | None = None,
        seed: int = 1234,
        timeout_minutes: int | None = None,
    ) -> EOPDTeacher:
        """Build and load the teacher at (tp, pp) (default: the caller's current TP and PP).

        Args:
            source: a Hugging Face folder (config.json + safetensors; the shape comes from
                config.json) or a project checkpoint root (``eaopd-convert import-hf`` output or a
                trainer checkpoint; the shape recorded with it, or ``model_config``).
            model_config: a ``models.ModelConfig`` for checkpoints that record none.
            dtype: 'float32' / 'bfloat16' (default: the source's).
            timeout_minutes: of the teacher layout's process groups; default: your default
                group's (Megatron-LM's ``--distributed-timeout-minutes``).
        Collectives: the new groups of the teacher layout (every rank must call this with the same
        arguments), then the weight loading's (none for HF folders: each rank reads its slices).
        """
        from megatron.core import parallel_state as ps

        from megatron_eaopd.parallel.init import (
            _ACTIVE,
            register_current_layout,
        )

        if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
            raise ValueError(
                f"EOPDTeacher.load: the teacher {source!r} is not a folder: pass a Hugging Face "
                "model folder or a project checkpoint root (Megatron-LM: --eopd-teacher DIR)"
            )

        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "EOPDTeacher.load needs megatron's model parallelism initialised first "
                "(initialize_megatron / initialize_model_parallel), on every rank at the same "
                "point: load the teacher before training (e.g. in model_provider), never inside "
                "forward_step, where pipeline stages arrive at different times"
            )
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        if "model-parallel-rng" not in get_cuda_rng_tracker().get_states():
            raise RuntimeError(
                "EOPDTeacher.load needs megatron's RNG tracker seeded (its teacher forward runs in "
                "the tracker's model-parallel region): call megatron.core.tensor_parallel."
                "model_parallel_cuda_manual_seed(seed) after initialize_model_parallel "
                "(Megatron-LM's initialize_megatron does)"
            )
        for name, value in (("tp", tp), ("pp", pp)):
            if value is not None and value < 1:
                raise ValueError(f"EOPDTeacher.load: {name} must be >= 1 or None, got {value}")
        if ps.get_context_parallel_world_size() > 1:
            raise ValueError(
                "context parallelism (CP > 1) is not supported: the teacher payload and the loss "
                "take whole sequences per rank"
            )
        if _ACTIVE[0] != STUDENT_LAYOUT:
            register_current_layout(STUDENT_LAYOUT)
        tp = ps.get_tensor_model_parallel_world_size() if tp is None else tp
        pp = ps.get_pipeline_model_parallel_world_size() if pp is None else pp
        hf = os.path.isfile(os.path.join(source, "config.json"))
        if hf:
            from megatron_eaopd.models.hf import model_config_from_hf

            model_config = model_config_from_hf(source, params_dtype=dtype)
        else:
            from megatron_eaopd.models.checkpoint import read_model_config

            recorded, _ = read_model_config(source)
            model_config = model_config or recorded
            if model_config is None:
                raise ValueError(
                    f"{source}: the checkpoint records no model config; pass model_config="
                )
            if dtype:
                model_config = model_config.with_changes(params_dtype=dtype)
        model_config.check_layout(tp, pp, None, name="teacher")
        import torch

        # torch's CPU generator and the current CUDA device's are restored: the caller's next
        # draws do not depend on the teacher
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            return cls._build(model_config, tp, pp, seed, timeout_minutes, hf, source)

    @classmethod
    def _build(cls, model_config, tp, pp, seed, timeout_minutes, hf, source):
        from megatron_eaopd.models import build_model
        from megatron_eaopd.models.teacher import FrozenTeacher
        from megatron_eaopd.parallel.init import add_layout, use_layout

        layout = add_layout(TEACHER_LAYOUT, tp, pp, None, seed=seed,
                            timeout_minutes=timeout_minutes)  # fmt: skip
        with use_layout(TEACHER_LAYOUT):
            frozen = FrozenTeacher(build_model(model_config))
            if hf:
                from megatron_eaopd.models.hf import load_hf_weights

                load_hf_weights(frozen, source)
            else:
                from megatron_eaopd.models.checkpoint import load_teacher

                load_teacher(source, frozen)
        return cls(frozen, model_config, layout)

    def score(self, micro_batches, *, k: int = 16, vocab_size: int, temperature: float = 1.0):
        """The compact payload of each of this rank's micro-batches ("tokens", "labels" [b, s]).

        Call on every rank with the micro-batches of its data-parallel replica (replicas may
        differ in count and shape). Returns, on the caller's last pipeline stage, TeacherPayloads
        in the loss's [s, b] / [s, b, k] layout; None on other stages. Collectives: those of
        ``models.scoring.score_for_student`` (point to point; no vocabulary-sized transfer).
        """
        from megatron_eaopd.models.scoring import score_for_student

        return score_for_student(
            self.frozen, micro_batches, k=k, vocab_size=vocab_size,
            teacher_layout=TEACHER_LAYOUT, student_layout=STUDENT_LAYOUT,
            temperature=temperature,
        )  # fmt: skip

    def attach(self, micro_batches, *, k: int = 16, vocab_size: int, temperature: float = 1.0):
        """:meth:`score`, then store each payload under ``mb["teacher"]`` in the [b, s] layout
        the plugin's ``loss_func`` reads (None on stages other than the last), and on every rank
        the width ``k`` under ``mb["teacher_k"]`` and ``temperature`` under
        ``mb["teacher_temperature"]`` (``check_micro_batch`` compares them with the objective's
        top_k and temperature on every pipeline stage: a payload scored at another temperature
        than the loss's would be silently wrong)."""
        from megatron_eaopd.trainer.batches import attach_teacher

        attach_teacher(
            micro_batches,
            self.score(micro_batches, k=k, vocab_size=vocab_size, temperature=temperature),
        )
        for mb in micro_batches:
            mb["teacher_k"], mb["teacher_temperature"] = k, temperature

    def attach_logits(self, micro_batches, *, fused: bool = False) -> None:
        """Exact form: store the teacher's logits shard [b, s, V_pad / tp] (fp32) under
        ``mb["teacher"]``, or with ``fused`` (for ``eopd_forward_step(..., fused=True)``) the
        pair (final hidden states [b, s, h_t], output weight shard [V_pad / tp, h_t]): no
        teacher logits are kept, the fused loss recomputes them chunk by chunk. Needs the
        teacher's TP group to be the caller's and no teacher pipeline (ValueError otherwise).
        Collectives: the teacher forward's TP all-reduces."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_eaopd.losses.output_layer import hidden_states_output
        from megatron_eaopd.parallel.init import use_layout
        from megatron_eaopd.plugin.forward import check_micro_batch
        from megatron_eaopd.trainer.batches import on_device

        mine = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        with use_layout(TEACHER_LAYOUT):
            theirs = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        if mine != theirs or self.layout.pp != 1:
            raise ValueError(
                "the exact form needs the teacher at the caller's TP size without pipeline "
                f"parallelism (teacher tp={self.layout.tp}, pp={self.layout.pp}); use the "
                "sampled form (attach) for other layouts"
            )
        rows = self.model_config.vocab_size
        for mb in micro_batches:  # local to the TP group: a local error leaves no one waiting
            check_micro_batch(mb)
            tokens = mb.get("tokens")
            if not isinstance(tokens, torch.Tensor):
                raise ValueError(
                    "attach_logits: a micro-batch without tokens (Megatron-LM's get_batch gives "
                    "them only to the first pipeline stage): build the micro-batches with "
                    "tokens on the last stage, or use PP 1 for offline distillation"
                )
            lo, hi = torch.stack(torch.aminmax(tokens)).tolist() if tokens.numel() else (0, 0)
            if not 0 <= lo <= hi < rows:  # one host transfer per micro-batch
                raise ValueError(
                    f"attach_logits: token ids {lo}..{hi} outside "
                    f"the teacher's vocabulary [0, {rows}): the data was tokenized with another "
                    "tokenizer than the teacher's"
                )  # a padding row's logits (or, past them, a device-side assert on GPU)
        with use_layout(TEACHER_LAYOUT):
            for mb in micro_batches:
                dev = on_device({"tokens": mb["tokens"], "position_ids": mb["position_ids"]})
                if not self._tp_checked:
                    _check_same_tokens(dev["tokens"], ps.get_tensor_model_parallel_group())
                    self._tp_checked = True
                args = (dev["tokens"], dev["position_ids"], None)
                if fused:
                    with hidden_states_output(self.frozen.chunks[0]) as weight:
                        mb["teacher"] = (self.frozen(*args), weight)
                else:
                    mb["teacher"] = self.frozen(*args).float()


def _check_same_tokens(tokens, group) -> None:
    """The TP ranks of a group must hold the same micro-batch (Megatron-LM's get_batch
    broadcasts it; a hand-built loop may shard it by global rank): each rank's shape and token
    checksum are compared. Different ones computed a finite, silently wrong loss. Collectives:
    one all-gather of [4] int64 over ``group`` (attach_logits' first micro-batch only)."""
    import torch
    import torch.distributed as dist

    t = tokens.long()
    weights = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.long)
    checksum = int((t.reshape(-1) * weights).sum())  # order-sensitive: a permutation differs
    mine = torch.tensor([t.shape[0], t.shape[-1], checksum, int(t.sum())], device=t.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    if any(not torch.equal(other, mine) for other in everyone):
        raise ValueError(
            "attach_logits: the tensor-parallel ranks of one group hold different micro-batches; "
            "every TP rank must see the same tokens (Megatron-LM's get_batch broadcasts them "
            "within the group): shard the data by data-parallel rank, not by global rank"
        )
