"""Write megatron GPTModel chunks, from any TP x PP (x VPP) layout, as a Hugging Face folder.

Every rank calls `save_hf_weights`; global rank 0 writes. The folder is assembled in a temporary
sibling directory and renamed into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import torch
import torch.distributed as dist

from megatron_eaopd.models.config import ModelConfig
from megatron_eaopd.models.hf.config import default_architecture, hf_config_dict
from megatron_eaopd.models.hf.layout import chunk_layer_index, expected_hf_shapes, param_pieces
from megatron_eaopd.models.hf.load import bare_chunks

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_MARKER", "TOKENIZER_FILES", "is_project_export", "save_hf_weights"]

OUT_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
#: Written into every export: what wrote it and from what. An existing folder is replaced only
#: when it is an export (``is_project_export``), never another model's folder.
EXPORT_MARKER = "eaopd_export.json"
_WRITER = "megatron-eaopd save_hf_weights"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _token_ids_from(folder: str | None) -> dict:
    """bos/eos/pad ids from generation_config.json or config.json in `folder` (if any)."""
    found: dict = {}
    for name in ("config.json", "generation_config.json"):  # the latter wins
        path = os.path.join(folder or "", name)
        if folder and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            found.update({k: data[k] for k in _TOKEN_KEYS if data.get(k) is not None})
    return found


def _local_pieces(chunks, cfg: ModelConfig, tp_rank: int, tp: int) -> list:
    """[(Piece, tensor view)] of this rank; the tied output-layer copy is skipped."""
    out = []
    for chunk in chunks:
        layers = chunk_layer_index(chunk)
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and cfg.tied_embeddings:
                continue  # a copy of the embedding (PP > 1); HF stores it once
            pieces, _ = param_pieces(name, param.shape, cfg, tp_rank, tp, layers)
            out.extend((p, param.detach()[p.local_slices()]) for p in pieces)
    return out


def _plan(manifests: list[list], shapes: dict) -> dict[str, list]:
    """{HF key: [(owner rank, hf_index)]}: one owner per block (the lowest rank holding it).

    Raises ValueError when the blocks of the ranks do not tile a tensor exactly.
    """
    plan: dict[str, dict] = {key: {} for key in shapes}
    for rank, manifest in enumerate(manifests):
        for key, index in manifest:
            if key not in plan:
                raise ValueError(f"a rank holds {key!r}, which the HF model does not have")
            plan[key].setdefault(tuple(index), rank)
    out = {}
    for key, blocks in plan.items():
        total = 1
        for n in shapes[key]:
            total *= n
        covered = 0
        for index in blocks:
            n = 1
            for a, b in index:
                n *= b - a
            covered += n
        if covered != total:
            raise ValueError(
                f"the ranks' blocks of {key!r} cover {covered} of {total} elements: the model "
                f"chunks do not form one whole model (are all ranks calling save_hf_weights?)"
            )
        out[key] = [(owner, index) for index, owner in blocks.items()]
    return out


def _shards(shapes: dict, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current:
        shards.append(current)
    return shards


def is_project_export(folder: str) -> bool:
    """Whether ``folder`` was written by ``save_hf_weights``: it holds ``EXPORT_MARKER``, or
    (exports of earlier versions, which wrote no marker) a config.json with exactly the keys
    ``hf_config_dict`` writes. Any other folder is not one: ``save_pretrained`` adds
    ``transformers_version`` (and other keys) to every config.json. Reads files only."""
    marker = os.path.join(folder, EXPORT_MARKER)
    try:
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                return json.load(f).get("written_by") == _WRITER
        from megatron_eaopd.models.hf.config import model_config_from_hf, read_hf_config

        data = read_hf_config(folder)
        cfg = model_config_from_hf(folder, params_dtype="float32")
        arch = (data.get("architectures") or [None])[0]
        return set(data) == set(hf_config_dict(cfg, architecture=arch))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _prepare_out(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out_dir!r} exists and is not empty: choose a new folder or pass "
                f"overwrite=True"
            )
        if not os.path.isdir(out_dir) or not is_project_export(out_dir):
            raise FileExistsError(
                f"output folder {out_dir!r} exists and is not an export of this project (no "
                f"{EXPORT_MARKER}): overwrite=True replaces earlier exports only. Choose a new "
                f"folder, or move this one away if you mean to replace it"
            )


@torch.no_grad()
def save_hf_weights(
    model_chunks,
    out_dir: str,
    *,
    model_config: ModelConfig | None = None,
    dtype: str | torch.dtype = "bfloat16",
    tokenizer_dir: str | None = None,
    architecture: str | None = None,
    token_ids: dict | None = None,
    generation_config: dict | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = False,
    export_info: dict | None = None,
) -> str:
    """Write the model as an HF folder loadable by `AutoModelForCausalLM.from_pretrained`.

    Writes config.json (`architecture`: Qwen3ForCausalLM / Qwen2ForCausalLM / LlamaForCausalLM,
    default model_config.architecture or the family the shape fits), model.safetensors or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json (shards of at most
    `max_shard_bytes`), generation_config.json, with `tokenizer_dir` its tokenizer files, and
    ``eaopd_export.json`` (``EXPORT_MARKER``: what wrote the folder, `export_info`), which marks
    the folder as one a later export may replace. Padded vocabulary rows are dropped; a tied
    model stores no lm_head.weight.

    Args:
        model_chunks: every rank's chunks (list, FrozenTeacher, Student or DDP-wrapped), called
            inside the layout they were built in.
        model_config: the model's shape; default: the one build_model recorded on the chunks.
        dtype: 'bf16' / 'bfloat16', 'fp32' / 'float32' or 'fp16' (or a torch dtype).
        tokenizer_dir: folder whose tokenizer files (and generation_config.json) are copied.
        token_ids: bos_token_id / eos_token_id / pad_token_id for the configs; default: those in
            tokenizer_dir's generation_config.json / config.json.
        generation_config: generation_config.json contents; default: tokenizer_dir's file, else
            the token ids.
        overwrite: replace a non-empty out_dir that is an earlier export
            (``is_project_export``; renamed away only once the new one is complete); any other
            non-empty folder is refused (FileExistsError) either way.
        export_info: JSON-serialisable facts recorded in the marker file (the checkpoint, the
            run), from rank 0.
    Returns:
        out_dir.
    Collectives (WORLD): 1 all_gather_object of the block manifests (keys and ranges, no data);
    one send/recv to rank 0 per block held by another rank (each in `dtype`); 1 all_gather_object
    of every rank's status at the start and twice per shard: after its local work (casts, rank
    0's buffers) and after its transfer and write. A failure there on any rank (out of memory,
    rank 0's disk filling up) stops all ranks instead of leaving them blocked in sends or
    receives; a failure of the point-to-point transfer itself is left to the group's timeout;
    1 broadcast_object of rank 0's outcome and a barrier.
    """
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import rank0_object

    chunks = bare_chunks(model_chunks)
    cfg = model_config or getattr(chunks[0], "eaopd_model_config", None)
    if cfg is None:
        raise ValueError("pass model_config: these chunks were not built by models.build_model")
    if isinstance(dtype, str):
        if dtype not in OUT_DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
        dtype = OUT_DTYPES[dtype]
    architecture = architecture or default_architecture(cfg)
    ids = dict(token_ids) if token_ids is not None else _token_ids_from(tokenizer_dir)
    config = hf_config_dict(cfg, architecture=architecture, dtype=_dtype_name(dtype), token_ids=ids)
    marker = {"written_by": _WRITER, "architecture": architecture, "dtype": _dtype_name(dtype),
              **(export_info or {})}  # fmt: skip
    json.dumps(marker)  # fail on every rank before any collective if it is not serialisable
    _prepare_out(out_dir, overwrite)
    if tokenizer_dir:
        _tokenizer_files(tokenizer_dir)  # fail on every rank before any collective

    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    local = _local_pieces(chunks, cfg, tp_rank, tp)
    manifest = [(p.hf_key, p.hf_index) for p, _ in local]
    if _world() > 1:
        manifests: list = [None] * _world()
        dist.all_gather_object(manifests, manifest)
    else:
        manifests = [manifest]
    shapes = expected_hf_shapes(cfg)
    plan = _plan(manifests, shapes)
    mine = {(p.hf_key, p.hf_index): t for p, t in local}
    rank = _rank()
    shards = _shards(shapes, torch.empty((), dtype=dtype).element_size(), max_shard_bytes)

    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:8]}"
    bar = None
    weight_map, total_bytes = {}, 0
    committed = False

    def start():
        nonlocal bar
        if rank == 0:
            os.makedirs(tmp)
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(shapes), desc=f"export {out_dir}", unit="tensor")

    def write(prepared, name) -> int:
        """Transfer one prepared shard; rank 0 writes it. Returns the bytes written."""
        tensors = _transfer_shard(prepared, rank, bar)
        if rank == 0:
            _write_safetensors(tensors, os.path.join(tmp, name))
            weight_map.update(dict.fromkeys(tensors, name))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    try:
        # Every rank learns after each step whether any rank failed, and all stop together: a
        # rank that went on sending blocks to a rank 0 that stopped receiving (or the reverse)
        # would wait forever. Each shard: its local work that can fail (casts, rank 0's
        # buffers: out of memory), then the transfer and rank 0's write (a full disk).
        _, error = _together(start)
        for i, keys in enumerate(shards):
            if error:
                break
            name = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            prepared, error = _together(_prepare_shard, keys, shapes, plan, mine, dtype, rank)
            if not error:
                written, error = _together(write, prepared, name)
                total_bytes += written or 0
            del prepared  # one shard's tensors alive at a time
        if not error and rank == 0:
            _, error = _attempt(_write_folder, tmp, config, weight_map, total_bytes, len(shards),
                                tokenizer_dir, ids, generation_config, marker)  # fmt: skip
            if not error:
                _, error = _attempt(_commit, tmp, out_dir, overwrite)
            error = f"rank 0: {error}" if error else None
        committed = rank == 0 and not error
        if _world() > 1:
            status = rank0_object(error)  # every rank calls it: not short-circuited
            error = error or status
    finally:
        if bar is not None:
            bar.close()
        if rank == 0 and not committed:  # the temporary folder of a failed export
            shutil.rmtree(tmp, ignore_errors=True)
    if _world() > 1:
        dist.barrier()
    if error:
        raise RuntimeError(f"exporting to {out_dir!r} failed: {error}")
    logger.info("wrote %s (%s, %d shard(s))", out_dir, architecture, len(shards))
    return out_dir


def _prepare_shard(keys, shapes, plan, mine, dtype, rank) -> list:
    """Everything of one shard that needs memory, before any block moves: this rank's own blocks
    cast to ``dtype`` on the compute device and, on rank 0, the full CPU tensors and a receive
    buffer per block of another rank. Returns [(key, full or None, [(owner, slices, block)])].
    No communication (NCCL needs CUDA tensors; gloo on CPU uses the CPU)."""
    from megatron_eaopd.parallel.init import compute_device

    device = compute_device()
    out = []
    for key in keys:
        full = torch.empty(shapes[key], dtype=dtype) if rank == 0 else None
        blocks = []
        for owner, index in plan[key]:
            slices = tuple(slice(a, b) for a, b in index)
            if owner == rank:
                blocks.append((owner, slices, mine[(key, index)].to(device=device, dtype=dtype)
                               .contiguous()))  # fmt: skip
            elif rank == 0:
                shape = tuple(b - a for a, b in index)
                blocks.append((owner, slices, torch.empty(shape, dtype=dtype, device=device)))
        out.append((key, full, blocks))
    return out


def _transfer_shard(prepared: list, rank: int, bar) -> dict:
    """Rank 0: {key: full CPU tensor} of one prepared shard; other ranks send their blocks and
    get {}. Collectives: 1 send/recv per block held by a rank other than 0."""
    tensors = {}
    for key, full, blocks in prepared:
        for owner, slices, block in blocks:
            if owner == rank and rank != 0:
                dist.send(block, dst=0)
                continue
            if owner != rank:
                dist.recv(block, src=owner)
            full[slices].copy_(block)
        if rank == 0:
            tensors[key] = full
            if bar is not None:
                bar.update(1)
    return tensors


def _attempt(fn, *args):
    """(fn(*args), None), or (None, the error it raised as text) to report to every rank. With
    one process the error is raised as it is."""
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - every rank raises it after ``_together``
        if _world() == 1:
            raise
        logger.debug("export step failed", exc_info=True)
        return None, f"{type(exc).__name__}: {exc}"


def _together(fn, *args):
    """``_attempt`` on every rank, then the first failing rank's error (None when every rank
    succeeded) on every rank: (result, error). Collectives (WORLD): 1 all_gather_object of a
    short string (none with one process)."""
    result, error = _attempt(fn, *args)
    if _world() == 1:
        return result, error
    errors: list = [None] * _world()
    dist.all_gather_object(errors, error)
    return result, next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def _write_safetensors(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def generation_config_with_stops(tokenizer_dir: str, stops: list[int]) -> dict | None:
    """``tokenizer_dir``'s generation_config.json with ``eos_token_id`` extended by the ``stops``
    it lacks (the run's stop ids: a chat template's end of turn that a base model's folder does
    not list), so that generate on the export stops where the run's rollouts did; None when it
    lists them all (the file is copied as it is)."""
    path = os.path.join(tokenizer_dir, "generation_config.json")
    gen = _token_ids_from(tokenizer_dir)  # without the file: the ids config.json gives
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    listed = gen.get("eos_token_id")
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    missing = [i for i in stops if i not in listed]
    if not missing:
        return None
    return {**gen, "eos_token_id": listed + missing}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_folder(tmp, config, weight_map, total_bytes, num_shards, tokenizer_dir, ids, gen,
                  marker):  # fmt: skip
    _write_json(os.path.join(tmp, "config.json"), config)
    _write_json(os.path.join(tmp, EXPORT_MARKER), marker)
    if num_shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
    copied_gen = False
    if tokenizer_dir:
        for name in _tokenizer_files(tokenizer_dir):
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        src = os.path.join(tokenizer_dir, "generation_config.json")
        if gen is None and os.path.isfile(src):
            shutil.copy2(src, os.path.join(tmp, "generation_config.json"))
            copied_gen = True
    if not copied_gen:
        gen = dict(gen) if gen is not None else {k: v for k, v in ids.items() if v is not None}
        _write_json(os.path.join(tmp, "generation_config.json"), gen)


def _tokenizer_files(tokenizer_dir: str) -> list[str]:
    """The tokenizer files present in `tokenizer_dir`; FileNotFoundError naming the fix when it
    is not a folder holding any (a sentencepiece .model is not a Hugging Face tokenizer)."""
    hint = ("pass a Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json, as "
            "save_pretrained writes it); a sentencepiece .model file or the task tokenizer's "
            "cache is not one")  # fmt: skip
    if os.path.isfile(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer {tokenizer_dir!r} is a file, not a folder: {hint}")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir!r} does not exist")
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if not names:
        raise FileNotFoundError(
            f"tokenizer folder {tokenizer_dir!r} holds none of {list(TOKENIZER_FILES)}: {hint}"
        )
    return names


def _commit(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Rename tmp to out_dir; an existing out_dir (overwrite) is removed only afterwards."""
    old = None
    if os.path.exists(out_dir):
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        elif overwrite and is_project_export(out_dir):
            old = f"{out_dir.rstrip(os.sep)}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        else:
            raise FileExistsError(
                f"output folder {out_dir!r} appeared during the export (or changed into another "
                f"model's folder): it is left as it is"
            )
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:  # put the earlier export back
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
