"""The task-trained sentencepiece tokenizer: round trip, special ids, caching, determinism."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from megatron_eaopd.config import TokenizerConfig
from megatron_eaopd.data import SyntheticArithmeticTask, Tokenizer, build_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def task():
    return SyntheticArithmeticTask(seed=1, num_train=300, num_distill=100, num_eval=50)


@pytest.fixture(scope="module")
def tok(task, tmp_path_factory):
    cfg = TokenizerConfig(
        kind="task", vocab_size=320, cache_dir=str(tmp_path_factory.mktemp("tok"))
    )
    return build_tokenizer(cfg, task)


def test_round_trip_on_all_task_text(task, tok):
    texts = list(task.corpus())
    assert len(texts) > 500
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("Compute 7+5 step by step:", add_bos=True, add_eos=True)) == (
        "Compute 7+5 step by step:"
    )


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 50 < tok.vocab_size <= 320
    ids = tok.encode("1+2", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    # decoding stops at EOS and drops padding
    assert tok.decode([tok.bos_id, *tok.encode("1+2"), tok.eos_id, *tok.encode("9")]) == "1+2"
    assert tok.decode([*tok.encode("1+2"), tok.pad_id, tok.pad_id]) == "1+2"


def test_operators_and_connectives_are_single_pieces(task, tok):
    sol = task.train_problems()[0].solutions[0]
    pieces = [tok.id_to_piece(i) for i in tok.encode(sol)]
    for sym in ("+", "*", "=", ">", ";", "\\boxed{", "}"):
        assert sym in pieces
    # every step starts with a connective word, then the first operand: a number piece
    starts = [pieces[0]] + [b for a, b in zip(pieces, pieces[1:]) if a == ";"]
    assert starts[-1] == "\\boxed{"
    for a, b in zip(pieces, pieces[1:]):
        if a in task.connectives:
            assert b.isdigit()
    assert all(w in task.connectives for w in starts[:-1])


def test_cached_and_deterministic(task, tok, tmp_path, monkeypatch):
    # the same corpus and settings in a fresh cache dir give byte-identical models
    other = train_tokenizer(task.corpus(), tmp_path / "a", 320, task.tokenizer_symbols)
    assert other.path.read_bytes() == tok.path.read_bytes()
    assert other.fingerprint == tok.fingerprint

    # the second call loads the cached file without training
    def boom(*args, **kwargs):
        raise AssertionError("retrained instead of using the cache")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", boom)
    again = train_tokenizer(task.corpus(), tmp_path / "a", 320, task.tokenizer_symbols)
    assert again.path == other.path and again.fingerprint == other.fingerprint
    assert len(list((tmp_path / "a").glob("*.model"))) == 1


def test_fingerprint_tracks_the_vocabulary(task, tok, tmp_path):
    smaller = train_tokenizer(task.corpus(), tmp_path, 120, task.tokenizer_symbols)
    assert smaller.vocab_size < tok.vocab_size
    assert smaller.fingerprint != tok.fingerprint
    other_task = SyntheticArithmeticTask(
        seed=2, num_train=300, num_distill=100, num_eval=50, max_operand=20
    )
    assert train_tokenizer(other_task.corpus(), tmp_path, 320).fingerprint != tok.fingerprint
    # loading the file directly gives the same vocabulary
    assert Tokenizer(tok.path).fingerprint == tok.fingerprint


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="needs the task"):
        build_tokenizer(TokenizerConfig(kind="task"))
    # a cache folder that cannot be written: named before training (it was a bare OSError)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"tokenizer.cache_dir=.*file/tok cannot be written"):
        train_tokenizer(["a b c"], tmp_path / "file" / "tok")
