"""Teacher/student vocabulary compatibility.

On-policy distillation compares the two models' distributions over the same token ids, so the
tokenizers must be identical (same pieces at the same ids), not merely the same size. The models'
embedding sizes may still differ: checkpoints pad the vocabulary differently (Qwen2.5: 152,064 vs
151,936 rows for one tokenizer), and megatron pads again for TP. Then the distillation runs over
the shared real vocabulary (the tokenizer's size) and every column past it is masked.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerFingerprint:
    """What identifies a tokenizer for distillation.

    Attributes:
        digest: hash of the id -> piece table (and special ids when known).
        vocab_size: the real vocabulary size: number of ids the tokenizer can produce.
        name: a label for messages (path or model name).
    """

    digest: str
    vocab_size: int
    name: str = ""


def tokenizer_fingerprint(tokenizer, name: str = "") -> TokenizerFingerprint:
    """Fingerprint a tokenizer.

    Accepts, in order: an object with a string `fingerprint` and an int `vocab_size` (the
    project's sentencepiece Tokenizer); a Hugging Face tokenizer (`get_vocab()`); a sentencepiece
    processor (`get_piece_size()`, `id_to_piece()`); a mapping piece -> id; a sequence of pieces
    indexed by id; an existing TokenizerFingerprint.
    """
    if isinstance(tokenizer, TokenizerFingerprint):
        return tokenizer
    label = name or str(getattr(tokenizer, "name_or_path", "") or getattr(tokenizer, "path", ""))
    own = getattr(tokenizer, "fingerprint", None)
    if isinstance(own, str) and isinstance(getattr(tokenizer, "vocab_size", None), int):
        return TokenizerFingerprint(own, tokenizer.vocab_size, label)
    if hasattr(tokenizer, "get_vocab"):
        table = {int(i): str(piece) for piece, i in tokenizer.get_vocab().items()}
    elif hasattr(tokenizer, "get_piece_size") and hasattr(tokenizer, "id_to_piece"):
        table = {i: tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())}
    elif isinstance(tokenizer, Mapping):
        table = {int(i): str(piece) for piece, i in tokenizer.items()}
    elif isinstance(tokenizer, Sequence) and not isinstance(tokenizer, (str, bytes)):
        table = dict(enumerate(str(piece) for piece in tokenizer))
    else:
        raise TypeError(
            f"cannot fingerprint a {type(tokenizer).__name__}: pass a tokenizer with get_vocab(), "
            f"a sentencepiece processor, a piece -> id mapping or a list of pieces"
        )
    if not table:
        raise ValueError("the tokenizer has an empty vocabulary")
    digest = hashlib.sha256()
    for i in sorted(table):
        digest.update(f"{i}\t{table[i]}\n".encode("utf-8", "surrogatepass"))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            digest.update(f"{attr}={value}\n".encode())
    return TokenizerFingerprint(digest.hexdigest()[:16], max(table) + 1, label)


def check_vocab_compatibility(
    teacher_tokenizer,
    student_tokenizer,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> int:
    """Check a teacher/student pair; return the shared real vocabulary size.

    `*_tokenizer` are tokenizers or TokenizerFingerprints; `*_vocab_size` are the models' embedding
    sizes (ModelConfig.vocab_size, or padded sizes). Raises ValueError, naming the fix, when the
    tokenizers differ or a model has fewer embedding rows than the tokenizer has ids. Logs (INFO)
    when only the embedding sizes differ. No communication.
    """
    teacher = tokenizer_fingerprint(teacher_tokenizer, "teacher")
    student = tokenizer_fingerprint(student_tokenizer, "student")
    if teacher.digest != student.digest or teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"teacher and student tokenizers differ (teacher {teacher.name or '?'}: "
            f"{teacher.vocab_size} ids, fingerprint {teacher.digest}; student "
            f"{student.name or '?'}: {student.vocab_size} ids, fingerprint {student.digest}). "
            f"Distillation compares distributions over the same token ids: give both models the "
            f"same tokenizer (a teacher and student from the same model family)."
        )
    real = teacher.vocab_size
    for role, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        check_tokenizer_fits(teacher, size, role=f"{role} model")
    if teacher_vocab_size != student_vocab_size:
        logger.info(
            "teacher and student vocabulary sizes differ only by padding (teacher %d, student %d): "
            "distilling over the shared real vocabulary of %d tokens; columns past it are masked",
            teacher_vocab_size,
            student_vocab_size,
            real,
        )
    return real


def check_tokenizer_fits(tokenizer, vocab_size: int, *, role: str = "model", fix: str = "") -> int:
    """The tokenizer's real vocabulary size; ValueError naming both sizes when a model of
    ``vocab_size`` embedding rows is smaller (an id past the rows would index out of range).

    `tokenizer`: anything ``tokenizer_fingerprint`` accepts; `role`: the model in the message;
    `fix`: what to do (default: give the model at least that many rows). No communication.
    """
    real = tokenizer_fingerprint(tokenizer).vocab_size
    if vocab_size < real:
        name = role.removesuffix(" model")
        fix = fix or (f"set the {name}'s vocab_size to at least {real} (the checkpoint's "
                      f"embedding size).")  # fmt: skip
        raise ValueError(
            f"the {role} has {vocab_size} embedding rows but the tokenizer has {real} ids: {fix}"
        )
    return real
