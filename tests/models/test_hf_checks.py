"""eaopd-convert's checks before any process group, and what an export records.

Each test calls a pre-check (or `convert.main`, which returns 2 before starting anything) on
tiny folders made here: a checkpoint with no recorded config keeps its stored dtype under
--hf-config, a tokenizer with more ids than the model is refused, the --tokenizer folder's
generation config and ids win over the ones recorded at import, import-hf refuses a tied folder
with a different stored head, a layout the model cannot take, a legacy pickle and tensors
config.json does not account for, and an export replaces only an earlier export.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_eaopd import convert
from megatron_eaopd.models.hf import check_hf_folder, model_config_from_hf
from tests.models.test_hf import make_hf_model
from tests.models.test_hf_convert import _edit_config, _fake_checkpoint, _tokenizer


@pytest.fixture(scope="module")
def qwen3_tied(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "qwen3_tied")
    make_hf_model(path, "qwen3_tied")
    return path


def _export_args(*argv):
    return convert._parser().parse_args(["export-hf", *argv])


def _dcp_checkpoint(root: str, dtype: torch.dtype) -> str:
    """A checkpoint root with no recorded model config (saved before configs were recorded)
    whose dist_checkpointing metadata stores the embedding in `dtype`."""
    from torch.distributed.checkpoint import save

    _fake_checkpoint(root, None)
    path = os.path.join(root, "iter_0000000")
    state = {"embedding.word_embeddings.weight": torch.zeros(4, 8, dtype=dtype)}
    save(state, checkpoint_id=path, no_dist=True)
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_config_gives_the_shape_and_the_checkpoint_its_dtype(qwen3_tied, tmp_path, dtype):
    """--hf-config for a checkpoint that records no config: the model used to be built in
    config.json's dtype (bf16 here), rounding an fp32 checkpoint before the export."""
    hf = str(tmp_path / "hf")
    shutil.copytree(qwen3_tied, hf)
    _edit_config(hf, torch_dtype="bfloat16", dtype="bfloat16")
    root = _dcp_checkpoint(str(tmp_path / "ckpt"), dtype)
    args = _export_args("--checkpoint", root, "--out", str(tmp_path / "o"), "--hf-config", hf)
    _, cfg, _ = convert._check_export(args)
    assert cfg.params_dtype == str(dtype).removeprefix("torch.")
    assert cfg.differences(model_config_from_hf(hf)) == []


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(qwen3_tied, tmp_path, capsys):
    cfg = model_config_from_hf(qwen3_tied)  # vocab_size 300
    root = str(tmp_path / "ckpt")
    _fake_checkpoint(root, cfg)
    small, big = str(tmp_path / "t300"), str(tmp_path / "t500")
    _tokenizer(small, 300)
    _tokenizer(big, 500)
    out = str(tmp_path / "o")
    convert._check_export(_export_args("--checkpoint", root, "--out", out, "--tokenizer", small))
    argv = ["export-hf", "--checkpoint", root, "--out", out, "--tokenizer", big]
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert "300 embedding rows" in err and "500 ids" in err and big in err, err
    assert not os.path.exists(out)


def test_the_tokenizer_folders_generation_config_and_ids_win(tmp_path):
    """docs/hf.md §3: the tokenizer folder's generation_config.json, else the one recorded at
    import, else the token ids. The recorded config used to win, and recorded ids of {} (an
    import whose config.json had none) hid the folder's."""
    tok = str(tmp_path / "tok")
    os.makedirs(tok)
    recorded = {"token_ids": {}, "generation_config": {"do_sample": False}}
    ids, gen = convert._export_token_info(tok, recorded)
    assert (ids, gen) == (None, {"do_sample": False})  # the folder has none: the import's
    with open(os.path.join(tok, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 0]}, f)
    ids, gen = convert._export_token_info(tok, recorded)
    assert gen is None  # save_hf_weights copies the folder's file
    assert ids == {"bos_token_id": 1, "eos_token_id": [2, 0]}
    recorded["token_ids"] = {"eos_token_id": 5, "pad_token_id": 0}
    ids, _ = convert._export_token_info(tok, recorded)
    assert ids == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 0}
    assert convert._export_token_info(None, recorded) == (
        {"eos_token_id": 5, "pad_token_id": 0}, {"do_sample": False},
    )  # fmt: skip


def _with_tensors(src: str, dst: str, **tensors) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    save_file({**load_file(path), **tensors}, path, metadata={"format": "pt"})
    return dst


def test_tensors_config_json_does_not_account_for_are_refused(qwen3_tied, tmp_path):
    """A folder whose weights hold a third layer next to a 2-layer config.json loaded the first
    two layers silently. RoPE inv_freq buffers (older checkpoints) and a stored copy of the tied
    head are accepted."""
    norm = torch.ones(64)
    extra = _with_tensors(qwen3_tied, str(tmp_path / "extra"),
                          **{"model.layers.2.input_layernorm.weight": norm})  # fmt: skip
    with pytest.raises(ValueError, match=r"does not account for.*model\.layers\.2\.input_lay"):
        check_hf_folder(extra)
    buffers = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(64)}
    check_hf_folder(_with_tensors(qwen3_tied, str(tmp_path / "inv_freq"), **buffers))


