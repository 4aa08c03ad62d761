"""A small sentencepiece tokenizer trained by the project on a task's text, cached on disk.

The trained model is cached under ``cache_dir`` by a key over the corpus and the training settings,
so every run (and every rank) on the same task gets the identical file without retraining. Training
is deterministic (one thread, no sampling, no shuffling). Special ids: PAD 0, UNK 1, BOS 2, EOS 3.
:attr:`Tokenizer.fingerprint` hashes the vocabulary (pieces, scores, types) so a student and a
teacher can be checked for tokenizer compatibility.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

__all__ = ["Tokenizer", "build_tokenizer", "train_tokenizer"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_TRAIN_ARGS = dict(
    model_type="bpe",
    character_coverage=1.0,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_by_number=True,
    split_digits=False,
    hard_vocab_limit=False,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    max_sentence_length=16384,
    minloglevel=2,
)


class Tokenizer:
    """A loaded sentencepiece model with the project's conventions.

    Args:
        model_path: a sentencepiece ``.model`` file.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special tokens included."""
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id."""
        return self.sp.unk_id()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with BOS first and EOS last."""
        ids = self.sp.encode(text, out_type=int)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; PAD/BOS/EOS are dropped, the text stops at the first EOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self.sp.decode(out)

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i``."""
        return self.sp.id_to_piece(int(i))

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the vocabulary: pieces, scores and types, in id order."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            kind = "c" if self.sp.is_control(i) else "u" if self.sp.is_unknown(i) else "n"
            h.update(f"{i}\t{self.sp.id_to_piece(i)}\t{self.sp.get_score(i)!r}\t{kind}\n".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, fp={self.fingerprint})"


def train_tokenizer(
    texts: Iterable[str],
    cache_dir: str | os.PathLike,
    vocab_size: int = 320,
    extra_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Train (or load from the cache) a BPE sentencepiece tokenizer on ``texts``.

    Args:
        texts: the corpus (one sentence per item; newlines inside an item are kept as characters).
        cache_dir: folder for cached models; the file name carries a key over corpus and settings.
        vocab_size: the most pieces (fewer when the corpus cannot fill them).
        extra_symbols: pieces to keep whole (user-defined symbols).

    Returns:
        The loaded :class:`Tokenizer`. A second call with the same arguments loads the cached file.
    """
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    settings: dict[str, Any] = dict(
        _TRAIN_ARGS, vocab_size=int(vocab_size), user_defined_symbols=list(extra_symbols)
    )
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(spm.__version__.encode())
    for t in corpus:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    key = h.hexdigest()[:16]
    cache = Path(cache_dir)
    path = cache / f"spm-{key}.model"
    if path.is_file():
        return Tokenizer(path)
    try:  # before training: a folder that cannot be written fails here, naming the key
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".spm-", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise ValueError(
            f"tokenizer.cache_dir={cache_dir} cannot be written ({type(err).__name__}: "
            f"{err.strerror or err}): point it at a writable folder (a read-only one serves "
            "the tokenizers it already holds)"
        ) from err
    try:
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf,
                                       **settings)  # fmt: skip
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)  # atomic: concurrent trainers write identical bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return Tokenizer(path)


def generation_eos_ids(folder: str | os.PathLike) -> list[int]:
    """``eos_token_id`` of ``folder/generation_config.json`` as a list ([] without the file or
    the key). ValueError naming the file for a value that is not an id or a list of ids."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable JSON object ({err})") from err
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids
    ):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return ids


def build_tokenizer(tok_cfg: Any, task: Any | None = None) -> Any:
    """The tokenizer a :class:`~megatron_eaopd.config.TokenizerConfig` asks for.

    ``kind: task`` trains/loads a sentencepiece model on ``task.corpus()``; ``sentencepiece``
    loads ``path``; ``huggingface`` loads ``path`` with ``transformers.AutoTokenizer`` (an optional
    dependency) and returns that object, with the stop ids of ``path``'s generation_config.json
    recorded for ``data.sequences.stop_token_ids``.
    """
    if tok_cfg.kind == "task":
        if task is None:
            raise ValueError("tokenizer.kind=task needs the task to train on")
        symbols = getattr(task, "tokenizer_symbols", ())
        return train_tokenizer(task.corpus(), tok_cfg.cache_dir, tok_cfg.vocab_size, symbols)
    if tok_cfg.kind == "sentencepiece":
        return Tokenizer(tok_cfg.path)
    if tok_cfg.kind == "huggingface":
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(
                "tokenizer.kind=huggingface needs `pip install transformers`"
            ) from err
        tokenizer = AutoTokenizer.from_pretrained(tok_cfg.path)
        from megatron_eaopd.data.sequences import STOP_ATTR

        setattr(tokenizer, STOP_ATTR, generation_eos_ids(tok_cfg.path))
        return tokenizer
    raise ValueError(f"tokenizer.kind: unknown kind {tok_cfg.kind!r}")
