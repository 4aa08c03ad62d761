"""Shared pieces of the model tests: toy batches, a cross-entropy forward step, global state.

Everything here runs inside spawned gloo workers (see tests/dist.py).
"""

from __future__ import annotations

import torch

from megatron_eaopd.models import config as mcfg


def make_batches(num_microbatches: int, micro_batch_size: int, seq_len: int, vocab: int, seed=0):
    """Deterministic micro-batches: dicts of tokens, labels (shifted), position ids; [b, s] each."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        ids = torch.randint(0, vocab, (micro_batch_size, seq_len + 1), generator=gen)
        pos = torch.arange(seq_len).unsqueeze(0).expand(micro_batch_size, seq_len).contiguous()
        batches.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos})
    return batches


def chunk_iterators(batches, num_chunks: int):
    """One iterator over the same micro-batches per model chunk (megatron's VPP convention)."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]


def ce_forward_step(vocab_size: int, captured: list | None = None):
    """A forward_step_func: GPT forward, then megatron's vocab_parallel_cross_entropy (mean).

    When `captured` is a list, the full-vocabulary logits [b, s, vocab_size] (gathered over TP)
    and the torch cross-entropy of them are appended on the last stage.
    """
    from megatron.core import tensor_parallel

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(logits):  # logits: [b, s, V_pad / tp]
            sb_logits = logits.float().transpose(0, 1).contiguous()
            labels = batch["labels"].transpose(0, 1).contiguous()
            # clone: vocab_parallel_cross_entropy modifies fp32 logits in place
            per_token = tensor_parallel.vocab_parallel_cross_entropy(sb_logits.clone(), labels)
            loss = per_token.mean()
            # clone: megatron divides the returned loss by num_microbatches in place
            value = loss.detach().clone()
            if captured is not None:
                full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach())
                full = full[..., :vocab_size].float()
                ref = torch.nn.functional.cross_entropy(
                    full.reshape(-1, vocab_size), batch["labels"].reshape(-1)
                )
                captured.append({"logits": full, "torch_loss": ref, "loss": value})
            return loss, {"loss": value}

        return output, loss_func

    return forward_step


def global_pieces(chunks, grads: bool = False) -> dict:
    """{checkpoint key: [(global index, local tensor)]} of this rank's weights or main grads.

    Uses megatron's sharded state dict (keys and global offsets are layout-independent), so pieces
    from all ranks of any layout assemble into the same global tensors.
    """
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_eaopd.models.builder import _iter_sharded_tensors

    out: dict = {}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        params = list(module.parameters())
        sd = module.sharded_state_dict()
        apply_factories(sd)
        for sh in _iter_sharded_tensors(sd):
            if sh.key.endswith("_extra_state") or not torch.is_floating_point(sh.data):
                continue
            data = sh.data
            if grads:
                data = _grad_view(data, params)
            out.setdefault(sh.key, []).append((sh.global_slice(), data.detach().float().clone()))
    return out


def _grad_view(data, params):
    """The main_grad slice matching `data`, a parameter or a contiguous view into one."""
    for p in params:
        if data.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
            continue
        grad = p.main_grad if hasattr(p, "main_grad") else p.grad
        offset = data.storage_offset() - p.storage_offset()
        return grad.reshape(-1)[offset : offset + data.numel()].view(data.shape)
    raise KeyError("no parameter owns this tensor")


def assemble(pieces_by_rank: list[dict]) -> dict:
    """Global tensors from the pieces of every rank; replicas must agree exactly."""
    shapes: dict = {}
    for pieces in pieces_by_rank:
        for key, items in pieces.items():
            for index, _ in items:
                shape = []
                for i in index:
                    shape.append(i + 1 if isinstance(i, int) else i.stop)
                prev = shapes.get(key, [0] * len(shape))
                shapes[key] = [max(a, b) for a, b in zip(prev, shape)]
    full = {k: torch.full(tuple(s), float("nan")) for k, s in shapes.items()}
    for pieces in pieces_by_rank:
        for key, items in pieces.items():
            for index, tensor in items:
                target = full[key][index]
                written = ~torch.isnan(target)
                if written.any():
                    assert torch.equal(target[written], tensor.reshape(target.shape)[written]), key
                full[key][index] = tensor.reshape(target.shape)
    for key, value in full.items():
        assert not torch.isnan(value).any(), f"{key}: part of the global tensor was never written"
    return full


def preset(name: str):
    return mcfg.get_preset(name)
