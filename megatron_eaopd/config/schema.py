"""The typed configuration schema of megatron-eaopd.

One tree of dataclasses, filled from YAML by :mod:`megatron_eaopd.config.loader`. Every field
carries an attribute docstring (the string literal right below it); the reference in
``docs/configs.md`` is generated from them (:func:`megatron_eaopd.config.loader.describe_fields`).
Range and choice constraints live in the field's metadata (see :func:`_f`) and are checked by the
loader, which names the field path on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("opd", "eopd", "eopd_exact", "eopd_soft", "mix", "fkl", "jsd")
DTYPES = ("fp32", "bf16", "fp16")
NORMS = ("rmsnorm", "layernorm")


_MAX_SEED = 2**32 - 1  # torch and numpy seeds; derived seeds (seed x 1,000,003 + i) stay in int64


def _f(default: Any = None, *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with validation metadata (ge, gt, le, lt, choices)."""
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The shape of one decoder-only transformer (student or teacher)."""

    layers: int = _f(2, ge=1)
    """Number of transformer layers."""
    hidden: int = _f(64, ge=1)
    """Hidden size (model width)."""
    heads: int = _f(4, ge=1)
    """Number of attention (query) heads."""
    query_groups: int = _f(4, ge=1)
    """Number of key/value heads (GQA groups); equal to ``heads`` for plain multi-head attention."""
    ffn_hidden: int = _f(256, ge=1)
    """Inner size of the MLP (per branch of the gated SwiGLU MLP)."""
    vocab_size: int = _f(0, ge=0)
    """Embedding rows as the checkpoint defines them (HF config's vocab_size; may exceed the
    tokenizer's real vocabulary, Megatron pads further); 0: the tokenizer's vocabulary size."""
    max_seq_len: int = _f(0, ge=0)
    """Longest sequence (prompt + response tokens); 0: derived when the config is loaded, as
    rollout.max_prompt_tokens + the larger of rollout/eval max_response_tokens."""
    rope_base: float = _f(10000.0, gt=0)
    """RoPE base frequency (Qwen3: 1e6)."""
    norm: str = _f("rmsnorm", choices=NORMS)
    """Normalisation layer: rmsnorm or layernorm."""
    tied_embeddings: bool = True
    """Share the input embedding and the output projection weights."""
    dtype: str = _f("fp32", choices=DTYPES)
    """Parameter and compute dtype: fp32, bf16 or fp16. bf16 on a GPU needs compute capability
    8.0 or later (A100, H100; refused on V100 and T4: use fp16)."""
    kv_channels: int | None = _f(None, ge=1)
    """Per-head dimension; null means hidden // heads (Qwen3 uses 128 at every size)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before attention (Qwen3 does)."""
    norm_eps: float = _f(1e-6, gt=0)
    """Epsilon of the normalisation layers."""


@dataclass
class ModelsConfig:
    """The student and teacher pair."""

    student: ModelConfig = _f(factory=ModelConfig)
    """Shape of the student (the model that is trained)."""
    teacher: ModelConfig = _f(factory=lambda: ModelConfig(layers=4, hidden=128, ffn_hidden=512))
    """Shape of the teacher (frozen during distillation)."""
    student_checkpoint: str | None = None
    """Checkpoint to initialise the student from; null: random init (tiny runs)."""
    teacher_checkpoint: str | None = None
    """Checkpoint of the teacher; null: the teacher is prepared by ``teacher_prep``."""
    student_hf: str | None = None
    """A Hugging Face model folder (config.json + safetensors) to initialise the student from:
    the shape comes from its config.json (shape keys under model.student may be left out; one
    that disagrees is an error), each rank reads only its own slices. Not with
    student_checkpoint."""
    teacher_hf: str | None = None
    """A Hugging Face model folder for the teacher, as student_hf (not with teacher_checkpoint;
    no teacher preparation runs). The tokenizer defaults to this folder's."""


@dataclass
class TeacherPrepConfig:
    """Supervised preparation of a teacher on the task's reference solutions (built-in task)."""

    enabled: bool = True
    """Train the teacher on the task's training solutions when model.teacher_checkpoint is null
    (once: the result is cached under cache_dir and reused)."""
    iterations: int = _f(300, ge=0)
    """Optimizer steps of the supervised teacher training; at least 1 when the teacher is
    prepared (0 would leave it random)."""
    batch_size: int = _f(32, ge=1)
    """Sequences per optimizer step."""
    lr: float = _f(1e-3, gt=0)
    """Peak learning rate of the teacher training (AdamW, cosine decay)."""
    weight_decay: float = _f(0.0, ge=0)
    """Weight decay of the teacher training."""
    warmup_iterations: int = _f(20, ge=0)
    """Linear warm-up steps of the teacher training."""
    cache_dir: str = ".cache/eaopd/teachers"
    """Where prepared teachers are cached (keyed by task, tokenizer, shape and these settings)."""
    seed: int = _f(1234, ge=0, le=_MAX_SEED)
    """Seed of the teacher's initialisation and data order."""


@dataclass
class StudentPrepConfig:
    """Optional supervised warm start of the student on the task's training solutions.

    A stand-in for a pretrained base model: a tiny randomly initialised student cannot learn a task
    from sampled rewards alone in a few iterations. Fewer steps (or problems) than the teacher's
    leave it a weaker, less certain model for distillation to improve.
    """

    enabled: bool = False
    """Warm-start the student when model.student_checkpoint is null (cached like the teacher)."""
    iterations: int = _f(100, ge=0)
    """Optimizer steps of the supervised student training; at least 1 when enabled (for a random
    student, set enabled to false)."""
    batch_size: int = _f(32, ge=1)
    """Sequences per optimizer step."""
    lr: float = _f(1e-3, gt=0)
    """Peak learning rate (AdamW, cosine decay)."""
    weight_decay: float = _f(0.0, ge=0)
    """Weight decay."""
    warmup_iterations: int = _f(10, ge=0)
    """Linear warm-up steps."""
    num_problems: int | None = _f(None, ge=1)
    """Use only the first this many training problems; null: all."""
    cache_dir: str = ".cache/eaopd/students"
    """Where warm-started students are cached (keyed like prepared teachers)."""
    seed: int = _f(4321, ge=0, le=_MAX_SEED)
    """Seed of the student's initialisation and data order during the warm start."""


@dataclass
class ParallelLayout:
    """Tensor/pipeline layout of one model."""

    tp: int = _f(1, ge=1)
    """Tensor-parallel size."""
    pp: int = _f(1, ge=1)
    """Pipeline-parallel size."""
    vpp: int | None = _f(None, ge=1)
    """Virtual pipeline stages per rank (interleaved schedule); null: not interleaved. The
    library's layouts accept it; ``eaopd-train`` refuses any value but null (rollouts need one
    model chunk per rank, teacher scoring shares too few micro-batches)."""


@dataclass
class ParallelConfig:
    """Parallelism: each model has its own layout; the rest of the world is data-parallel."""

    student: ParallelLayout = _f(factory=ParallelLayout)
    """Layout of the student."""
    teacher: ParallelLayout = _f(factory=ParallelLayout)
    """Layout of the teacher (may differ from the student's)."""
    backend: str = _f("auto", choices=("auto", "nccl", "gloo"))
    """torch.distributed backend; auto: nccl with CUDA, gloo otherwise."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for the student: activations outside the tensor-parallel
    regions are split over the sequence across its tp ranks (1 / tp of their memory). Needs
    parallel.student.tp > 1 (refused otherwise); runs on GPU and on CPU (gloo). Update and
    evaluation sequences are padded to a multiple of tp (masked); rollouts decode with it
    switched off. The teacher and the warm starts run without it. See docs/parallelism.md."""
    make_vocab_size_divisible_by: int = _f(128, ge=1)
    """The vocabulary is padded to a multiple of this times the TP size (Megatron's rule)."""


@dataclass
class LossConfig:
    """The distillation objective (see docs/configs.md for the formulas)."""

    objective: str = _f("eopd", choices=OBJECTIVES)
    """opd (reverse KL policy gradient), eopd (paper: + gated top-k forward KL), eopd_exact (gated
    full-vocabulary forward KL), eopd_soft (sigmoid gate), mix (fixed forward/reverse mix),
    fkl (forward KL only), jsd (generalised JSD)."""
    entropy_threshold: float = _f(0.8, ge=0)
    """Gate threshold tau on the teacher's full-vocabulary entropy, in nats (paper: 0.8); a
    token is gated in when H >= tau (see gate_strict)."""
    gate_strict: bool = False
    """Gate with the strict H > tau instead of H >= tau (the paper authors' code uses >=; the two
    differ at tau = 0 and on exact ties). Also applies to the high-entropy metrics."""
    fkl_coef: float = _f(1.0, ge=0)
    """Weight alpha of the gated forward-KL term (paper: 1.0)."""
    clip: float = _f(0.2, gt=0)
    """PPO ratio clip epsilon of the sampled-token policy-gradient term."""
    top_k: int = _f(16, ge=1)
    """Size of the teacher's top-k set for the forward KL (paper: 16); at most the tokenizer's
    vocabulary size."""
    tail_bucket: bool = False
    """Add one bucket for the probability mass outside the top-k set to the forward KL."""
    temperature: float = _f(1.0, gt=0)
    """Both models' logits are divided by this (paper: 1.0). The sampled form needs it equal to
    rollout.temperature (the PPO ratio is against the distribution the tokens were drawn
    from)."""
    soft_gate_width: float = _f(0.1, gt=0)
    """eopd_soft: the gate is sigmoid((H - tau) / width)."""
    mix_weight: float = _f(0.5, ge=0, le=1)
    """mix: weight of the forward KL; the reverse KL gets 1 - mix_weight."""
    jsd_beta: float = _f(0.5, gt=0, lt=1)
    """jsd: interpolation beta of the generalised Jensen-Shannon divergence, strictly between 0
    and 1 (at 0 and 1 the divergence is identically zero; use objective fkl or opd)."""
    form: str | None = _f(None, choices=("sampled", "exact"))
    """sampled: teacher as a compact top-k payload, sampled-token policy gradient (the paper);
    exact: full teacher logits, KL over the whole vocabulary. null: exact for eopd_exact and jsd,
    sampled otherwise."""
    chunk_size: int | None = _f(None, ge=1)
    """Tokens per row chunk of the vocab-parallel loss kernels (bounds transient memory: a few
    fp32 [chunk_size, V_pad / tp] temporaries when the kernels run eagerly); null: about 2^24
    (eager) or 2^28 (compiled) logit values per chunk, or the env EAOPD_CHUNK_ELEMS (for
    benchmarks), divided by the shard width. Changes memory and speed, not the result. Read by the
    logits path only: with fused_output on, fused_chunk_size sets the chunks."""
    fused_output: bool | None = None
    """Fuse the loss with the output layer: the trainer computes the student's loss from its final
    hidden states and output weight shard, and the teacher's payload (sampled form) or its side
    of the KL (exact form) from the teacher's hidden states, fused_chunk_size tokens at a time,
    so no [tokens, V_pad / tp] logits tensor exists (peak loss memory 0.15x, time about 1.1x (one
    pass, exact and sampled) of the logits path at 4096 tokens x 32,768 columns:
    docs/benchmarks.md). Applies to the student update, its teacher scoring and the evaluation's
    student forward and teacher payload (evaluation measures with eopd, so null fuses it there
    for jsd too); rollouts keep logits (one position per decode step). null: on for every
    objective but jsd, which has no fused form (true with jsd is refused)."""
    fused_chunk_size: int | None = _f(None, ge=1)
    """Tokens per chunk of the fused loss and payload (loss.fused_output): each chunk
    materialises a few [fused_chunk_size, V_pad / tp] logits and gradient buffers (the trainer's
    one-pass forms make the gradient in the forward pass; the two-pass forms recompute the chunk in
    backward); null: about 2^24 logit values per chunk (512 tokens at 32,768 columns), or the env
    EAOPD_FUSED_CHUNK_ELEMS divided by the shard width. Changes memory and speed, not the
    result."""


@dataclass
class RolloutConfig:
    """Student sampling."""

    prompts_per_iteration: int = _f(128, ge=1)
    """Prompts drawn per iteration (paper: 128)."""
    samples_per_prompt: int = _f(1, ge=1)
    """Responses sampled per prompt (paper: 1)."""
    mini_batch_size: int = _f(32, ge=1)
    """Prompts (with all their samples) per optimizer step; 128 / 32 = 4 steps per iteration."""
    micro_batch_size: int = _f(4, ge=1)
    """Most sequences per forward/backward micro-batch (gradient accumulation inside a
    mini-batch): each data-parallel replica uses the largest divisor of its rows per optimizer
    step that is at most this (8 rows and 16: one micro-batch of 8; 7 rows and 4: seven of 1,
    which the trainer warns about at the start). With micro_batch_tokens: the most rows of a
    micro-batch, no divisor needed."""
    micro_batch_tokens: int | None = _f(None, ge=1)
    """A token budget per micro-batch (dynamic micro-batch size; NeMo-RL's dynamic batching,
    verl's use_dynamic_bsz): the rows of each optimizer step, longest first, fill micro-batches
    of at most this many padded positions (rows x the micro-batch's longest row) and at most
    micro_batch_size rows, so short responses share large micro-batches and every micro-batch
    costs about the same memory. Same update up to float rounding. Must be at least
    max_prompt_tokens + max_response_tokens (rounded up to the student's tp with
    sequence_parallel), so that every row fits; an evaluation row longer than that gets a
    micro-batch of its own. eaopd-plan prints the largest budget each GPU fits. null:
    micro_batch_size rows per micro-batch."""
    max_prompt_tokens: int = _f(1024, ge=1)
    """Longest prompt; longer prompts are an error before training starts."""
    max_response_tokens: int = _f(4096, ge=1)
    """Most new tokens per response."""
    temperature: float = _f(1.0, ge=1e-6)
    """Sampling temperature (>= 1e-6: below that the scaled fp32 logits overflow; top_k=1
    decodes greedily)."""
    top_p: float = _f(1.0, gt=0, le=1)
    """Nucleus sampling threshold; 1.0 disables it (the paper's setting). Below 1 in the sampled
    form the trainer warns: the rollout log-probs are those of the full softmax."""
    top_k: int = _f(0, ge=0)
    """Sample among the k most likely tokens; 0 disables it; at most the vocabulary size (a
    warning in the sampled form, as for top_p). With top_p < 1 as well, top_p's mass is that of
    the untruncated softmax (transformers renormalises over the top k first): the kept set is
    the top-k set cut by top_p, never smaller than transformers' (docs/trainer.md)."""
    use_kv_cache: bool = True
    """Decode with a KV cache (off: re-run the whole prefix each token; for benchmarks)."""
    max_decode_batch: int | None = _f(None, ge=1)
    """Most sequences decoded at once per data-parallel replica (rollouts and evaluation; bounds
    the KV cache); with more, the rows of finished sequences are refilled with waiting prompts
    (continuous batching; chunks where the fast decoder does not apply, e.g. student pp > 1).
    Never changes the tokens. null: a rollout decodes all of a replica's sequences at once, an
    evaluation at most as many as keep each model's KV cache per rank within a rollout's
    (eaopd-plan prints both; raise this where it shows room)."""
    pp_interleave: bool = False
    """Student pp > 1: decode each batch as pp groups of rows whose steps overlap over the
    pipeline stages (docs/trainer.md, Pipeline parallelism). Never changes the tokens. Measured
    on CPU: 1.11-1.17x faster at 64 rows, 0.78x at 32 rows of a small model; not measured on a
    GPU, and run on gloo only (under NCCL the trainer's start warns: its sends and broadcasts use
    two communicators in an order NCCL does not promise to complete). Off by default."""
    cuda_graphs: bool = False
    """Decode at a few static shapes and replay each as a CUDA graph (rollouts and evaluation;
    the module megatron_eaopd/rollout/decode_graphs.py). Needs a CUDA device, use_kv_cache and
    student pp = 1 (refused otherwise); a pipelined teacher's evaluation, and a model the fast
    decoder does not support (it warns), decode without it. Tokens as without it, up to float
    rounding of a longer masked key range. Off by default: not yet measured on a GPU
    (docs/trainer.md)."""


@dataclass
class OptimizerConfig:
    """Student optimizer (AdamW) and learning-rate schedule."""

    lr: float = _f(3e-6, gt=0)
    """Peak learning rate (paper: 3e-6)."""
    min_lr: float = _f(0.0, ge=0)
    """Learning rate at the end of the decay."""
    weight_decay: float = _f(0.01, ge=0)
    """Decoupled weight decay (paper: 0.01)."""
    adam_beta1: float = _f(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = _f(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_eps: float = _f(1e-8, gt=0)
    """AdamW epsilon."""
    lr_schedule: str = _f("cosine", choices=("cosine", "linear", "constant"))
    """Decay after warm-up (paper: cosine)."""
    warmup_iterations: int = _f(0, ge=0)
    """Linear warm-up, in optimizer steps; at most the run's optimizer steps (iterations x
    rollout.prompts_per_iteration / rollout.mini_batch_size), or lr would never reach its peak."""
    clip_grad: float = _f(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainingConfig:
    """The outer loop: length, seeds, evaluation and checkpoints."""

    iterations: int | None = _f(None, ge=1)
    """Iterations to run; null: derived from ``epochs`` over the distillation prompts."""
    epochs: float = _f(1.0, gt=0)
    """Passes over the distillation prompts when ``iterations`` is null (paper: 3 MATH, 2 DAPO).
    Each epoch is a fresh shuffle cut into whole iterations: its last prompts that do not fill
    one are left out. The trainer's first line says the length and where it comes from."""
    seed: int = _f(42, ge=0, le=_MAX_SEED)
    """Seed of the data order, sampling and initialisation."""
    output_dir: str = "runs/default"
    """Run folder: resolved config, metrics, TensorBoard events, plots."""
    eval_interval: int = _f(0, ge=0)
    """Evaluate every this many iterations (and at the end); 0: only at the end."""
    eval_at_start: bool = True
    """Evaluate before the first update."""
    checkpoint_dir: str | None = None
    """Checkpoint folder; null: <output_dir>/checkpoints. Like output_dir, it must be writable
    (tried before the run starts, not at the first save). One run's: each save records its
    output_dir, and another output_dir pointed at it is refused while that run's folder (with
    its config.yaml) exists."""
    checkpoint_interval: int = _f(0, ge=0)
    """Save every this many iterations (and at the end); 0: only at the end."""
    keep_checkpoints: int | None = _f(None, ge=1)
    """Keep the newest this many iter_* folders up to the one ``latest`` names (older ones are
    deleted after each complete save, never that one; newer ones, left by an attempt abandoned
    for an earlier save, are neither counted nor deleted); null: keep all."""
    resume: bool = True
    """Continue from the latest checkpoint in checkpoint_dir when there is one (refused when the
    folder's config.yaml has other settings that define the run: model, loss, optimizer, task,
    tokenizer, preparations, seed, rollout sampling and batch sizes). false where a run is saved
    is refused too (it would overwrite that run): use a new output_dir."""
    recompute: str = _f("none", choices=("none", "full", "selective"))
    """Activation recomputation in the student's distillation updates (megatron's
    recompute_granularity): none keeps every layer's activations for the backward pass; full
    keeps only each layer's input and runs the layer's forward again in the backward pass
    (megatron's recompute_method uniform, one layer per group: the largest saving, about one
    more forward of the layers per update); selective recomputes only the core attention (the
    [b, heads / tp, s, s] softmax of megatron's local attention; Transformer Engine's fused
    attention keeps nothing that size, so there it saves nothing: the trainer warns). Same
    gradients as without
    (tests/models/test_recompute.py); eaopd-plan plans the update with it. The preparations,
    the rollouts and the teacher run without. Free to change on resume."""
    skip_nonfinite: bool = True
    """Skip (and count) an update whose loss or gradient norm is not finite; false: stop the
    run at the first one (exit 1)."""
    max_skipped_in_a_row: int = _f(8, ge=0)
    """Stop the run (exit 1, naming the cause) when this many updates in a row were skipped as
    non-finite: a diverged student skips every later update, and the run would otherwise use
    up its allocation and report success. Teacher and student preparation too; 0: never."""
    export_hf: str | None = None
    """At the end of the run, write the distilled student as a Hugging Face model folder here
    (config.json, safetensors, generation config, and a Hugging Face tokenizer's files; a
    task or sentencepiece tokenizer is not an HF tokenizer: only its BOS / EOS / pad ids are
    written, and the log names its .model file); null: no export.
    ``eaopd-convert export-hf`` does the same from any checkpoint. The folder is replaced at the
    end: it must not be or hold the run's or the models' folders, and an existing one must hold
    only an earlier export (checked at the start)."""
    export_dtype: str = _f("bf16", choices=("bf16", "fp32"))
    """dtype of the exported weights."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    k: int = _f(8, ge=1)
    """Samples per prompt for Avg@k and Pass@k (paper: 8)."""
    temperature: float = _f(1.0, ge=1e-6)
    """Sampling temperature at evaluation (paper: 1.0; >= 1e-6, top_k=1 decodes greedily)."""
    top_p: float = _f(0.8, gt=0, le=1)
    """Nucleus threshold at evaluation (paper: 0.8)."""
    top_k: int = _f(0, ge=0)
    """Top-k sampling at evaluation; 0 disables it; at most the vocabulary size. With top_p < 1
    as well, top_p's mass is that of the untruncated softmax, as for rollout.top_k."""
    max_response_tokens: int = _f(8192, ge=1)
    """Most new tokens per evaluation response (paper: 8192)."""
    max_prompts: int | None = _f(None, ge=1)
    """Evaluate on at most this many prompts per eval set; null: all."""
    entropy_threshold: float | None = _f(None, ge=0)
    """tau of the high-entropy metrics; null: loss.entropy_threshold."""
    use_math_verify: bool | None = None
    """Boxed-answer checking (tasks using the default Task.check, e.g. jsonl) with math-verify:
    true: always (refused before the run starts when math-verify is not installed); false: never
    (normalised string/number comparison); null: when it is installed. The builtin task checks
    its integer answers exactly and ignores it."""
    plot: bool = True
    """Write a PNG of the evaluation curves (eval_curves.png; matplotlib when installed, else a
    built-in renderer), drawn from metrics.jsonl: needs logging.jsonl (refused without)."""
    save_samples: int | None = _f(16, ge=0)
    """Save the responses to the first this many prompts of each eval set (all k per prompt,
    with whether each is right and, if not, the task's reason: Task.explain) to
    <output_dir>/eval_samples/<who>_iter_<7-digit iteration>.jsonl at every evaluation
    (who: student, or teacher for its evaluation at the start); 0: none; null: every prompt."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    console: bool = True
    """Print metrics lines to stdout."""
    progress_bars: bool = True
    """tqdm progress bars for rollouts and updates (rank 0), drawn only when stderr is a terminal:
    never into a log file or a pipe (Slurm jobs)."""
    log_interval: int = _f(1, ge=1)
    """Log every this many iterations."""
    jsonl: bool = True
    """Append one JSON object per logged iteration to <output_dir>/metrics.jsonl. eval_curves.png
    (eval.plot) and the before/after table printed at the end are drawn from it: false needs
    eval.plot=false and prints no table."""
    tensorboard: bool = True
    """Write TensorBoard event files to <output_dir>/tensorboard (when tensorboard is installed)."""
    wandb: bool = False
    """Log to Weights & Biases (when wandb is installed). A W&B that cannot log (no login, no
    network) is a warning, never a failed run: metrics.jsonl has everything."""
    wandb_project: str = "megatron-eaopd"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); null: the default."""
    wandb_run_name: str | None = None
    """W&B run name; null: the output folder's name."""


@dataclass
class SyntheticTaskConfig:
    """Settings of the built-in synthetic tasks (docs/tasks.md)."""

    kind: str = _f("arith", choices=("arith", "countdown", "sums"))
    """Which built-in task: ``countdown`` (count a number down to 0 in allowed steps; the CPU
    default, configs/tiny-cpu.yaml), ``sums`` (add a list of numbers in any order) or ``arith``
    (step-by-step products and sums with connective words). See docs/tasks.md for what the
    settings below mean for each."""
    seed: int = _f(0, ge=0, le=_MAX_SEED)
    """Seed of the problem generator (splits are a pure function of the settings)."""
    num_train: int = _f(4000, ge=0)
    """Training problems (with reference solutions) for teacher preparation."""
    num_distill: int = _f(1024, ge=1)
    """Distillation prompts."""
    num_eval: int = _f(128, ge=1)
    """Held-out evaluation prompts."""
    min_terms: int = _f(3, ge=2)
    """Fewest terms in an expression (sums: fewest numbers in a list)."""
    max_terms: int = _f(4, ge=2)
    """Most terms in an expression (sums: most numbers in a list)."""
    max_operand: int = _f(9, ge=2, le=99)
    """Largest operand."""
    product_prob: float = _f(0.4, ge=0, le=1)
    """arith: probability that a term is a product a*b rather than a single number."""
    solutions_per_problem: int = _f(4, ge=1)
    """Distinct reference solutions (random valid paths) kept per training problem."""
    connectives: list[str] = _f(factory=lambda: ["so", "then", "next", "now"])
    """arith: words a step may start with (chosen uniformly): a second branch point per step
    (entropy ln 4 = 1.39 nats for four words), like the forking words of natural-language
    reasoning."""


@dataclass
class TaskConfig:
    """Which prompts to distil on and how answers are checked (docs/tasks.md)."""

    name: str = "builtin"
    """``builtin`` (a built-in synthetic task, ``task.synthetic.kind``), ``jsonl`` (the files
    below), or ``module:Class``. A key below that the chosen task does not read (a file or
    prompt_suffix for builtin, options for builtin or jsonl) is refused unless at its default."""
    train_file: str | None = None
    """jsonl: prompts with solutions for teacher preparation (optional)."""
    distill_file: str | None = None
    """jsonl: distillation prompts."""
    eval_files: list[str] = _f(factory=list)
    """jsonl: held-out evaluation sets, one per file (named by the file's stem)."""
    prompt_suffix: str = ""
    """jsonl: appended to every prompt, e.g. the paper's boxed-answer instruction."""
    options: dict[str, Any] = _f(factory=dict)
    """Keyword arguments for a ``module:Class`` task's constructor."""
    synthetic: SyntheticTaskConfig = _f(factory=SyntheticTaskConfig)
    """Settings of the built-in task (ignored by the others: configs inherit it)."""


@dataclass
class TokenizerConfig:
    """The tokenizer shared by teacher and student."""

    kind: str = _f("auto", choices=("auto", "task", "sentencepiece", "huggingface"))
    """task: a sentencepiece model trained on the task's text (cached); sentencepiece: a .model
    file; huggingface: a tokenizer folder or hub name (needs transformers); auto: huggingface
    from model.teacher_hf, else model.student_hf, when one is set, else from the folder an
    imported model.*_checkpoint came from (eaopd-convert import-hf) while it holds its
    tokenizer, else task. With HF model folders or imported checkpoints, task is refused."""
    path: str | None = None
    """Model file or folder for kind sentencepiece/huggingface (auto: model.teacher_hf, else
    model.student_hf, else an imported checkpoint's folder). Loaded with the data, before any
    model: a path that does not load is a configuration error naming this key."""
    chat_template: bool = False
    """Wrap every prompt (rollouts, teacher preparation, evaluation; student and teacher alike)
    in the tokenizer's chat template as one user turn followed by the assistant's generation
    prompt, and end responses also at the template's end-of-turn token. Needs a Hugging Face
    tokenizer with a template."""
    enable_thinking: bool | None = None
    """Passed to the chat template when not null (Qwen3: false selects the non-thinking mode the
    paper's teacher runs in)."""
    vocab_size: int = _f(320, ge=16)
    """kind task: the most pieces of the trained tokenizer."""
    cache_dir: str = ".cache/eaopd/tokenizers"
    """kind task: where trained tokenizers are cached."""


@dataclass
class EAOPDConfig:
    """The whole configuration of one run."""

    name: str = "default"
    """Run name (used in logs and W&B)."""
    model: ModelsConfig = _f(factory=ModelsConfig)
    """Student and teacher shapes and checkpoints."""
    teacher_prep: TeacherPrepConfig = _f(factory=TeacherPrepConfig)
    """Supervised teacher preparation (built-in task)."""
    student_prep: StudentPrepConfig = _f(factory=StudentPrepConfig)
    """Optional supervised warm start of the student (off by default)."""
    parallel: ParallelConfig = _f(factory=ParallelConfig)
    """Tensor and pipeline parallelism."""
    loss: LossConfig = _f(factory=LossConfig)
    """Distillation objective."""
    rollout: RolloutConfig = _f(factory=RolloutConfig)
    """Student rollouts."""
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig)
    """Student optimizer."""
    training: TrainingConfig = _f(factory=TrainingConfig)
    """Iterations, seed, checkpoints."""
    eval: EvalConfig = _f(factory=EvalConfig)
    """Held-out evaluation."""
    logging: LoggingConfig = _f(factory=LoggingConfig)
    """Console, TensorBoard, W&B, JSONL."""
    task: TaskConfig = _f(factory=TaskConfig)
    """Prompts and answer checking."""
    tokenizer: TokenizerConfig = _f(factory=TokenizerConfig)
    """Tokenizer."""
