"""eaopd-convert: Hugging Face folders to project checkpoints and back.

    eaopd-convert import-hf --hf DIR --out CKPT_ROOT [--dtype auto|bf16|fp32] [--trust-pickle]
    eaopd-convert export-hf --checkpoint CKPT_ROOT --out DIR [--dtype bf16|fp32]
                            [--tokenizer DIR] [--iteration N] [--hf-config DIR]

import-hf writes a model-only checkpoint (models.checkpoint.save_checkpoint, iteration 0) that
records the model config and its source and loads at any TP x PP layout. export-hf reads the
config recorded in the checkpoint and writes an HF folder (config.json, safetensors, generation
config, tokenizer files with --tokenizer). One process (TP 1, PP 1) is enough; under torchrun
--tp/--pp split the work (each rank reads or writes only its own part).

Bad input (unsupported architecture or RoPE type, missing or truncated shard, no config.json,
weights config.json does not describe, a layout the model cannot be split at, a checkpoint of
another shape, a tokenizer with more ids than the model, an existing output) exits with status 2
and a named error before any process group starts; outputs are written to a temporary folder of a
unique name and renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import uuid

logger = logging.getLogger("eaopd-convert")

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """An input problem found before any work starts (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaopd-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF folder -> project checkpoint (model only)")
    imp.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint root to create (must not exist)")
    imp.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32", "fp16"],
        help="dtype of the stored weights; auto: config.json's torch_dtype",
    )
    imp.add_argument("--trust-pickle", action="store_true", help="allow pytorch_model.bin")
    exp = sub.add_parser("export-hf", help="project checkpoint -> HF folder")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root (or iter_* folder)")
    exp.add_argument("--out", required=True, help="HF folder to create (must not exist)")
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    exp.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied")
    exp.add_argument("--iteration", type=int, default=None, help="default: the latest")
    exp.add_argument(
        "--hf-config",
        default=None,
        help="HF folder whose config.json describes the model: needed for checkpoints that "
        "record no config; must agree with a recorded one",
    )
    exp.add_argument("--architecture", default=None, help="default: the recorded one")
    exp.add_argument("--max-shard-gb", type=float, default=2.0)
    for sp in (imp, exp):
        sp.add_argument("--tp", type=int, default=1, help="tensor parallel size (torchrun)")
        sp.add_argument("--pp", type=int, default=1, help="pipeline parallel size (torchrun)")
    return p


