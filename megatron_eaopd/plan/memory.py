"""Per-rank memory and communication of one EOPD iteration: an analytic model.

Everything is counted in bytes per rank of the largest pipeline stage, from the model shapes, the
layouts and the batch sizes, with no torch import: `plan_memory` runs on a laptop for any config.

Persistent state (the student is trained, the teacher frozen; both live on every rank):
  student weights   P_s * bytes(dtype)
  student grads     P_s * 4          (megatron DDP grad buffer, grad_reduce_in_fp32=True)
  optimizer state   P_s * (8 + 4 if the weights are not fp32)   (Adam moments + fp32 master);
                    / dp with a distributed optimizer (ZeRO-1; the trainer does not use one)
  teacher weights   P_t * bytes(dtype)
where P is the parameter count of the rank's stage (`stage_params`: embedding on the first
stage, output layer on the last, an output copy on the last stage of a tied PP model, L / pp
layers, everything but the norms split over TP).

Activations saved for backward per layer and micro-batch (`layer_activation_terms`, n = s b
tokens, t = TP, e = bytes per element of the compute dtype) for three specs:
  "local"       megatron-core's local spec as the trainer runs it without TE (CPU): per norm
                3 n h e (input, normalised, the next linear's input), q, expanded k and v and
                the context 4 n a d / t e, the softmax b (a / t) s^2 e (no dropout copy at p=0),
                SwiGLU 5 n f / t e (fc1 output [2f], silu output, product) - measured with
                saved-tensor hooks on the CPU model (docs/memory.md);
  "te"          Transformer Engine with flash attention (GPU): per norm 2 n h e, q, k, v
                unexpanded n (a + 2g) d / t e, the output twice, the softmax statistics, SwiGLU
                3 n f / t e. An estimate from TE's saved tensors, not measured (no GPU here);
  "korthikanti" the accounting of Korthikanti et al. 2022, eq. (1)-(2): sbh (10 + 24 / t +
                5 a s / (h t)) for a 4h GELU MLP with dropout in 16 bit (docs/memory.md).
With sequence parallelism (the student's `parallel.sequence_parallel`) the tensors outside the
TP regions are [s / t, b, h]: the norm terms above (measured: the two norms' six [n, h] tensors and
their rstd; the column-parallel linears save their input before the all-gather), Korthikanti's
replicated 10 s b h (their eq. (4)), the final norm and each layer's checkpointed input.
Full activation recomputation keeps each layer's input n h e and, during backward, one layer's
activations. Megatron's 1F1B schedule keeps min(pp - stage, micro-batches) micro-batches in
flight on a stage; the first stage has the most. Under a token budget (rollout.micro_batch_tokens)
each is planned at the largest micro-batch the budget lets through (`budget_worst_case`) and
together at most one step's rows at the limit; the communication likewise (an upper bound).

The loss: unfused, the [n, V_pad / t] logits in the compute dtype, their gradient and, with
eager kernels (EAOPD_COMPILE=0; compiled is the default and keeps none), three fp32 chunks;
fused (loss.fused_output), three fp32 [chunk, V_pad / t] buffers and the hidden-state gradient;
either way the output weight's gradient [V_pad / t, h] (fp32 when fused). Backward adds one
layer's gradients (about its activations) while earlier layers' are still saved. Checked
against measured CPU peaks (docs/memory.md): within 25% with eager kernels but for the exact
form's unfused pair kernels (0.67x); compiled, PP 2 and TP 1 x DP 2 over-counted (1.30-1.40x).
The teacher forward keeps no activations: one layer's transients, and its logits (plus their fp32
copy) or one fused chunk. What the trainer keeps from scoring to the iteration's last step, for
every row of the replica (`teacher_kept_bytes`): the sampled form's payload, (2 + 2k) fp32 per
position; the exact form's teacher logits shard [rows, s, V_pad / t] fp32, or fused its final
hidden states [rows, s, h_t] (`trainer.scoring.attach_teacher_logits`). The
rollout KV cache is 2 L/pp (g / t) d e per position for every row decoded at once.

Communication per rank and iteration (bytes sent; ring all-reduce 2 (t - 1) / t of the buffer,
all-gather (t - 1) / t of the result): TP all-reduces 2 per layer forward ([n, h] e) and 2 backward
for the student, 2 per layer for the teacher forward and per decode step; the pipeline's
activations and gradients per micro-batch; the loss's all-gather of packed statistics (and the
fused loss's hidden-gradient all-reduce); the DP gradient all-reduce of the fp32 grad buffer; the
teacher payload point to point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = float(1 << 30)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GPUS = {"A100-40GB": 40e9, "A100/H100-80GB": 80e9, "H200-141GB": 141e9}
EVAL_PHASES = ("evaluation (student)", "evaluation (teacher)")
KEPT = "teacher payload / exact-form tensors"  # the part kept from scoring to the last step
# the update's part under each training.recompute value
UPDATE_PARTS = {"none": "update", "selective": "update (selective recompute)",
                "full": "update (full recompute)"}  # fmt: skip
# layer_activation_terms' attention-score terms: what selective recompute makes again
_SCORE_TERMS = ("softmax probabilities", "softmax 2, its dropout mask 1 and output 2")


@dataclass(frozen=True)
class Shape:
    """A GPT model's shape (the config's model section)."""

    layers: int
    hidden: int
    heads: int
    query_groups: int
    ffn_hidden: int
    vocab_size: int
    kv_channels: int | None = None
    tied: bool = False
    swiglu: bool = True
    qk_layernorm: bool = False
    dtype: str = "bf16"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Layout:
    """TP x PP of one model and the data-parallel size the world leaves."""

    tp: int = 1
    pp: int = 1
    dp: int = 1


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """megatron's padded vocabulary: a multiple of divisible_by * tp."""
    m = divisible_by * tp
    return int(math.ceil(vocab / m) * m)


