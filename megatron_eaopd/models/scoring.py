"""Teacher scoring of the student's micro-batches when the two models use different layouts.

`score_for_student` is called on every rank with the micro-batches of this rank's student
data-parallel replica. The replicas may hold different numbers of micro-batches and rows
(evaluation splits prompt sets unevenly), and micro-batches differ in width (the trainer pads each
only to its own longest sequence) and in rows (``rollout.micro_batch_tokens``); the teacher runs
under its own TP x PP layout, whose data-parallel replicas are other groups of the same ranks.
Everything between the two travels point to point (:mod:`megatron_eaopd.parallel.exchange`): each
teacher replica receives only the token ids it scores, and each student rank that computes the
loss receives only its own replica's payload.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["payload_bytes_per_position", "score_for_student"]


def payload_bytes_per_position(k: int) -> int:
    """Bytes of teacher payload one receiving student rank gets per token position: fp32
    entropy, sampled-token log-prob, k top-k log-probs and k top-k ids (exact in fp32)."""
    return 4 * (2 + 2 * k)


def _check_replica_agreement(meta: torch.Tensor, table, student: int) -> None:
    """Ranks of one student replica must hold the same micro-batches (same M, shapes): ``meta``
    rows [M, most rows, widest, varied, widths..., rows...] per world rank."""
    dp = table.sizes[student][0]
    for i in range(dp):
        ranks = table.ranks(student, dp=i)
        rows = meta[ranks]
        if not bool((rows == rows[0]).all()):
            raise ValueError(
                f"score_for_student: the ranks {ranks} of student data-parallel replica {i} hold "
                f"different micro-batches (count, most rows, widest, shapes differ, widths, rows "
                f"per rank: {rows.tolist()}); every rank of a replica must pass the same "
                "micro-batches"
            )


def _check_arguments(teacher, k, vocab_size, temperature) -> None:
    """The arguments every rank passes alike, checked before any collective so that every rank
    raises (the payload kernels would raise on the scoring ranks only, leaving the others
    waiting in the exchange). ``teacher``'s recorded model config, where there is one, bounds
    ``vocab_size``: columns past the teacher's vocabulary are padding."""
    from megatron_eaopd.losses._common import check_temperature

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 1")
    if vocab_size >= 2**24:
        raise ValueError(f"vocab_size={vocab_size} too large for the fp32 id transport (< 2**24)")
    chunks = getattr(teacher, "chunks", None) or [None]
    cfg = getattr(chunks[0], "eaopd_model_config", None)
    if cfg is not None and vocab_size > cfg.vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the teacher's vocabulary "
            f"({cfg.vocab_size}): pass the real vocabulary size the student and teacher share"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={vocab_size}]")
    check_temperature(temperature)


