"""Model shapes, layout checks, presets, tokenizer/vocabulary compatibility (single process)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from megatron_eaopd.compat.cpu import is_cpu_compat_enabled
from megatron_eaopd.models import config as mcfg
from megatron_eaopd.models.builder import layer_spec, transformer_config
from megatron_eaopd.models.vocab_check import check_vocab_compatibility, tokenizer_fingerprint
from megatron_eaopd.parallel.init import (
    check_parallel_layout,
    initialize_layouts,
    initialize_parallel,
)
from megatron_eaopd.parallel.vocab import padded_vocab_size


def test_presets_fit_their_intended_layouts():
    for name in ("qwen3-8b", "qwen3-1.7b"):
        cfg = mcfg.get_preset(name)
        cfg.check_layout(tp=2, pp=2)
        cfg.check_layout(tp=8, pp=1)
        assert cfg.kv_channels * cfg.num_attention_heads >= cfg.hidden_size
    mcfg.TINY_TEACHER.check_layout(tp=2, pp=2)
    mcfg.TINY_TEACHER.check_layout(tp=1, pp=2, vpp=2)
    mcfg.TINY_STUDENT.check_layout(tp=2, pp=2)
    assert mcfg.TINY_STUDENT.tied_embeddings and not mcfg.TINY_TEACHER.tied_embeddings
    assert mcfg.TINY_TEACHER.vocab_size == mcfg.TINY_STUDENT.vocab_size
    with pytest.raises(ValueError, match="choose one of"):
        mcfg.get_preset("gpt-5")


@pytest.mark.parametrize(
    "kwargs, tp, pp, vpp, fix",
    [
        ({}, 3, 1, None, "num_attention_heads=4 is not divisible by tp=3: choose tp among"),
        ({"num_query_groups": 1}, 2, 1, None, "num_query_groups=1 is not divisible by tp=2"),
        ({}, 1, 3, None, "num_layers=4 is not divisible by pp=3: choose a pipeline size"),
        ({}, 1, 2, 4, "num_layers=4 is not divisible by pp x vpp = 2 x 4"),
        # only values that satisfy every tp rule: 5 divides 385 but not the 4 heads
        (
            {"ffn_hidden_size": 385},
            2,
            1,
            None,
            "ffn_hidden_size=385 is not divisible by tp=2: choose tp among [1].",
        ),
        (
            {"num_query_groups": 4, "ffn_hidden_size": 96},
            8,
            1,
            None,
            "num_attention_heads=4 is not divisible by tp=8: choose tp among [1, 2, 4];",
        ),
    ],
)
def test_bad_model_layouts_name_the_fix(kwargs, tp, pp, vpp, fix):
    cfg = mcfg.TINY_TEACHER.with_changes(**kwargs)
    with pytest.raises(ValueError, match=re.escape(fix)):
        cfg.check_layout(tp, pp, vpp)
    with pytest.raises(ValueError, match="cannot be split"):
        transformer_config(cfg, tp, pp, vpp)


def test_bad_shapes_rejected_at_construction():
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        mcfg.TINY_TEACHER.with_changes(num_query_groups=3)
    with pytest.raises(ValueError, match="set kv_channels"):
        mcfg.TINY_TEACHER.with_changes(hidden_size=130)
    with pytest.raises(ValueError, match="'RMSNorm' or 'LayerNorm'"):
        mcfg.TINY_TEACHER.with_changes(normalization="rmsnorm")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        mcfg.ModelConfig.from_dict({**mcfg.TINY_TEACHER.to_dict(), "heads": 4})
    assert mcfg.ModelConfig.from_dict(mcfg.QWEN3_8B.to_dict()) == mcfg.QWEN3_8B


def test_world_size_layout_checks():
    assert check_parallel_layout(8, 2, 2) == 2
    assert check_parallel_layout(4, 1, 2, 2) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of tp x pp = 2 x 2"):
        check_parallel_layout(6, 2, 2)
    with pytest.raises(ValueError, match="needs pipeline parallelism"):
        check_parallel_layout(4, 2, 1, 2)
    with pytest.raises(ValueError, match="positive integer"):
        check_parallel_layout(4, 0, 1)


def test_models_checked_before_anything_starts():
    import torch.distributed as dist

    with pytest.raises(ValueError, match="teacher .*num_layers=4 is not divisible by pp=3"):
        initialize_parallel(1, 3, models={"teacher": mcfg.TINY_TEACHER})
    with pytest.raises(ValueError, match="student .*heads=4 is not divisible by tp=8"):
        initialize_layouts(
            {"student": (8, 1, None), "teacher": (2, 2, None)},
            models={"student": mcfg.TINY_STUDENT, "teacher": mcfg.TINY_TEACHER},
        )
    assert not dist.is_initialized()
    assert not is_cpu_compat_enabled()  # nothing was started or patched


def test_transformer_config_matches_model_config():
    cfg = mcfg.QWEN3_1_7B
    tc = transformer_config(cfg, tp=2, pp=2)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads) == (28, 2048, 16)
    assert (tc.num_query_groups, tc.kv_channels, tc.ffn_hidden_size) == (8, 128, 6144)
    assert tc.gated_linear_unit and tc.qk_layernorm and tc.normalization == "RMSNorm"
    assert tc.params_dtype == torch.bfloat16 and tc.bf16
    assert not tc.sequence_parallel and not tc.apply_rope_fusion
    assert cfg.padded_vocab_size(2) == padded_vocab_size(151936, 2, 128) == 152064
    # Without CUDA the local (megatron-core) spec is used.
    spec = layer_spec(cfg)
    assert spec.submodules.self_attention.submodules.linear_qkv.__name__ == "ColumnParallelLinear"


class _HFLike:
    def __init__(self, pieces, eos=None):
        self._vocab = {p: i for i, p in enumerate(pieces)}
        self.eos_token_id = eos

    def get_vocab(self):
        return dict(self._vocab)


def test_tokenizer_fingerprints():
    pieces = [f"tok{i}" for i in range(300)]
    a = tokenizer_fingerprint(_HFLike(pieces, eos=2))
    assert a == tokenizer_fingerprint(_HFLike(list(pieces), eos=2))
    assert a.vocab_size == 300
    assert a.digest != tokenizer_fingerprint(_HFLike(pieces, eos=3)).digest
    swapped = pieces[:]
    swapped[5], swapped[6] = swapped[6], swapped[5]
    assert a.digest != tokenizer_fingerprint(_HFLike(swapped, eos=2)).digest
    # Other accepted forms agree with each other.
    as_list = tokenizer_fingerprint(pieces)
    assert as_list == tokenizer_fingerprint({p: i for i, p in enumerate(pieces)})

    class _SP:
        def get_piece_size(self):
            return len(pieces)

        def id_to_piece(self, i):
            return pieces[i]

    assert tokenizer_fingerprint(_SP()) == as_list

    class _Own:  # the project's Tokenizer exposes its own fingerprint
        fingerprint = "abc123"
        vocab_size = 320

    assert tokenizer_fingerprint(_Own()).digest == "abc123"
    with pytest.raises(TypeError, match="cannot fingerprint"):
        tokenizer_fingerprint(3.0)


def test_vocab_compatibility(caplog):
    pieces = [f"p{i}" for i in range(151669)]
    tok = tokenizer_fingerprint(pieces)
    assert check_vocab_compatibility(tok, pieces, 151936, 151936) == 151669
    with caplog.at_level(logging.INFO, logger="megatron_eaopd.models.vocab_check"):
        assert check_vocab_compatibility(tok, tok, 152064, 151936) == 151669
    assert "differ only by padding (teacher 152064, student 151936)" in caplog.text
    other = pieces[:]
    other[100] = "different"
    with pytest.raises(ValueError, match="tokenizers differ.*same tokenizer"):
        check_vocab_compatibility(tok, other, 151936, 151936)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_vocab_compatibility(tok, pieces[:-1], 151936, 151936)
    with pytest.raises(ValueError, match="student model has 151000 embedding rows.*at least"):
        check_vocab_compatibility(tok, tok, 151936, 151000)