def layer_params(s: Shape, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated)."""
    d, h = s.head_dim, s.hidden
    qkv = h * (s.heads + 2 * s.query_groups) * d
    proj = s.heads * d * h
    mlp = h * s.ffn_hidden * (3 if s.swiglu else 2)
    norms = 2 * h + (2 * d if s.qk_layernorm else 0)
    return (qkv + proj + mlp) // tp + norms


def stage_params(s: Shape, lay: Layout, stage: int, divisible_by: int = 128) -> int:
    """Parameters held by one rank of pipeline stage `stage` (0-based)."""
    v = padded_vocab(s.vocab_size, lay.tp, divisible_by) // lay.tp
    n = layer_params(s, lay.tp) * (s.layers // lay.pp)
    if stage == 0:
        n += v * s.hidden
    if stage == lay.pp - 1:
        n += s.hidden  # final norm
        if not s.tied or lay.pp > 1:  # untied output layer, or the tied copy on the last stage
            n += v * s.hidden
    return n


def layer_activation_terms(
    s: Shape, tokens: int, seq: int, tp: int, spec: str, sequence_parallel: bool = False
) -> dict:
    """Bytes saved for backward by one layer for one micro-batch of `tokens` = s b tokens of
    length `seq`, by tensor group (see the module docstring). `sequence_parallel`: megatron's
    sequence parallelism, which keeps the tensors outside the TP regions (norm inputs and
    outputs, the column-parallel linears' inputs before their all-gather, the dropout and
    residual parts) as [s / tp, b, h]: the norm terms are divided by tp."""
    n, h, e, t = tokens, s.hidden, s.bytes, tp
    a, g, d, f = s.heads, s.query_groups, s.head_dim, s.ffn_hidden
    b = -(-tokens // seq)  # rows of length seq (an upper bound when tokens is no multiple)
    sp = t if sequence_parallel else 1  # divisor of the terms outside the TP regions
    if spec == "korthikanti":  # eq. (2) / with SP eq. (4), in bytes: 16-bit, 4h GELU, dropout
        return {
            "replicated: norm inputs 4, QKV and fc1 inputs 4, dropout masks 2": 10 * n * h // sp,
            "split: Q K V 6, projection input 2, GeLU input 8 and output 8": 24 * n * h // t,
            "softmax 2, its dropout mask 1 and output 2": 5 * a * seq * seq * b // t,
        }
    qk = 2 * n * (a + g) * d // t * e if s.qk_layernorm else 0
    if spec == "local":
        return {
            "norms (input, normalised, next input)": (2 * 3 * n * h * e + 2 * n * 4) // sp,
            "q, k, v (expanded), context": 4 * n * a * d // t * e + qk,
            "softmax probabilities": b * a * seq * seq // t * e + seq * seq,
            "MLP": (5 if s.swiglu else 2) * n * f // t * e,
        }
    if spec == "te":
        return {
            "norms (input, normalised)": 2 * 2 * n * h * e // sp,
            "q, k, v, output, projection input": (n * (a + 2 * g) * d + 2 * n * a * d) // t * e
            + n * a // t * 4
            + qk,
            "softmax probabilities": 0,
            "MLP": (3 if s.swiglu else 2) * n * f // t * e,
        }
    raise ValueError(f"unknown activation spec {spec!r}: local, te or korthikanti")


def korthikanti_per_layer(
    seq: int, batch: int, hidden: int, heads: int, tp: int = 1, sequence_parallel: bool = False
) -> float:
    """Korthikanti et al. 2022, eq. (1) (tp = 1), (2) and with sequence parallelism (4):
    activation bytes of one layer, s b h (10 + 24 / t + 5 a s / (h t)), or s b h / t (34 +
    5 a s / h) with sequence parallelism."""
    s, b, h, a, t = seq, batch, hidden, heads, tp
    if sequence_parallel:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


@dataclass
class Batch:
    """What one iteration moves through a model on one data-parallel replica."""

    micro_batch: int  # rows per micro-batch
    seq: int  # tokens per row (prompt + response, the longest)
    micro_batches: int  # micro-batches per optimizer step on this replica
    steps: int  # optimizer steps per iteration
    rows: int  # rollout rows of this replica per iteration
    top_k: int = 16
    chunk_elems: int = 1 << 24  # fused: logit values per chunk
    kernel_chunk_elems: int = 1 << 24  # unfused kernels' fp32 temporaries (eager kernels)
    compiled_kernels: bool = True  # EAOPD_COMPILE (default on): the unfused kernels keep none
    decode_rows: int | None = None  # rows decoded at once (None: all rows)
    # evaluation decoding (trainer.decode_rows): rows at once per replica and their length
    eval_rows: dict | None = None  # {"student": rows, "teacher": rows}; None: not planned
    eval_seq: int = 0
    # positions per micro-batch when not micro_batch * seq: a token budget's worst case, rows
    # shorter than seq that fill it (the attention terms still count rows of length seq)
    micro_tokens: int | None = None
    # a token budget's cap on what is in flight: one step's rows at the limit (None: no cap)
    step_positions: int | None = None

    def positions(self) -> int:
        """Positions (rows x width) of the largest micro-batch."""
        return self.micro_tokens or self.micro_batch * self.seq


def budget_worst_case(
    budget: int, max_rows: int, rows_per_step: int, longest: int, multiple: int = 1
) -> tuple[int, tuple[int, int], int]:
    """The token budget's worst cases (``rollout.micro_batch_tokens``, packed as
    ``trainer.batches.step_micro_batches`` does: a micro-batch of width w holds at most
    min(max_rows, budget // w) rows, and at least one): the largest micro-batch it lets through,
    over every width w up to ``longest`` rounded to ``multiple`` (rows of one length that fill
    the budget: 3 rows of 3413 under 10239, more than 1 row of 5120), and the most micro-batches
    per step (every row at the limit). Returns (rows of the largest, (rows, width) of the
    largest, most micro-batches per step)."""
    top = -(-longest // multiple) * multiple
    best = (0, 0)
    for w in range(multiple, top + 1, multiple):
        b = max(1, min(max_rows, rows_per_step, budget // w))
        if b * w >= best[0] * best[1]:
            best = (b, w)
    fewest = max(1, min(max_rows, rows_per_step, budget // top))
    return best[0], best, -(-rows_per_step // fewest)


@dataclass
class Report:
    """Per-rank bytes (the largest stage) and communication, with the parts named."""

    parts: dict = field(default_factory=dict)
    comm: dict = field(default_factory=dict)

    @property
    def persistent(self) -> float:
        return sum(v for k, v in self.parts.items() if k.startswith("persistent"))

    def peak(self, recompute: str | bool = "none") -> float:
        """Persistent state plus the largest phase (rollout, teacher scoring, the update with
        ``recompute`` - a ``training.recompute`` value; True / False, the earlier form: full /
        none - the student's and the teacher's evaluation)."""
        if isinstance(recompute, bool):
            recompute = "full" if recompute else "none"
        names = ("rollout", "teacher scoring", UPDATE_PARTS[recompute], *EVAL_PHASES)
        return self.persistent + max(self.parts.get(k, 0.0) for k in names)


def _ring(size: float, n: int) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * size


def student_update_terms(
    s: Shape, lay: Layout, batch: Batch, *, fused: bool, spec: str, divisible_by: int = 128,
    sequence_parallel: bool = False,
) -> dict:  # fmt: skip
    """Transient bytes of the student update on its first (activations) or last (loss) stage:
    {"activations", "activations (recompute)" (megatron's full recompute, one layer per group),
    "activations (selective)" (selective: the attention scores recomputed), "loss", "in
    flight"}.

    `sequence_parallel`: the layers' norm terms, each layer's checkpointed input (recompute) and
    the final norm's input and output are [s / tp, b, h]; the output layer's input is gathered
    over the sequence ([s, b, h], saved by the fused loss; the unfused output layer saves its
    [s / tp, b, h] input and gathers again in backward)."""
    n = batch.positions()
    sp = lay.tp if sequence_parallel else 1
    terms = layer_activation_terms(s, n, batch.seq, lay.tp, spec, sequence_parallel)
    per_layer = sum(terms.values())
    # selective recompute: the attention scores are made again in backward, one layer at a time
    scores = sum(v for k, v in terms.items() if k in _SCORE_TERMS)
    layers = s.layers // lay.pp
    in_flight = min(lay.pp, batch.micro_batches)
    acts = per_layer * layers * in_flight
    selective = (per_layer - scores) * layers * in_flight + scores
    layer_input = n * s.hidden * s.bytes // sp  # what full recompute keeps per layer
    # full recompute keeps the inputs; the loss's buffers are gone before a layer runs again, so
    # the loss and one recomputed layer are alternatives, not a sum (measured: docs/memory.md)
    inputs = layer_input * layers * in_flight
    cap = batch.step_positions
    if cap and in_flight * n > cap:  # a budget: the micro-batches in flight hold one step at most
        capped = layer_activation_terms(s, cap, batch.seq, lay.tp, spec, sequence_parallel)
        acts = layers * sum(capped.values())
        selective = layers * sum(v for k, v in capped.items() if k not in _SCORE_TERMS) + scores
        inputs = cap * s.hidden * s.bytes // sp * layers
    v = padded_vocab(s.vocab_size, lay.tp, divisible_by) // lay.tp
    nhe = n * s.hidden * s.bytes
    # final norm (input, output) and the output layer's input
    final = 2 * nhe // sp + (nhe if fused else nhe // sp)
    wgrad = v * s.hidden * (4 if fused else s.bytes)  # the output weight's gradient
    if fused:
        rows = max(1, min(n, batch.chunk_elems // v))
        loss = 3 * rows * v * 4 + n * s.hidden * s.bytes + wgrad
    else:
        rows = max(1, min(n, batch.kernel_chunk_elems // v))
        temporaries = 0 if batch.compiled_kernels else 3 * rows * v * 4
        loss = 2 * n * v * s.bytes + temporaries + wgrad
    # backward transients: the gradients of the layer being differentiated, about its activations
    grads = per_layer
    if lay.pp > 1:  # the last stage holds one micro-batch in flight
        last = per_layer * layers + final + loss + grads
        last_rc = layer_input * layers + max(final + loss, per_layer + grads)
        last_sel = (per_layer - scores) * layers + scores + final + loss + grads
        first = acts + grads
        return {"activations": max(first, last),
                "activations (recompute)": max(inputs + per_layer + grads, last_rc),
                "activations (selective)": max(selective + grads, last_sel),
                "loss": loss, "in flight": in_flight}  # fmt: skip
    return {"activations": acts + final + loss + grads,
            "activations (recompute)": inputs + max(final + loss, per_layer + grads),
            "activations (selective)": selective + final + loss + grads,
            "loss": loss, "in flight": in_flight}  # fmt: skip


def teacher_kept_bytes(teacher: Shape, t_lay: Layout, batch: Batch, *, fused: bool, form: str,
                       divisible_by: int = 128) -> float:  # fmt: skip
    """Bytes of the teacher's view of the replica's rollouts that stay on a rank from teacher
    scoring to the iteration's last optimizer step (the trainer scores every micro-batch first).

    sampled: the payload, (2 + 2k) fp32 per position (entropy, sampled-token log-prob, top-k
    log-probs and int64 ids counted as fp32 pairs) plus three [rows, seq] 8-byte bookkeeping
    tensors; exact, unfused: the teacher's [rows, seq, V_pad / tp] fp32 logits shard; exact, fused:
    its final hidden states [rows, seq, h_t] in the teacher's dtype (the output weight is the
    teacher's own parameter)."""
    positions = batch.rows * batch.seq
    if form == "sampled":
        return positions * (2 + 2 * batch.top_k) * 4 + positions * 8 * 3
    if form != "exact":
        raise ValueError(f"unknown loss form {form!r}: sampled or exact")
    if fused:
        return positions * teacher.hidden * teacher.bytes
    return positions * (padded_vocab(teacher.vocab_size, t_lay.tp, divisible_by) // t_lay.tp) * 4


def plan_memory(
    student: Shape, teacher: Shape, s_lay: Layout, t_lay: Layout, batch: Batch, *,
    fused: bool = True, spec: str = "te", distributed_optimizer: bool = False,
    divisible_by: int = 128, form: str = "sampled", sequence_parallel: bool = False,
    recompute: str = "none",
) -> tuple[Report, Report]:  # fmt: skip
    """(student rank report, teacher rank report): every rank holds both; see `combined`.

    `form`: the loss form ("sampled": the top-k payload; "exact": the teacher's logits shard, or
    fused its hidden states, kept for every micro-batch of the iteration, `teacher_kept_bytes`).
    `sequence_parallel`: the student's (`student_update_terms`); the teacher runs without.
    The update is planned under every ``training.recompute`` value (``UPDATE_PARTS``);
    `recompute` (the config's) sets the communication: full recompute runs each layer's forward
    TP all-reduces again in backward."""
    rs, rt = Report(), Report()
    ps = max(stage_params(student, s_lay, i, divisible_by) for i in range(s_lay.pp))
    pt = max(stage_params(teacher, t_lay, i, divisible_by) for i in range(t_lay.pp))
    opt = ps * (8 + (4 if student.bytes != 4 else 0))
    if distributed_optimizer:
        opt /= s_lay.dp
    rs.parts["persistent: student weights"] = ps * student.bytes
    rs.parts["persistent: student grads (fp32)"] = ps * 4
    rs.parts["persistent: optimizer state"] = opt
    rt.parts["persistent: teacher weights"] = pt * teacher.bytes
    upd = student_update_terms(student, s_lay, batch, fused=fused, spec=spec,
                               divisible_by=divisible_by,
                               sequence_parallel=sequence_parallel)  # fmt: skip
    kept = teacher_kept_bytes(teacher, t_lay, batch, fused=fused, form=form,
                              divisible_by=divisible_by)  # fmt: skip
    rs.parts["update"] = upd["activations"] + kept
    rs.parts[UPDATE_PARTS["selective"]] = upd["activations (selective)"] + kept
    rs.parts[UPDATE_PARTS["full"]] = upd["activations (recompute)"] + kept
    rs.parts[KEPT] = kept
    rs.parts["student loss (logits or fused chunks)"] = upd["loss"]
    # teacher scoring: no saved activations; one layer's transients and the logits or a chunk
    n = batch.positions()
    vt = padded_vocab(teacher.vocab_size, t_lay.tp, divisible_by) // t_lay.tp
    one_layer = sum(layer_activation_terms(teacher, n, batch.seq, t_lay.tp, spec).values())
    if form == "exact":  # the output is kept; unfused, a 16-bit forward's logits before .float()
        t_logits = 0 if fused or teacher.bytes == 4 else n * vt * teacher.bytes
    elif fused:
        t_logits = 2 * max(1, min(n, batch.chunk_elems // vt)) * vt * 4
    else:
        t_logits = n * vt * (teacher.bytes + 4)
    rt.parts["teacher scoring"] = one_layer + t_logits + kept
    # rollouts: the student's KV cache for the rows decoded at once, and one step's logits
    rows = batch.decode_rows or batch.rows
    kv = 2 * (student.layers // s_lay.pp) * rows * batch.seq
    kv *= max(1, student.query_groups // s_lay.tp) * student.head_dim * student.bytes
    vs = padded_vocab(student.vocab_size, s_lay.tp, divisible_by) // s_lay.tp
    rs.parts["rollout"] = kv + rows * vs * 4 * 3
    rs.parts["rollout KV cache"] = kv
    if batch.eval_rows:  # evaluation decoding: each model's KV cache and one step's logits
        models = (("student", student, s_lay, rs), ("teacher", teacher, t_lay, rt))
        for who, shape, lay, rep in models:
            n_rows = batch.eval_rows[who]
            cache = 2 * (shape.layers // lay.pp) * n_rows * batch.eval_seq
            cache *= max(1, shape.query_groups // lay.tp) * shape.head_dim * shape.bytes
            v = padded_vocab(shape.vocab_size, lay.tp, divisible_by) // lay.tp
            rep.parts[f"evaluation ({who})"] = cache + n_rows * v * 4 * 3
    _communication(rs, rt, student, teacher, s_lay, t_lay, batch, ps, fused, form, recompute)
    return rs, rt


def _communication(
    rs, rt, student, teacher, s_lay, t_lay, batch, ps, fused, form, recompute="none"
) -> None:
    """Bytes sent per rank and iteration (module docstring). Sequence parallelism replaces each
    TP all-reduce by a reduce-scatter and an all-gather of the same ring volume; full recompute
    adds a second forward's (2 per layer to the 2 forward and 2 backward)."""
    n = batch.positions()
    mbs = batch.micro_batches * batch.steps
    if batch.step_positions and batch.micro_batches * n > batch.step_positions:
        mbs = batch.steps * batch.step_positions / n  # a budget: one step's rows at most
    h, e = student.hidden, student.bytes
    layers = student.layers // s_lay.pp
    per_layer = 6 if recompute == "full" else 4
    rs.comm["student TP all-reduces"] = mbs * per_layer * layers * _ring(n * h * e, s_lay.tp)
    width = 9 if form == "exact" else 5 + batch.top_k  # packed per-token statistics, fp32
    stats = n * width * 4 * (s_lay.tp - 1) / s_lay.tp
    grad_h = _ring(n * h * e, s_lay.tp) if fused else 0.0
    rs.comm["student loss (all-gather, hidden grad)"] = mbs * (stats + grad_h)
    rs.comm["student PP activations + grads"] = (mbs * 2 * n * h * e) if s_lay.pp > 1 else 0.0
    rs.comm["student DP grad all-reduce (fp32)"] = batch.steps * _ring(ps * 4, s_lay.dp)
    gen = batch.seq * 2 * layers * _ring((batch.decode_rows or batch.rows) * h * e, s_lay.tp)
    rs.comm["rollout TP all-reduces (decode)"] = gen
    nt = teacher.hidden * teacher.bytes * n
    t_layers = teacher.layers // t_lay.pp
    rt.comm["teacher TP all-reduces"] = mbs * 2 * t_layers * _ring(nt, t_lay.tp)
    rt.comm["teacher PP activations"] = (mbs * nt) if t_lay.pp > 1 else 0.0
    # the exact form's teacher runs on the student's TP group: nothing crosses layouts
    payload = 0.0 if form == "exact" else mbs * n * (2 + 2 * batch.top_k) * 4
    rt.comm["teacher payload (p2p)"] = payload


def combined(rs: Report, rt: Report) -> Report:
    """One rank's total: student and teacher persistent state and every phase's transients."""
    out = Report()
    out.parts = {**rs.parts}
    out.parts.update({k: v for k, v in rt.parts.items() if k.startswith("persistent")})
    out.parts["teacher scoring"] = rt.parts["teacher scoring"]
    if "evaluation (teacher)" in rt.parts:
        out.parts["evaluation (teacher)"] = rt.parts["evaluation (teacher)"]
    out.comm = {**rs.comm, **rt.comm}
    return out


def fits(total_bytes: float, headroom: float = 0.9) -> dict:
    """{GPU: whether `total_bytes` fits in `headroom` of its memory}."""
    return {name: total_bytes <= headroom * cap for name, cap in GPUS.items()}


__all__ = [
    "EVAL_PHASES", "GIB", "GPUS", "KEPT", "UPDATE_PARTS", "Batch", "Layout", "Report", "Shape",
    "combined", "fits",
    "korthikanti_per_layer", "layer_activation_terms", "layer_params", "padded_vocab",
    "plan_memory", "stage_params", "student_update_terms", "teacher_kept_bytes",
]  # fmt: skip