def _legacy_pickle(src: str, dst: str) -> str:
    from safetensors.torch import load_file

    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    path = os.path.join(dst, "pytorch_model.bin")
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return dst


def _different_head(src: str, dst: str) -> str:
    from safetensors.torch import load_file

    embed = load_file(os.path.join(src, "model.safetensors"))["model.embed_tokens.weight"]
    return _with_tensors(src, dst, **{"lm_head.weight": embed + 1.0})


@pytest.mark.parametrize(
    "case, words",
    [
        ("tied_head", "differs from model.embed_tokens.weight"),
        ("tp4", "num_query_groups=2 is not divisible by tp=4"),
        ("legacy_pickle", "legacy (non-zip) pickle format"),
        ("extra_layer", "does not account for"),
        ("tp2_one_process", "--tp 2 x --pp 1 = 2 must divide the number of processes (1)"),
    ],
)
def test_import_refuses_before_any_process_group(
    case, words, qwen3_tied, tmp_path, capsys, monkeypatch
):
    """Each of these used to fail after the process group and the model were built, with a
    traceback (exit status 1): a tied config whose stored head differs from the embedding, a
    TP size the KV heads do not divide, a legacy non-zip pytorch_model.bin (torch cannot
    memory-map it), a layer config.json does not describe."""
    import torch.distributed as dist

    hf, extra = str(tmp_path / "hf"), []
    if case == "tied_head":
        _different_head(qwen3_tied, hf)
    elif case == "tp4":
        shutil.copytree(qwen3_tied, hf)
        extra = ["--tp", "4"]
        monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc-per-node 4 sets it
    elif case == "tp2_one_process":  # a traceback after the group was started (exit 1)
        shutil.copytree(qwen3_tied, hf)
        extra = ["--tp", "2"]
        monkeypatch.setenv("WORLD_SIZE", "1")
    elif case == "legacy_pickle":
        _legacy_pickle(qwen3_tied, hf)
        extra = ["--trust-pickle"]
    else:
        _with_tensors(qwen3_tied, hf, **{"model.layers.2.input_layernorm.weight": torch.ones(64)})
    out = str(tmp_path / "ckpt")
    assert convert.main(["import-hf", "--hf", hf, "--out", out, *extra]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not dist.is_initialized()
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_only_an_earlier_export_is_replaced(qwen3_tied, tmp_path):
    """save_hf_weights(overwrite=True) (the trainer's training.export_hf) replaced any folder:
    a model saved by transformers there was lost. An export is marked (eaopd_export.json);
    exports of earlier versions have no marker but a config.json of exactly our keys."""
    from megatron_eaopd.models.hf import hf_config_dict
    from megatron_eaopd.models.hf.save import EXPORT_MARKER, _prepare_out, is_project_export

    foreign = str(tmp_path / "foreign")
    shutil.copytree(qwen3_tied, foreign)  # a save_pretrained folder
    assert not is_project_export(foreign)
    with pytest.raises(FileExistsError, match="not an export of this project"):
        _prepare_out(foreign, overwrite=True)
    marked = str(tmp_path / "marked")
    os.makedirs(marked)
    with open(os.path.join(marked, EXPORT_MARKER), "w") as f:
        json.dump({"written_by": "megatron-eaopd save_hf_weights"}, f)
    assert is_project_export(marked)
    _prepare_out(marked, overwrite=True)
    earlier = str(tmp_path / "earlier")  # what earlier versions wrote: no marker
    os.makedirs(earlier)
    with open(os.path.join(earlier, "config.json"), "w") as f:
        json.dump(hf_config_dict(model_config_from_hf(qwen3_tied)), f)
    assert is_project_export(earlier)
    with pytest.raises(FileExistsError, match="not empty"):
        _prepare_out(earlier, overwrite=False)


def test_convert_turns_a_failed_save_into_one_line(monkeypatch, capsys, tmp_path):
    """A full disk under --out: each rank printed a 60-line traceback naming training.* keys."""
    from megatron_eaopd.models.save_errors import CheckpointSaveError

    def full(args, *checked):
        raise CheckpointSaveError("cannot save iter_0000000: ... or choose an --out on another "
                                  "disk, then run the command again", everywhere=True)  # fmt: skip

    monkeypatch.setattr(convert, "_check_import", lambda args: ())
    monkeypatch.setattr(convert, "_run_import", full)
    assert convert.main(["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eaopd-convert import-hf: error: cannot save iter_0000000")
    assert "Traceback" not in err
