"""Trainer.export_hf without a tokenizer folder to copy writes the run's special ids into the
exported configs (transformers' generate stops at EOS): a task / sentencepiece tokenizer, and a
Hugging Face tokenizer named by a hub id (it crashed on the sentencepiece attributes); ids the
tokenizer lacks (sentencepiece's -1) are left out, pad falls back to EOS as in the run."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize(
    "kind, tokenizer, want",
    [
        ("task", SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, path="/c/spm-1.model"), (1, 2, 0)),
        ("sentencepiece", SimpleNamespace(bos_id=-1, eos_id=3, pad_id=-1, path="/m/t.model"),
         (None, 3, 3)),
        ("huggingface", SimpleNamespace(bos_token_id=None, eos_token_id=7, pad_token_id=None),
         (None, 7, 7)),
    ],
)  # fmt: skip
def test_export_writes_the_runs_special_ids(monkeypatch, kind, tokenizer, want):
    import megatron_eaopd.models.hf as hf
    import megatron_eaopd.parallel.init as init
    from megatron_eaopd.trainer.loop import Trainer

    seen = {}
    monkeypatch.setattr(hf, "save_hf_weights", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(init, "use_layout", lambda name: contextlib.nullcontext())
    path = "acme/tok" if kind == "huggingface" else "/m/t.model"  # a hub id: not a folder
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(tokenizer=SimpleNamespace(kind=kind, path=path), name="run",
                            training=SimpleNamespace(export_dtype="bf16", output_dir="/o")),
        data=SimpleNamespace(tokenizer=tokenizer), student=SimpleNamespace(chunks=[]),
        rank0=False, _bars_on=lambda: False,
    )  # fmt: skip
    Trainer.export_hf(trainer, "/tmp/unused")
    ids = seen["token_ids"]
    assert seen["tokenizer_dir"] is None
    assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == want
