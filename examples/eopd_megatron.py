"""EOPD in a training script written against megatron-core only (the shape of Megatron-LM's
pretrain_gpt.py: its own model, data iterator, optimizer and schedule), with the plugin.

    torchrun --nproc-per-node 2 examples/eopd_megatron.py --teacher TEACHER_HF_DIR \
        --mode onpolicy --tp 2 --steps 20 --eopd-tau 0.8 --eopd-topk 16

--mode offline: teacher-forced on fixed token sequences (the ModelOpt style; objective fkl by
default, or --eopd-objective eopd_exact for full-vocabulary logit distillation with the teacher
at the student's TP). --mode onpolicy: the student samples responses to prompts
(megatron_eaopd.rollout), the teacher scores them (the paper's EOPD by default). On CPU (no
CUDA) it runs over gloo with megatron_eaopd.compat's CPU layer. Prints one JSON line per step
({"step", "loss", ...}).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_eaopd.plugin import (
    EOPDTeacher,
    add_eopd_args,
    check_offline,
    eopd_forward_step,
    eopd_settings_from_args,
    offline_micro_batches,
    rollout_micro_batches,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher HF folder or checkpoint")
    p.add_argument("--mode", choices=("offline", "onpolicy"), default="onpolicy")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (per DP replica)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=24, help="offline sequence / prompt+response length")
    p.add_argument("--seed", type=int, default=1)
    add_eopd_args(p)
    args = p.parse_args(argv)
    if args.eopd_teacher is None:
        args.eopd_teacher = args.teacher
    if args.eopd_objective is None and args.mode == "offline":
        args.eopd_objective = "fkl"
    return args


def build_student(padded_vocab: int, tp: int) -> GPTModel:
    """The user's own model: a small GPT with megatron-core's local layer spec."""
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, tensor_model_parallel_size=tp,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=torch.float32,
        pipeline_dtype=torch.float32, calculate_per_token_loss=True,  # EOPD's token mean
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )  # fmt: skip
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab, max_sequence_length=256, pre_process=True, post_process=True,
        position_embedding_type="rope", share_embeddings_and_output_weights=True,
    )  # fmt: skip
    return model.cuda() if torch.cuda.is_available() else model


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = eopd_settings_from_args(args)
    objective = settings.objective
    if args.mode == "offline":
        check_offline(objective)
    if not torch.cuda.is_available():
        from megatron_eaopd.compat import enable_cpu_compat

        enable_cpu_compat()
    if torch.cuda.is_available():  # one GPU per process: LOCAL_RANK's (torchrun, srun)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)

    teacher = EOPDTeacher.load(
        settings.teacher, tp=settings.teacher_tp, pp=settings.teacher_pp, dtype="float32"
    )
    vocab = teacher.model_config.vocab_size  # the shared vocabulary (teacher's config.json)

    # the exact form pairs vocabulary shards: pad the student's embedding as the teacher's
    model = build_student(teacher.model_config.padded_vocab_size(args.tp), args.tp)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
    )  # fmt: skip
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    # megatron's gradient clipping asserts CUDA tensors: clip on GPU only
    clip = 1.0 if torch.cuda.is_available() else 0.0
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=clip), [ddp]
    )

    gen = torch.Generator().manual_seed(args.seed * 1000 + ps.get_data_parallel_rank())
    fixed = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)  # offline data
    prompts = [torch.randint(0, vocab, (6,), generator=gen).tolist() for _ in range(args.batch)]
    forward_step = eopd_forward_step(objective, vocab)
    rank0 = dist.get_rank() == 0
    for step in range(args.steps):
        if args.mode == "offline":
            micro = offline_micro_batches(fixed, torch.ones_like(fixed, dtype=torch.bool),
                                          args.micro_batch)  # fmt: skip
        else:
            from megatron_eaopd.rollout import SamplingParams, generate

            rollouts = generate(
                ddp, prompts, max_new_tokens=args.seq - 6, eos_id=-1, pad_id=0, vocab_size=vocab,
                params=SamplingParams(temperature=objective.temperature), generator=gen,
            )  # fmt: skip
            micro = rollout_micro_batches(rollouts, pad_id=0, micro_batch_size=args.micro_batch)
        if objective.form == "exact":  # full-vocabulary KL: the teacher's logits shard
            teacher.attach_logits(micro, fused=bool(objective.fused_output))
        else:  # the compact payload (entropy, sampled-token log-prob, top-k)
            teacher.attach(micro, k=objective.top_k, vocab_size=vocab,
                           temperature=objective.temperature)  # fmt: skip
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
            num_microbatches=len(micro), seq_length=micro[0]["tokens"].shape[1],
            micro_batch_size=args.micro_batch, forward_only=False,
        )  # fmt: skip
        optimizer.step()
        # Megatron-LM's reduction of the reported [numerator, denominator] pairs
        sums = {k: torch.stack([r[k] for r in reported]).sum(0).double() for k in reported[0]}
        for v in sums.values():
            dist.all_reduce(v, group=ps.get_data_parallel_group())
        line = {k: float(v[0] / v[1]) for k, v in sums.items() if v[1] > 0}
        if rank0:
            print(json.dumps({"step": step, **line}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("EAOPD_COMPILE", "0")
    raise SystemExit(main())
