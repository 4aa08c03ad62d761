"""A lean KV-cache forward of megatron-core's GPTModel for rollouts (any TP and PP; the local
spec, or Transformer Engine's with its fused norm + linear layers).

megatron-core's static-batching decode path re-applies RoPE to the whole cached key and expands
the grouped KV heads (``repeat_interleave``) of the whole cache in every layer at every step, and
runs many Python layers per op. This module runs the same math on the model's own parameters and
norm modules: per layer, the input norm -> QKV (column-parallel shard) -> QK norms -> RoPE of the
NEW positions only (tables from the model's ``rotary_pos_emb``) ->
keys and values written into a cache [b, groups / tp, S, d] -> ``scaled_dot_product_attention``
(a decode step attends each group's r query heads to that group's keys as an [r, d] query block,
so the grouped cache is never expanded) -> output projection (row-parallel shard, TP
all-reduce) -> MLP (GLU or not, the config's activation; row-parallel fc2, TP all-reduce). The
last position's final norm and the output layer give vocab-parallel logits [b, V_pad / tp], never
gathered.

Under pipeline parallelism (one model chunk per rank) each stage runs its own layers on hidden
states received from the previous stage and sends its output on (p2p, [n, s, h]); the first stage
embeds, the last gives the logits. ``forward`` does this; the per-row ``decode_rows`` /
``prefill_rows`` of continuous batching are PP 1 only.

Transformer Engine's layer spec (where TE is installed, the default) keeps the same weight
layouts; its ``LayerNormLinear`` holds the norm before linear_qkv / linear_fc1 (``LinearNorm``
computes it from the attributes megatron's own TE code reads) and its separate norms (QK norms,
the final norm) run as modules. Only the weights are read: no TE module's forward runs.

``FastDecoder.unsupported(module)`` names the first feature this forward does not reproduce
(virtual PP, other TE layers, fp8, MoE, sequence parallel, sliding windows...);
the caller then keeps megatron's forward. ``generate`` also compares the first step's logits
with megatron's forward of the same prefix and falls back (with a warning) on any mismatch.

Collectives per forward: 1 TP all-reduce of the embeddings [b, s, h] and 2 per layer
(attention and MLP outputs, [b, s, h]); none at TP 1.

On CPU the linear layers' weights are copied once per ``FastDecoder`` (one per ``generate``
call with continuous batching, one per chunk of ``max_decode_batch`` prompts otherwise; never
reused across calls, so the copies follow the training updates) into transposed, contiguous
[in, out] form:
``x @ W^T`` with a row-major [out, in] weight is a transposed-operand GEMM, 10-30% slower alone
on one CPU thread at decode batch 32 than the plain product with [in, out]; in a whole decode call
(4 x 256, vocabulary 4096) the matmuls took 13% less time and the call 3-15% in three A/B runs
(benchmarks/bench_decode_ab.py, docs/trainer.md).
The copies cost one weight's memory more for the rollout; on GPU the parameters are used as they
are. The product may sum in another order: results agree to rounding, not necessarily bitwise.

Per-op overhead dominates a decode step at rollout batch sizes (each op touches a few thousand
values), so the common layouts take fewer ops. With fp32 parameters: a torch RMSNorm's gain is
folded into the next linear's CPU copy (the norm becomes one gain-free ``F.rms_norm``,
``_fold``; CPU only, as the copies), and the r query heads and the key of a group are
QK-RMSNormed and rotated in one pass over the QKV output (Qwen3's layout, ``_qk_gains``). RoPE is
``x * cos + roll(x, d / 2) * signed sin`` (one ``addcmul``) everywhere. Other norms (LayerNorm,
RMSNorm without a gain, QK norms with different eps) and other dtypes (bf16 / fp16: torch's norm
rounds once, after its fp32 math; a folded gain or a separate scale would round twice and fail
the first-step check more often) run the norm modules. Measured: 3-8 % less CPU time per
``generate`` call (medians of paired calls in three A/B runs, identical tokens;
``benchmarks/bench_decode_ab.py --sections norms``, docs/trainer.md).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["FastDecoder", "LinearNorm", "compact_rows"]

# the linears of megatron's local and Transformer Engine layer specs (the same weight layouts);
# any other class (quantized, inference-only, ...) is refused
_LINEARS = {
    "linear_qkv": ("ColumnParallelLinear", "TELayerNormColumnParallelLinear",
                   "TEColumnParallelLinear"),
    "linear_proj": ("RowParallelLinear", "TERowParallelLinear"),
    "linear_fc1": ("ColumnParallelLinear", "TELayerNormColumnParallelLinear",
                   "TEColumnParallelLinear"),
    "linear_fc2": ("RowParallelLinear", "TERowParallelLinear"),
}  # fmt: skip
_NORM_INSIDE = {"input_layernorm": "linear_qkv", "pre_mlp_layernorm": "linear_fc1"}


class LinearNorm:
    """The norm a Transformer Engine ``LayerNormLinear`` applies before its matmul (megatron's
    TE spec fuses the input norm into ``linear_qkv`` and the pre-MLP norm into ``linear_fc1``,
    leaving ``IdentityOp`` in their place), as a callable on [..., in]: RMSNorm or LayerNorm
    (``normalization``) with gain ``layer_norm_weight`` (+ 1 with ``zero_centered_gamma``), shift
    ``layer_norm_bias`` and ``eps``: the attributes megatron's own TE code reads. Computed in
    fp32 and cast back (as TE does). No communication."""

    def __init__(self, linear):
        self.kind, self.eps = linear.normalization, float(linear.eps)
        gain = linear.layer_norm_weight.detach().float()
        self.weight = gain + 1.0 if getattr(linear, "zero_centered_gamma", False) else gain
        shift = getattr(linear, "layer_norm_bias", None)
        self.bias = None if shift is None or shift.numel() == 0 else shift.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.kind == "RMSNorm":
            y = F.rms_norm(x.float(), shape, self.weight, self.eps)
        else:
            y = F.layer_norm(x.float(), shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


def _identity(module) -> bool:
    """megatron's placeholder for a layer a spec leaves out."""
    return type(module).__name__ in ("IdentityOp", "IdentityFuncOp")