_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _check_out(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise BadInput(f"output {path!r} exists and is not empty: choose a new folder")


def _check_import(args):
    """(ModelConfig, token/generation info) of --hf; raises BadInput before anything starts."""
    import json

    from megatron_eaopd.models.hf import check_hf_folder, model_config_from_hf

    _check_out(args.out)
    try:
        dtype = None if args.dtype == "auto" else _DTYPES[args.dtype]
        cfg = model_config_from_hf(args.hf, params_dtype=dtype)
        cfg.check_layout(args.tp, args.pp)
        # what every load checks (tensors, shapes, a tied head equal to the embedding, no extra
        # tensors), here before any process group
        check_hf_folder(args.hf, trust_pickle=args.trust_pickle, model_config=cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(str(exc)) from None
    from megatron_eaopd.config.hf_models import tokenizer_fingerprint

    hf_info: dict = {}
    tokens = tokenizer_fingerprint(args.hf)  # the trainer checks it when the folder is gone
    if tokens is not None:
        hf_info["tokenizer_fingerprint"] = tokens
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(args.hf, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if name == "generation_config.json":
                hf_info["generation_config"] = data
            ids = ("bos_token_id", "eos_token_id", "pad_token_id")
            hf_info.setdefault("token_ids", {}).update(
                {k: data[k] for k in ids if data.get(k) is not None}
            )
    return cfg, hf_info


def _check_export(args):
    """(ModelConfig, hf info) for export-hf; raises BadInput before anything starts."""
    from megatron_eaopd.models.checkpoint import read_meta, resolve_checkpoint
    from megatron_eaopd.models.config import ModelConfig
    from megatron_eaopd.models.hf import hf_config_dict, model_config_from_hf

    _check_out(args.out)
    try:
        if not os.path.isdir(args.checkpoint):
            raise ValueError(
                f"--checkpoint {args.checkpoint!r}: no such folder; give a checkpoint root (a "
                "run's checkpoints/ folder or an import-hf output) or one iter_* folder"
            )
        if os.path.isfile(os.path.join(args.checkpoint, "eaopd_meta.json")):
            if args.iteration is not None:
                raise ValueError(
                    f"--iteration picks a checkpoint of a root; {args.checkpoint!r} is one "
                    f"checkpoint folder: pass its root with --iteration, or the folder alone"
                )
            path = args.checkpoint
        else:
            path = resolve_checkpoint(args.checkpoint, args.iteration)
        meta = read_meta(path)
        recorded = meta.get("model_config")
        cfg = ModelConfig.from_dict(recorded) if recorded else None
        if args.hf_config:
            given = model_config_from_hf(args.hf_config)
            if cfg is None:  # built in the dtype the weights were saved in, not config.json's
                cfg = given.with_changes(params_dtype=_stored_dtype(path))
            else:
                diffs = cfg.differences(given, args.tp)
                if diffs:
                    raise ValueError(
                        f"checkpoint {path!r} holds another model than {args.hf_config!r} "
                        f"describes (checkpoint != config.json): {'; '.join(diffs)}"
                    )
        if cfg is None:
            raise ValueError(
                f"checkpoint {path!r} records no model config (saved before configs were "
                f"recorded): pass --hf-config with an HF folder describing the model"
            )
        if not args.tokenizer:
            args.tokenizer = _source_tokenizer(meta, path)
        if args.tokenizer:  # exit 2 before any process group, with what to pass instead
            from megatron_eaopd.models.hf.save import _tokenizer_files

            _tokenizer_files(args.tokenizer)
            _check_tokenizer_fits(args.tokenizer, cfg.vocab_size)
        hf_config_dict(cfg, architecture=args.architecture, dtype=_DTYPES[args.dtype])
        cfg.check_layout(args.tp, args.pp)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise BadInput(str(exc)) from None
    # the weights stay in the dtype they were saved in; the export casts
    return path, cfg, dict(meta.get("extra", {}).get("hf", {}))


def _source_tokenizer(meta: dict, path: str) -> str | None:
    """Without ``--tokenizer``, the tokenizer folder the checkpoint folder ``path`` was made
    with, while it holds tokenizer files, so the export has it and its BOS / EOS ids: an
    import's source folder (recorded as ``hf:<absolute folder>``); a trainer save's
    ``tokenizer.path`` as the save records it (its config and absolute output_dir, which
    give the training's working folder for a relative path; saves of earlier versions: the
    ``config.yaml`` beside the checkpoint root, a relative path tried from the run folder's
    ancestors). Else None with a warning: an export without a tokenizer has no EOS id
    (``generate`` does not stop) unless the import recorded one."""
    from megatron_eaopd.config.hf_models import has_tokenizer_files

    log = logging.getLogger("eaopd-convert")
    extra = meta.get("extra") or {}
    imported = bool(extra.get("hf"))
    if imported:
        source = meta.get("source")
        wanted = source[3:] if isinstance(source, str) and source.startswith("hf:") else None
        where, tries = "the folder it was imported from", [wanted]
    else:
        conf, run = extra.get("config"), extra.get("output_dir")
        where = "the tokenizer.path the checkpoint records"
        if not isinstance(conf, dict) or not isinstance(run, str):  # a save recording neither
            run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            conf = _read_yaml(os.path.join(run, "config.yaml"))
            where = f"the run's tokenizer.path ({run}/config.yaml)"
        tok = conf.get("tokenizer") if isinstance(conf, dict) else None
        wanted = (
            tok.get("path") if isinstance(tok, dict) and tok.get("kind") == "huggingface" else None
        )
        tries = [wanted] if not wanted or os.path.isabs(wanted) else [
            os.path.join(base, wanted) for base in _training_folders(conf, run)]  # fmt: skip
    for folder in [os.path.abspath(t) for t in tries if t]:
        if os.path.isdir(folder) and has_tokenizer_files(folder):
            log.info("tokenizer: %s, %s (--tokenizer picks another)", folder, where)
            return folder
    log.warning(
        "no --tokenizer%s: the export holds no tokenizer files%s; pass --tokenizer with the "
        "model's Hugging Face tokenizer folder",
        f", and {where}, {wanted}, holds none" if wanted else "",
        "" if imported else " and config.json no BOS / EOS ids (generate() will not stop)",
    )
    return None


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _training_folders(conf: dict, run: str) -> list[str]:
    """Where a relative path of a run's config was taken from: the working folder of the
    training (the absolute output folder ``run`` less the config's relative
    ``training.output_dir``) when it shows, else the run folder and its ancestors."""
    given = str(((conf.get("training") or {}).get("output_dir")) or "").rstrip(os.sep)
    run = os.path.abspath(run).rstrip(os.sep)
    if given and not os.path.isabs(given) and run.endswith(os.sep + os.path.normpath(given)):
        return [run[: -len(os.path.normpath(given)) - 1] or os.sep]
    folders = [run]
    while folders[-1] != os.path.dirname(folders[-1]):
        folders.append(os.path.dirname(folders[-1]))
    return folders


def _stored_dtype(path: str) -> str:
    """The dtype of the word embedding stored in the checkpoint folder ``path`` (its
    dist_checkpointing metadata; no tensor is read), e.g. 'float32'; 'float32' (lossless for
    bf16 / fp16 / fp32 weights) when the metadata does not say."""
    import torch

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
             torch.float64: "float64"}  # fmt: skip
    try:
        from torch.distributed.checkpoint import FileSystemReader

        entries = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - another format: keep every value exactly
        return "float32"
    dtypes = [getattr(getattr(v, "properties", None), "dtype", None) for k, v in
              sorted(entries.items(), key=lambda kv: "word_embeddings" not in kv[0])]  # fmt: skip
    return next((names[d] for d in dtypes if d in names), "float32")


def _check_tokenizer_fits(tokenizer_dir: str, vocab_size: int) -> None:
    """ValueError naming both sizes when the tokenizer of ``tokenizer_dir`` has more ids than the
    model has embedding rows (the trainer's check, ``vocab_check.check_tokenizer_fits``). Its
    ids come from tokenizer.json, else from transformers' tokenizer when installed."""
    from megatron_eaopd.config.hf_models import _token_table
    from megatron_eaopd.models.vocab_check import check_tokenizer_fits

    table = _token_table(tokenizer_dir)
    if not table:
        try:
            import transformers
        except ImportError:
            logger.warning("%s has no tokenizer.json: its size is not checked", tokenizer_dir)
            return
        table = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    fix = (f"{tokenizer_dir!r} is not the tokenizer of this model (vocab_size {vocab_size}): "
           f"pass the tokenizer it was trained with")  # fmt: skip
    check_tokenizer_fits(table, vocab_size, role="model", fix=fix)


def _run_import(args, cfg, hf_info) -> None:
    import torch.distributed as dist

    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.checkpoint import save_checkpoint
    from megatron_eaopd.models.hf import load_hf_weights
    from megatron_eaopd.parallel.init import initialize_parallel, rank0_object

    initialize_parallel(args.tp, args.pp, models={"model": cfg})
    rank = dist.get_rank()
    # never a user's folder; rank 0's name on every rank
    tmp = rank0_object(f"{args.out.rstrip(os.sep)}.tmp-import-{uuid.uuid4().hex[:8]}")
    ok = False
    try:
        chunks = build_model(cfg, perform_initialization=False)
        load_hf_weights(chunks, args.hf, trust_pickle=args.trust_pickle, progress=True)
        source = f"hf:{os.path.abspath(args.hf)}"
        save_checkpoint(
            tmp,
            0,
            chunks,
            save_rng=False,
            extra={"hf": hf_info},
            source=source,
            fix="choose an --out on another disk, then run the command again",
        )
        ok = True
    finally:
        dist.barrier()
        if rank == 0:
            if ok:
                if os.path.isdir(args.out):  # an empty folder given as the output
                    os.rmdir(args.out)
                os.rename(tmp, args.out)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()


def _run_export(args, path, cfg, hf_info) -> None:
    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.checkpoint import load_checkpoint
    from megatron_eaopd.models.hf import save_hf_weights
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(args.tp, args.pp, models={"model": cfg})
    chunks = build_model(cfg, perform_initialization=False)
    load_checkpoint(path, chunks, load_rng=False)  # the folder _check_export resolved
    ids, gen = _export_token_info(args.tokenizer, hf_info)
    save_hf_weights(
        chunks,
        args.out,
        model_config=cfg,
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer,
        architecture=args.architecture,
        token_ids=ids,
        generation_config=gen,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        progress=True,
        export_info={"checkpoint": os.path.abspath(path)},
    )


def _export_token_info(tokenizer_dir: str | None, hf_info: dict) -> tuple[dict | None, dict | None]:
    """(token ids, generation config) for ``save_hf_weights``, as docs/hf.md §3 says: the
    ``--tokenizer`` folder's generation_config.json (None here: save_hf_weights copies it), else
    the one recorded at import, else the token ids; the ids are the tokenizer folder's
    (generation_config.json, config.json) over those recorded at import."""
    from megatron_eaopd.models.hf.save import _token_ids_from

    ids = dict(hf_info.get("token_ids") or {})
    gen = hf_info.get("generation_config")
    if tokenizer_dir:
        ids.update(_token_ids_from(tokenizer_dir))
        if os.path.isfile(os.path.join(tokenizer_dir, "generation_config.json")):
            gen = None
    return (ids or None), gen


def _check_layout(args) -> None:
    """--tp x --pp must divide the number of processes (WORLD_SIZE; the running job's when called
    inside one), as megatron's groups need; refused here, before any process group."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    size = args.tp * args.pp
    if args.tp < 1 or args.pp < 1:
        raise BadInput(f"--tp {args.tp} and --pp {args.pp} must both be >= 1")
    if world % size:
        raise BadInput(
            f"--tp {args.tp} x --pp {args.pp} = {size} must divide the number of processes "
            f"({world}): start it with `torchrun --nproc-per-node {size}` (or a multiple), or "
            f"pass a --tp and --pp whose product divides {world}"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse, check the inputs (exit 2 on bad input), start the layout, convert, tear down."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        _check_layout(args)
        if args.command == "import-hf":
            checked = _check_import(args)
        else:
            checked = _check_export(args)
    except BadInput as exc:
        print(f"eaopd-convert {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch.distributed as dist

    from megatron_eaopd.models.save_errors import CheckpointSaveError
    from megatron_eaopd.parallel.init import destroy_parallel

    owns_process_group = not dist.is_initialized()  # else: called inside a running job
    try:
        if args.command == "import-hf":
            _run_import(args, *checked)
            print(f"wrote checkpoint {args.out}")
        else:
            _run_export(args, *checked)
            print(f"wrote Hugging Face folder {args.out}")
    except CheckpointSaveError as exc:  # a full disk: one line (per rank it failed on)
        if not exc.everywhere or int(os.environ.get("RANK", "0")) == 0:
            print(f"eaopd-convert {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_parallel(destroy_process_group=owns_process_group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