def score_for_student(
    teacher,
    batches,
    *,
    k: int,
    vocab_size: int,
    teacher_layout: str = "teacher",
    student_layout: str = "student",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    fused: bool = True,
    fused_chunk_size: int | None = None,
) -> list:
    """Score this rank's student micro-batches with a teacher that runs under its own layout.

    Call on every rank of the world. ``batches``: this rank's micro-batches, dicts of "tokens"
    and "labels" [b, s] int64 and optionally "position_ids" (must be 0 .. s-1: right-padded,
    position-aligned sequences); identical on every rank of one student data-parallel replica.
    Replicas may pass different counts M_i (0 included); micro-batch m of replica i is
    [b_im, s_im] (rows and widths may differ between micro-batches).
    ``chunk_size``: tokens per chunk of the payload kernels (``loss.chunk_size``; memory only).
    ``fused`` (``loss.fused_output``): the payload from the teacher's hidden states and output
    weight, ``fused_chunk_size`` tokens at a time, never the [s, b, V_pad / tp] logits
    (:meth:`FrozenTeacher.score`); the same payload up to float rounding.

    Steps (G = sum of M_i micro-batches, global index g = (replica i, local m)):

    1. One all-gather over the world of [4] int64 per rank (M, most rows, widest s, whether the
       micro-batches differ in shape), a second one of the M_max widths and rows per rank only
       when some rank's shapes differ, and on the first call for these layouts one of the rank
       table (:func:`parallel.exchange.layout_table`).
    2. Teacher replica r scores the contiguous share g in [r G / dp_t, (r + 1) G / dp_t) (shares
       differ by at most one), each micro-batch at its own [b_g, s_g]; under the teacher's
       pipeline parallelism with shapes that differ, megatron's schedule sends each activation's
       shape first. Tokens and labels reach every rank of replica r point to point as int32
       [2, b_im, s_im]: 8 bytes per position per receiving rank.
    3. The payload of micro-batch g goes point to point from the teacher replica's last-stage TP
       ranks (round-robin) to the student replica's last-stage ranks only: one fp32
       [s_im, b_im, 2 + 2k] tensor, :func:`payload_bytes_per_position` bytes
       (136 at k = 16) per position per receiving rank. Besides these, the teacher forward's own
       collectives (pipeline p2p, TP all-reduces, one TP all-gather per micro-batch), and one
       MAX all-reduce of one element over the world before step 3: whether the teacher's last
       stage found non-finite logits (``NonFiniteLogitsError`` on every rank then).

    Returns M entries: on the student's last pipeline stage TeacherPayload (entropy [s, b],
    token_logprobs [s, b], topk_logprobs [s, b, k], topk_ids [s, b, k] int64); on other stages
    None (the loss runs only on the last stage).
    """
    from megatron_eaopd.losses import TeacherPayload
    from megatron_eaopd.losses._common import NonFiniteLogitsError
    from megatron_eaopd.parallel.exchange import exchange, layout_table, spread
    from megatron_eaopd.parallel.groups import all_gather_rows, any_rank
    from megatron_eaopd.parallel.init import compute_device, registered_layout, use_layout

    _check_arguments(teacher, k, vocab_size, temperature)
    batches = list(batches)
    device = compute_device()
    me = dist.get_rank()
    s_layout, t_layout = registered_layout(student_layout), registered_layout(teacher_layout)
    table = layout_table([s_layout, t_layout])
    S_, T_ = 0, 1
    dp_s = s_layout.dp
    dp_t, pp_t = t_layout.dp, t_layout.pp

    # a bad input is reported through the shape all-gather, so every rank raises (no rank is
    # left waiting in a collective): count -1 = tokens not [b, s], -2 = position ids
    # not 0..s-1, -3 = labels not of the tokens' shape, -4 = a token or label id outside
    # [0, vocab_size), -5 = tokens or labels missing (None), -6 = packed sequences, -7 = a
    # micro-batch without rows or positions
    missing = any(not isinstance(b.get(key), torch.Tensor) for b in batches
                  for key in ("tokens", "labels"))  # fmt: skip
    packed = any(b.get("packed_seq_params") is not None for b in batches)
    flat = not missing and all(b["tokens"].dim() == 2 for b in batches)
    row_counts = [int(b["tokens"].shape[0]) for b in batches] if flat else []
    widths = [int(b["tokens"].shape[1]) for b in batches] if flat else []
    b_loc, s_loc = max(row_counts, default=0), max(widths, default=0)
    count = -5 if missing else -6 if packed else len(batches) if flat else -1
    out_of_range = torch.zeros((), dtype=torch.bool, device=device)  # no host sync per batch
    for mb in batches if count >= 0 else ():
        pos = mb.get("position_ids")
        b_mb, s_mb = mb["tokens"].shape
        if b_mb == 0 or s_mb == 0:
            count = -7
        elif pos is not None and not torch.equal(pos.cpu(), torch.arange(s_mb).expand(b_mb, -1)):
            count = -2
        elif tuple(mb["labels"].shape) != tuple(mb["tokens"].shape):
            count = -3
        else:
            for t in (mb["tokens"], mb["labels"]):
                out_of_range |= ((t < 0) | (t >= vocab_size)).any().to(device)
    varied = int(len(set(zip(widths, row_counts))) > 1)
    mine = torch.tensor([[count, b_loc, s_loc, varied]], dtype=torch.long, device=device)
    if count >= 0:
        mine[0, 0] = torch.where(out_of_range, -4, mine[0, 0])
    meta = all_gather_rows(mine, dist.group.WORLD).cpu().view(-1, 4)
    bad = {int(r): int(meta[r, 0]) for r in range(meta.shape[0]) if meta[r, 0] < 0}
    if bad:
        why = {-1: "tokens that are not [b, s]",
               -2: "position_ids that are not 0 .. s-1 on every row",
               -3: "labels of another shape than tokens (both [b, s])",
               -4: f"token or label ids outside [0, vocab_size={vocab_size}) (masked positions "
                   "too: give them any valid id, e.g. 0)",
               -5: "micro-batches without tokens or labels (Megatron-LM's get_batch gives "
                   "tokens only to the first pipeline stage and labels only to the last: build "
                   "the whole micro-batches on every rank)",
               -6: "packed sequences (packed_seq_params): pass [b, s] rows",
               -7: "a micro-batch with 0 rows or 0 positions: leave empty ones out of the "
                   "list"}  # fmt: skip
        raise ValueError(
            "score_for_student: " + "; ".join(f"rank {r}: {why[c]}" for r, c in sorted(bad.items()))
        )
    # per-micro-batch widths and rows: a second all-gather only when some rank's shapes differ
    cap = max(1, int(meta[:, 0].max()))
    if bool(meta[:, 3].any()):
        row = torch.zeros(1, 2 * cap, dtype=torch.long, device=device)
        row[0, : len(widths)] = torch.tensor(widths, dtype=torch.long)
        row[0, cap : cap + len(row_counts)] = torch.tensor(row_counts, dtype=torch.long)
        shapes = all_gather_rows(row, dist.group.WORLD).cpu().view(-1, 2 * cap)
        all_widths, all_rows = shapes[:, :cap], shapes[:, cap:]
    else:
        all_widths = meta[:, 2:3].expand(-1, cap)
        all_rows = meta[:, 1:2].expand(-1, cap)
    _check_replica_agreement(torch.cat([meta, all_widths, all_rows], dim=1), table, S_)

    # the global list of micro-batches: (replica, local index, rows, width)
    index = []
    per_replica = []
    for i in range(dp_s):
        first_rank = table.ranks(S_, dp=i)[0]
        count = int(meta[first_rank, 0])
        per_replica.append(count)
        index += [(i, m, int(all_rows[first_rank, m]), int(all_widths[first_rank, m]))
                  for m in range(count)]  # fmt: skip
    total = len(index)
    if total == 0:
        return []
    bounds = [r * total // dp_t for r in range(dp_t + 1)]
    owner_t = [next(r for r in range(dp_t) if bounds[r] <= g < bounds[r + 1]) for g in range(total)]
    my_s = tuple(table.coords[me, S_].tolist())  # (dp, pp, tp) of this rank
    my_t = tuple(table.coords[me, T_].tolist())

    # 2. tokens and labels to the teacher replica that scores them
    sends, recvs, local = [], [], {}
    inbox = {}
    for g, (i, m, b, s) in enumerate(index):
        pairs = spread(table.ranks(S_, dp=i), table.ranks(T_, dp=owner_t[g]))
        for src, dst in pairs:
            if src == me:
                packed = torch.stack([batches[m]["tokens"], batches[m]["labels"]]).to(
                    device=device, dtype=torch.int32
                )
                if dst == me:
                    local[g] = packed
                else:
                    sends.append((dst, packed))
            elif dst == me:
                inbox[g] = torch.empty(2, b, s, dtype=torch.int32, device=device)
                recvs.append((src, inbox[g]))
    exchange(sends, recvs)
    inbox.update(local)

    share = list(range(bounds[my_t[0]], bounds[my_t[0] + 1]))
    scored, failed = {}, None
    if share:
        to_score = []
        for g in share:
            _, _, b, s = index[g]
            grid = inbox[g].long()
            to_score.append(
                {
                    "tokens": grid[0],
                    "labels": grid[1],
                    "position_ids": torch.arange(s, device=device).expand(b, -1),
                }
            )
        try:
            with use_layout(teacher_layout):
                payloads = teacher.score(
                    to_score,
                    max(index[g][3] for g in share),
                    max(index[g][2] for g in share),
                    payload_k=k,
                    vocab_size=vocab_size,
                    temperature=temperature,
                    chunk_size=chunk_size,
                    fused=fused,
                    fused_chunk_size=fused_chunk_size,
                )
        except NonFiniteLogitsError as err:  # found on the teacher's last stage only
            failed, payloads = err, []
        for g, p in zip(share, payloads):  # empty unless this is the teacher's last stage
            _, _, b, s = index[g]
            pack = torch.cat(
                [
                    p.entropy[:, :, None],
                    p.token_logprobs[:, :, None],
                    p.topk_logprobs,
                    p.topk_ids.float(),
                ],
                dim=-1,
            )
            scored[g] = pack.float().contiguous()
    # every rank raises, none is left waiting in the exchange below for a payload
    if any_rank(failed is not None, dist.group.WORLD, device):
        raise failed or NonFiniteLogitsError(
            "the teacher's last pipeline stage (other ranks) found non-finite logits; their "
            "message names the cause"
        )

    # 3. payloads from the teacher's last stage to the student's last stage
    sends, recvs, local, inbox = [], [], {}, {}
    width_k = 2 + 2 * k
    for g, (i, _, b, s) in enumerate(index):
        sources = table.ranks(T_, dp=owner_t[g], pp=pp_t - 1)
        dests = table.ranks(S_, dp=i, pp=s_layout.pp - 1)
        for src, dst in spread(sources, dests):
            if src == me:
                if dst == me:
                    local[g] = scored[g]
                else:
                    sends.append((dst, scored[g]))
            elif dst == me:
                inbox[g] = torch.empty(s, b, width_k, dtype=torch.float32, device=device)
                recvs.append((src, inbox[g]))
    exchange(sends, recvs)
    inbox.update(local)

    if my_s[1] != s_layout.pp - 1:
        return [None] * len(batches)
    out = []
    first = sum(per_replica[: my_s[0]])
    for m in range(len(batches)):
        t = inbox[first + m]
        out.append(
            TeacherPayload(
                t[..., 0].contiguous(),
                t[..., 1].contiguous(),
                t[..., 2 : 2 + k].contiguous(),
                t[..., 2 + k :].round().long(),
            )
        )
    return out