def _norm_before(norm, linear):
    """The norm applied before ``linear``: ``norm`` itself, or the one fused into a TE linear."""
    return LinearNorm(linear) if _identity(norm) and hasattr(linear, "layer_norm_weight") else norm


def _bias(layer):
    """A linear's bias, or None (TE keeps an empty tensor when there is none)."""
    bias = getattr(layer, "bias", None)
    return None if bias is None or bias.numel() == 0 else bias


class FastDecoder:
    """KV-cache forward of a local- or TE-spec GPTModel (see the module docstring).

    Args:
        module: the bare GPTModel (eval mode).
        batch: rows of the decode batch; total: most positions (the cache length).
        tp_group: the tensor-parallel group (None or size 1: no communication).
    """

    @staticmethod
    def unsupported(module) -> str | None:
        """Why this forward cannot reproduce ``module`` (None: it can)."""
        from megatron.core import parallel_state as ps

        cfg = getattr(module, "config", None)
        first = getattr(module, "pre_process", True)
        if cfg is None or not hasattr(module, "decoder"):
            return "not a megatron GPTModel"
        if getattr(module, "position_embedding_type", "rope") != "rope":
            return "position embeddings other than RoPE"
        if not hasattr(module, "rotary_pos_emb"):
            return "not a megatron GPTModel"
        if first and not hasattr(module, "embedding"):
            return "not a megatron GPTModel"
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            return "virtual pipeline parallelism"
        if len(module.decoder.layers) == 0:
            return "a pipeline stage without layers"
        if getattr(module, "position_embedding_type", None) != "rope":
            return "position embeddings other than RoPE"
        checks = {
            "sequence_parallel": False, "rotary_interleaved": False, "flash_decode": False,
            "apply_query_key_layer_scaling": False, "num_moe_experts": None,
            "multi_latent_attention": False, "attention_output_gate": False,
            "context_parallel_size": 1, "mtp_num_layers": None, "softmax_scale": None,
            "fp32_residual_connection": False, "fp8": None, "fp4": None, "window_size": None,
            "quant_recipe": None, "softmax_type": "vanilla", "no_rope_freq": None,
            "glu_linear_offset": 0.0, "activation_func_clamp_value": None,
        }  # fmt: skip
        for name, want in checks.items():
            if getattr(cfg, name, want) != want:
                return f"config.{name}={getattr(cfg, name)!r}"
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups < cfg.tensor_model_parallel_size:
            return "fewer query groups than TP ranks"
        if getattr(module.rotary_pos_emb, "rotary_percent", 1.0) != 1.0:
            return "partial rotary"
        for layer in module.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            names = {
                "input_layernorm": layer.input_layernorm,
                "pre_mlp_layernorm": layer.pre_mlp_layernorm,
                "linear_qkv": getattr(attn, "linear_qkv", None),
                "linear_proj": getattr(attn, "linear_proj", None),
                "linear_fc1": getattr(mlp, "linear_fc1", None),
                "linear_fc2": getattr(mlp, "linear_fc2", None),
            }  # fmt: skip
            for name, sub in names.items():
                kind = type(sub).__name__
                if name in _NORM_INSIDE:
                    linear = names[_NORM_INSIDE[name]]
                    fused = getattr(linear, "layer_norm_weight", None) is not None
                    identity = _identity(sub)
                    if (
                        fused
                        and identity
                        and getattr(linear, "normalization", None) in ("RMSNorm", "LayerNorm")
                    ):
                        continue  # TE spec: the norm is inside that linear
                    if fused or identity:  # a norm twice, or none, before the linear
                        return f"layer {name} is {kind} before a {type(linear).__name__}"
                elif kind not in _LINEARS[name]:  # other linears (quantized, inference-only, ..)
                    return f"layer {name} is {kind}"
            if not _identity(layer.cross_attention):
                return "cross attention"
        if getattr(module, "post_process", True) and module.decoder.final_layernorm is None:
            return "no final layernorm"
        return None

    def __init__(self, module, batch: int, total: int, tp_group=None, share=None):
        """A KV cache of ``batch`` rows x ``total`` positions for this stage's layers.
        ``share``: another FastDecoder of the same module whose weight copies and norm plans
        this one reuses (CPU: no second copy of the weights)."""
        from megatron.core import parallel_state as ps

        self.module = module
        self.cfg = cfg = module.config
        self.group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        # pipeline stage: the first embeds, the last gives logits, the others receive and send
        # hidden states [n, s, h] (p2p with the neighbouring stages' FastDecoders)
        self.first = getattr(module, "pre_process", True)
        self.last = getattr(module, "post_process", True)
        if not (self.first and self.last):
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
        attn = module.decoder.layers[0].self_attention
        self.d = attn.hidden_size_per_attention_head
        self.heads = attn.num_attention_heads_per_partition
        self.groups = attn.num_query_groups_per_partition
        self.scale = 1.0 / math.sqrt(self.d)
        weight = attn.linear_qkv.weight
        self.dtype, device = weight.dtype, weight.device
        emb = module.rotary_pos_emb(total)  # [total, 1, 1, d]
        emb = emb.reshape(total, -1).to(device)
        self.cos = emb.cos().to(self.dtype)
        # rotate_half(x) * sin == roll(x, d / 2) * sin with its first half negated
        sign = torch.ones(self.d, dtype=self.dtype, device=device)
        sign[: self.d // 2] = -1.0
        self.sin_signed = emb.sin().to(self.dtype) * sign
        shape = (len(module.decoder.layers), batch, self.groups, total, self.d)
        self.k = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=device)
        self.gated = cfg.gated_linear_unit
        self.act = cfg.activation_func
        # non-last stages: send hidden states without waiting for the receiver (``isend``) when
        # set (interleaved pipeline decoding); the last send's (work, tensor) until it is waited
        self.async_send = False
        self._sent = None
        if share is not None:
            if share.module is not module or share.dtype != self.dtype:
                raise ValueError("FastDecoder(share=...) must be a decoder of the same module")
            self.transposed, self.folded = share.transposed, share.folded
            self.norms, self.qk_norm = share.norms, share.qk_norm
            return
        # id(weight) -> (weight, weight.T contiguous) on CPU (module docstring); the weight is
        # kept so that its id cannot be reused by another tensor while this decoder lives
        self.transposed: dict = {}
        # id(norm) -> (norm, eps, weight, [in, out] copy scaled by the norm's gain) on CPU
        self.folded: dict = {}
        # layer i -> (input norm, pre-MLP norm): the modules, or for Transformer Engine's fused
        # LayerNormLinear (its norm inside linear_qkv / linear_fc1) a ``LinearNorm``
        self.norms = [
            (_norm_before(layer.input_layernorm, layer.self_attention.linear_qkv),
             _norm_before(layer.pre_mlp_layernorm, layer.mlp.linear_fc1))
            for layer in module.decoder.layers
        ]  # fmt: skip
        if device.type == "cpu":
            for layer, (norm_in, norm_mlp) in zip(module.decoder.layers, self.norms):
                attn, mlp = layer.self_attention, layer.mlp
                for sub in (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2):
                    w = sub.weight
                    self.transposed[id(w)] = (w, w.detach().t().contiguous())
                self._fold(norm_in, attn.linear_qkv.weight)
                self._fold(norm_mlp, mlp.linear_fc1.weight)
            if self.last:
                out = self._output_weight()
                self.transposed[id(out)] = (out, out.detach().t().contiguous())
                self._fold(module.decoder.final_layernorm, out)
        # layer i -> (eps, [r + 1, d] gains of the r query heads and the key) of its QK norms
        self.qk_norm = [self._qk_gains(layer.self_attention) for layer in module.decoder.layers]

    @staticmethod
    def _rms_eps(norm, size: int, dtype) -> float | None:
        """The eps of a torch RMSNorm over the last ``size`` features with a gain, for fp32
        parameters (None: another norm or dtype, which runs as its module). eps None is
        torch's default for fp32 input, ``finfo(float32).eps``."""
        if dtype != torch.float32 or type(norm) is not torch.nn.RMSNorm or norm.weight is None:
            return None
        if tuple(norm.normalized_shape) != (size,):
            return None
        return torch.finfo(torch.float32).eps if norm.eps is None else float(norm.eps)

    def _fold(self, norm, weight: torch.Tensor) -> None:
        """CPU: fold a torch RMSNorm's gain g into the [in, out] copy of the next linear's
        weight: RMSNorm(x) @ W^T = (rsqrt(mean(x^2) + eps) * x) @ (g[:, None] * W^T), so the
        norm is a gain-free ``F.rms_norm`` of x (``_norm_linear``)."""
        eps = self._rms_eps(norm, weight.shape[1], self.dtype)
        if eps is not None:
            wt = self.transposed[id(weight)][1]
            gain = norm.weight.detach().to(wt.dtype)
            self.folded[id(norm)] = (norm, eps, weight, gain[:, None] * wt)

    def _qk_gains(self, attn):
        """(eps, [r + 1, d] gains) when the QK norms are torch RMSNorms over d with one eps, so
        the r query heads and the key of a group normalise in one pass; None otherwise."""
        qn, kn = attn.q_layernorm, attn.k_layernorm
        if qn is None or kn is None:
            return None
        eps = self._rms_eps(qn, self.d, self.dtype)
        if eps is None or eps != self._rms_eps(kn, self.d, self.dtype):
            return None
        r = self.heads // self.groups
        gains = torch.stack([qn.weight.detach()] * r + [kn.weight.detach()])
        return eps, gains.to(self.dtype)

    def _norm_linear(self, norm, x: torch.Tensor, weight: torch.Tensor, bias=None):
        """``norm(x) @ weight^T (+ bias)`` for a column-parallel (or the output) linear
        [out / tp, in], folded (``_fold``) where it can be. Collectives: none."""
        entry = self.folded.get(id(norm))
        if entry is None or entry[0] is not norm or entry[2] is not weight:
            out = self._matmul(norm(x), weight)
        else:
            out = torch.matmul(self._rms(x, entry[1]), entry[3])
        return out if bias is None else out + bias

    @staticmethod
    def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
        """x * rsqrt(mean(x^2, -1) + eps) of fp32 x [..., f] (the fused paths are fp32 only): the
        gain-free RMSNorm in one torch call (a fused kernel where torch has one; on the CPU it
        equals the hand-written x * rsqrt(x.pow(2).mean(-1) + eps) bit for bit)."""
        return F.rms_norm(x, (x.shape[-1],), eps=eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, with sin the signed table (``sin_signed``)."""
        return torch.addcmul(x * cos, x.roll(self.d // 2, -1), sin)

    def _output_weight(self) -> torch.Tensor:
        m = self.module
        return (m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights
                else m.output_layer.weight)  # fmt: skip

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ weight[out, in]^T, with the transposed copy when there is one."""
        entry = self.transposed.get(id(weight))
        if entry is None or entry[0] is not weight:
            return F.linear(x, weight)
        return torch.matmul(x, entry[1])

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.module.embedding.word_embeddings
        if self.tp == 1:
            return F.embedding(tokens, emb.weight)
        start, end = emb.vocab_start_index, emb.vocab_end_index
        outside = (tokens < start) | (tokens >= end)
        local = F.embedding(torch.where(outside, 0, tokens - start), emb.weight)
        local.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self._reduce(local)

    def _linear(self, layer, x, reduce=None):
        out = self._matmul(x, layer.weight)
        if reduce is not None:
            out = reduce(out)
        bias = _bias(layer)
        return out if bias is None else out + bias

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend):
        """Every layer on hidden states h [n, s, hidden]; cos / sin (``sin_signed``) [..., d]
        broadcast against [n, s, heads, d] (and, unsqueezed at -2, [n, s, groups, r + 1, d]).
        ``attend(i, q, k, v)`` gets layer i's rotated queries [n, s, heads, d], keys and values
        [n, s, groups, d], writes the cache, returns the context [n, s, heads, d] (or any shape
        of that size). The r query heads and the key of a group are normalised (fused QK
        RMSNorm) and rotated in one pass where ``qk_norm`` allows. Collectives: 2 TP
        all-reduces of [n, s, h] per layer."""
        n, s = h.shape[:2]
        r = self.heads // self.groups
        cos_g, sin_g = cos.unsqueeze(-2), sin.unsqueeze(-2)  # against [n, s, groups, r + 1, d]
        for i, layer in enumerate(self.module.decoder.layers):
            attn, (norm_in, norm_mlp) = layer.self_attention, self.norms[i]
            qkv = self._norm_linear(norm_in, h, attn.linear_qkv.weight,
                                    _bias(attn.linear_qkv))  # fmt: skip
            qkv = qkv.view(n, s, self.groups, r + 2, self.d)  # megatron's per-group [q.., k, v]
            qk, v = qkv[..., : r + 1, :], qkv[..., r + 1, :]
            fused = self.qk_norm[i]
            if fused is not None or (attn.q_layernorm is None and attn.k_layernorm is None):
                if fused is not None:
                    eps, gains = fused
                    qk = self._rms(qk, eps).mul_(gains)
                qk = self._rope(qk, cos_g, sin_g)
                q, k = qk[..., :r, :].reshape(n, s, self.heads, self.d), qk[..., r, :]
            else:  # QK norms this forward does not fuse: their modules, then RoPE each
                q, k = qk[..., :r, :].reshape(n, s, self.heads, self.d), qk[..., r, :]
                if attn.q_layernorm is not None:
                    q = attn.q_layernorm(q)
                if attn.k_layernorm is not None:
                    k = attn.k_layernorm(k)
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            ctx = attend(i, q, k, v).reshape(n, s, self.heads * self.d)
            h = h + self._linear(attn.linear_proj, ctx, self._reduce)
            fc1 = layer.mlp.linear_fc1
            y = self._norm_linear(norm_mlp, h, fc1.weight, _bias(fc1))
            if self.gated:
                a, b = y.chunk(2, dim=-1)
                y = self.act(a) * b
            else:
                y = self.act(y)
            h = h + self._linear(layer.mlp.linear_fc2, y, self._reduce)
        return h

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: [n, hidden] -> vocab-parallel logits [n, V_pad / tp]."""
        return self._norm_linear(self.module.decoder.final_layernorm, last, self._output_weight())

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Positions [start, start + s) of rows [0, n); returns logits [n, V_pad / tp] of the last
        (on the last pipeline stage; None on the others).

        tokens: [n, s] int64 (s > 1 only for the prefill at start 0; every stage passes them).
        Writes the keys and values of these positions into this stage's layers' cache.
        Collectives: 1 (first stage) + 2 * layers TP all-reduces of [n, s, h] (none at TP 1);
        under pipeline parallelism also 1 p2p recv (every stage but the first) and 1 send
        (every stage but the last) of [n, s, h].
        """
        n, s = tokens.shape
        end = start + s
        if s > 1 and start != 0:
            raise ValueError("multi-token forwards must start at position 0")
        r = self.heads // self.groups

        def attend(i, q, k, v):
            self.k[i, :n, :, start:end] = k.transpose(1, 2)
            self.v[i, :n, :, start:end] = v.transpose(1, 2)
            keys, values = self.k[i, :n, :, :end], self.v[i, :n, :, :end]
            if s == 1:  # decode: the r query heads of a group attend to its keys, no expansion
                return F.scaled_dot_product_attention(
                    q.view(n, self.groups, r, self.d), keys, values, scale=self.scale
                )  # [n, groups, r, d] = [n, heads, d] in megatron's head order
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, is_causal=True, scale=self.scale,
                enable_gqa=r > 1,
            ).transpose(1, 2)  # fmt: skip

        cos, sin = self.cos[start:end, None, :], self.sin_signed[start:end, None, :]  # [s, 1, d]
        h = self._layers(self._stage_input(tokens), cos, sin, attend)
        if not self.last:
            self._send(h.contiguous())
            return None
        return self._logits(h[:, -1])

    def _send(self, h: torch.Tensor) -> None:
        """To the next stage: 1 p2p send, or with ``async_send`` 1 isend (this decoder's
        previous isend waited first, so at most one is in flight and its tensor stays alive)."""
        if not self.async_send:
            dist.send(h, dst=self.next_rank)
            return
        self.wait_sent()
        self._sent = (dist.isend(h, dst=self.next_rank), h)

    def wait_sent(self) -> None:
        """Wait for the hidden states ``async_send`` sent last, if any."""
        if self._sent is not None:
            self._sent[0].wait()
            self._sent = None

    def _single_stage(self, what: str) -> None:
        if not (self.first and self.last):
            raise RuntimeError(f"FastDecoder.{what} is PP 1 only (continuous batching)")

    def _stage_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, s, hidden] entering this stage: the embeddings of tokens [n, s]
        (first stage) or the previous stage's output (1 p2p recv)."""
        if self.first:
            return self._embed(tokens).to(self.dtype)
        n, s = tokens.shape
        h = torch.empty(n, s, self.cfg.hidden_size, dtype=self.dtype, device=self.k.device)
        dist.recv(h, src=self.prev_rank)
        return h

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor,
                    end: int | None = None) -> torch.Tensor:  # fmt: skip
        """One token per row at its own position (continuous batching).

        tokens: [n] int64, the input token of cache rows [0, n); positions: [n] int64 (device)
        where each sits (its keys and values are written there; it attends to positions
        [0, position]); end: max(positions) + 1 when the caller knows it on the host (no device
        sync; None: read from ``positions``). Returns logits [n, V_pad / tp] predicting
        position + 1. Collectives: 1 + 2 * layers TP all-reduces of [n, 1, h] (none at TP 1).
        """
        self._single_stage("decode_rows")
        n = tokens.shape[0]
        end = int(positions.max()) + 1 if end is None else int(end)
        r = self.heads // self.groups
        rows = torch.arange(n, device=tokens.device)
        mask = (torch.arange(end, device=tokens.device) <= positions[:, None])[:, None, None, :]

        def attend(i, q, k, v):
            self.k[i, rows, :, positions] = k[:, 0]  # [n, groups, d]
            self.v[i, rows, :, positions] = v[:, 0]
            return F.scaled_dot_product_attention(
                q.view(n, self.groups, r, self.d), self.k[i, :n, :, :end],
                self.v[i, :n, :, :end], attn_mask=mask, scale=self.scale,
            )  # fmt: skip

        h = self._embed(tokens[:, None]).to(self.dtype)  # [n, 1, hidden]
        cos = self.cos[positions][:, None, None, :]  # [n, 1, 1, d]
        sin = self.sin_signed[positions][:, None, None, :]
        return self._logits(self._layers(h, cos, sin, attend)[:, 0])

    def prefill_rows(self, tokens: torch.Tensor, lens: torch.Tensor,
                     slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Prompts into cache rows ``slots`` (continuous batching refills freed rows).

        tokens: [m, s] int64 right-padded prompts (positions [0, s)); lens: [m] int64 (device)
        their lengths; slots: [m] int64 (device) cache rows to write (positions >= len hold
        padding's keys, never attended: later tokens overwrite them first). Returns logits
        [m, V_pad / tp] predicting position len of each prompt.
        Collectives: 1 + 2 * layers TP all-reduces of [m, s, h] (none at TP 1).
        """
        self._single_stage("prefill_rows")
        m, s = tokens.shape
        r = self.heads // self.groups

        def attend(i, q, k, v):
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [m, groups, s, d]
            self.k[i, slots, :, :s] = k
            self.v[i, slots, :, :s] = v
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, is_causal=True, scale=self.scale, enable_gqa=r > 1
            ).transpose(1, 2)

        h = self._embed(tokens).to(self.dtype)  # [m, s, hidden]
        cos, sin = self.cos[:s, None, :], self.sin_signed[:s, None, :]
        h = self._layers(h, cos, sin, attend)
        return self._logits(h[torch.arange(m, device=h.device), lens - 1])

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy cache rows ``src`` to rows ``dst`` (device int64 [m], disjoint), first ``length``
        positions. No communication."""
        for cache in (self.k, self.v):
            cache[:, dst, :, :length] = cache[:, src, :, :length]

    def compact(self, idx: torch.Tensor, cached: int) -> None:
        """Keep rows ``idx`` (device int64, ascending) of the cache as rows [0, len(idx)), first
        ``cached`` positions copied (``compact_rows``: in place, no second cache)."""
        for cache in (self.k, self.v):
            compact_rows(cache, idx, cached, batch_dim=1, pos_dim=3)


def compact_rows(cache: torch.Tensor, idx: torch.Tensor, length: int, batch_dim: int,
                 pos_dim: int) -> None:  # fmt: skip
    """Move rows ``idx`` (ascending and distinct, int64 on the cache's device; checked when
    that is the CPU) of ``cache`` along
    ``batch_dim`` to rows [0, len(idx)), positions [0, length) along ``pos_dim``, in place.

    The copy runs in chunks of about an eighth of the batch: row j's source idx[j] >= j, so a
    chunk never reads a row an earlier chunk wrote, and the temporary is one chunk's rows rather
    than a second cache (which would double the KV memory at the moment of compaction).
    No communication.
    """
    if idx.device.type == "cpu" and bool((idx[1:] <= idx[:-1]).any()):  # free on the host
        raise ValueError("compact_rows needs ascending, distinct row indices")
    cached = cache.narrow(pos_dim, 0, length)
    step = max(1, cache.shape[batch_dim] // 8)
    for lo in range(0, len(idx), step):
        src = idx[lo : lo + step]
        cached.narrow(batch_dim, lo, len(src)).copy_(cached.index_select(batch_dim, src))
