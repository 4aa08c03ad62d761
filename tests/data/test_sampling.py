"""Resumable prompt order and token-sequence conventions."""

from __future__ import annotations

import pytest

from megatron_eaopd.data import SyntheticArithmeticTask, train_tokenizer
from megatron_eaopd.data.sampling import PromptSampler, total_iterations
from megatron_eaopd.data.sequences import build_sft_example, encode_prompt, pad_sequences


def test_paper_iteration_counts():
    assert total_iterations(7500, 128, 3) == 174  # MATH, 3 epochs (paper)
    assert total_iterations(14116, 128, 2) == 220  # DAPO-Math-14k, 2 epochs (paper)
    assert total_iterations(100, 10, 0.5) == 5
    with pytest.raises(ValueError, match="exceeds"):
        total_iterations(5, 10, 1)


def test_epochs_are_permutations_and_seeded():
    s = PromptSampler(23, 5, seed=1)
    epoch0 = [i for _ in range(4) for i in s.next_batch()]
    assert len(set(epoch0)) == 20 and set(epoch0) <= set(range(23))  # 3 dropped per epoch
    epoch1 = [i for _ in range(4) for i in s.next_batch()]
    assert s.epoch == 1 and epoch1 != epoch0
    again = PromptSampler(23, 5, seed=1)
    assert [i for _ in range(8) for i in again.next_batch()] == epoch0 + epoch1
    other = PromptSampler(23, 5, seed=2)
    assert [i for _ in range(4) for i in other.next_batch()] != epoch0
    plain = PromptSampler(10, 5, seed=1, shuffle=False)
    assert plain.next_batch() == [0, 1, 2, 3, 4]


def test_resume_continues_the_same_order():
    ref = PromptSampler(50, 8, seed=3)
    expected = [ref.next_batch() for _ in range(20)]
    for stop in (0, 3, 6, 7, 13):
        s = PromptSampler(50, 8, seed=3)
        got = [s.next_batch() for _ in range(stop)]
        state = s.state_dict()
        resumed = PromptSampler(50, 8, seed=3)
        resumed.load_state_dict(state)
        got += [resumed.next_batch() for _ in range(20 - stop)]
        assert got == expected
    with pytest.raises(ValueError, match="seed was 3"):
        PromptSampler(50, 8, seed=4).load_state_dict(state)


def test_sft_example_and_padding(tmp_path):
    task = SyntheticArithmeticTask(num_train=50, num_distill=10, num_eval=10)
    tok = train_tokenizer(task.corpus(), tmp_path, 320, task.tokenizer_symbols)
    p = task.train_problems()[0]
    ids, mask = build_sft_example(tok, p.prompt, p.solutions[0], 200)
    prompt_ids = encode_prompt(tok, p.prompt)
    assert ids[: len(prompt_ids)] == prompt_ids and prompt_ids[0] == tok.bos_id
    assert ids[-1] == tok.eos_id and len(ids) == len(mask)
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert tok.decode(ids[len(prompt_ids) :]) == p.solutions[0]
    with pytest.raises(ValueError, match="exceeds max_len"):
        build_sft_example(tok, p.prompt, p.solutions[0], 10)
    tokens, lengths = pad_sequences([ids, prompt_ids], tok.pad_id)
    assert tokens.shape == (2, len(ids)) and lengths.tolist() == [len(ids), len(prompt_ids)]
    assert tokens[1, len(prompt_ids) :].eq(tok.pad_id).all()
    assert tokens[0].tolist() == ids


def test_the_run_length_line_says_where_the_length_comes_from():
    """training.iterations overrides training.epochs (which base.yaml gives every config): the
    trainer's first line says which one counts, and what an epoch leaves out."""
    from megatron_eaopd.config import load_config
    from megatron_eaopd.data.sampling import length_text, total_iterations

    set_ = load_config(
        None,
        [
            "training.iterations=10",
            "training.epochs=5",
            "rollout.prompts_per_iteration=4",
            "rollout.mini_batch_size=2",
        ],
    )
    assert length_text(set_, 22) == (
        "run length: 10 iterations (20 optimizer steps, 4 prompts each) from training.iterations "
        "(training.epochs is not used): 2.00 epochs of 5 iterations over the 22 distillation "
        "prompts, each leaving out the last 2 of its shuffled order"
    )
    by_epochs = load_config(
        None,
        [
            "training.iterations=null",
            "training.epochs=2.5",
            "rollout.prompts_per_iteration=3",
            "rollout.mini_batch_size=3",
        ],
    )
    assert total_iterations(11, 3, 2.5) == 7
    assert length_text(by_epochs, 11) == (
        "run length: 7 iterations (7 optimizer steps, 3 prompts each) from training.epochs=2.5: "
        "2.33 epochs of 3 iterations over the 11 distillation prompts, each leaving out the last "
        "2 of its shuffled order"
    )
    assert "leaving out" not in length_text(by_epochs, 12)
