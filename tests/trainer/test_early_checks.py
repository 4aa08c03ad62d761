"""What the trainer refuses before any compute (``eaopd-train`` exits 2 with the message): model
sources that do not exist, preparations whose batch does not split over their data-parallel
ranks, the exact form with unequal padded vocabularies, out-of-range seeds, missing tokenizer
files. Each of these used to surface only after minutes of teacher preparation or at model
build."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from megatron_eaopd.config import ConfigError, load_config
from megatron_eaopd.trainer.loop import check_data_config, check_trainer_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"


def test_missing_checkpoints_are_refused_with_their_key(tmp_path):
    cfg = load_config(TINY, [f"model.teacher_checkpoint={tmp_path / 'nope'}",
                             f"model.student_checkpoint={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_trainer_config(cfg, 2)
    text = str(err.value)
    assert "model.teacher_checkpoint: no checkpoint directory" in text
    assert "model.student_checkpoint:" in text and "no 'latest' marker" in text
    check_trainer_config(load_config(TINY), 2)  # the preparations instead: fine


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_a_preparation_batch_must_split_over_its_data_parallel_ranks(who):
    cfg = load_config(TINY, [f"{who}_prep.batch_size=15"])
    want = rf"{who}_prep.batch_size=15 must be a multiple of the {who}'s data-parallel size 2 "
    with pytest.raises(ValueError, match=want + r".*batch_size=16"):
        check_trainer_config(cfg, 2)
    check_trainer_config(cfg, 1)  # DP 1: any batch
    # the same batch at world 4 with the model at tp 2: DP 2 again; at tp 4 (DP 1) it is fine
    cfg = load_config(TINY, [f"{who}_prep.batch_size=15", f"parallel.{who}.tp=4",
                             "model.student.heads=4", "model.teacher.heads=4",
                             "model.student.query_groups=4", "model.teacher.query_groups=4",
                             "loss.form=sampled", "loss.objective=eopd"])  # fmt: skip
    check_trainer_config(cfg, 4)
    if who == "student":  # a preparation that does not run is not checked
        check_trainer_config(load_config(TINY, ["student_prep.batch_size=15",
                                                "student_prep.enabled=false"]), 2)  # fmt: skip


def test_exact_form_padded_vocabularies_are_compared_before_any_compute():
    data = types.SimpleNamespace(vocab_size=36)
    check_data_config(load_config(TINY), data)
    cfg = load_config(TINY, ["model.teacher.vocab_size=256"])
    with pytest.raises(ValueError, match=r"padded vocabularies differ \(40 vs 256 rows at tp 1"):
        check_data_config(cfg, data)
    # the sampled form carries top-k ids, not logits shards: unequal sizes are fine there
    check_data_config(load_config(TINY, ["model.teacher.vocab_size=256", "loss.form=sampled",
                                         "loss.objective=eopd"]), data)  # fmt: skip


def test_seeds_and_tokenizer_paths_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"training.seed: out of range.*<= 4294967295"):
        load_config(TINY, ["training.seed=100000000000000"])
    with pytest.raises(ConfigError, match="teacher_prep.seed: out of range"):
        load_config(TINY, ["teacher_prep.seed=-1"])
    with pytest.raises(ConfigError, match="tokenizer.path: no such file"):
        load_config(TINY, ["tokenizer.kind=sentencepiece", f"tokenizer.path={tmp_path}/x.model"])
    with pytest.raises(ConfigError, match="tokenizer.path: no such folder"):
        load_config(TINY, ["tokenizer.kind=huggingface", f"tokenizer.path={tmp_path}/hf"])
    # a hub id (org/name) may resolve from the local hub cache: left to the tokenizer loader
    assert (
        load_config(
            TINY, ["tokenizer.kind=huggingface", "tokenizer.path=Qwen/Qwen3-8B"]
        ).tokenizer.path
        == "Qwen/Qwen3-8B"
    )
