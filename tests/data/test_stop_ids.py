"""Where responses end with a Hugging Face tokenizer: its EOS, its folder's generation_config.json
ids and the chat template's end-of-turn token; a tokenizer with no end at all is refused before
any model loads. Tokenizers are trained here with the `tokenizers` library."""

from __future__ import annotations

import json
import os

import pytest

from megatron_eaopd.config import TokenizerConfig
from megatron_eaopd.data import TaskError
from megatron_eaopd.data.sequences import (
    chat_turn_end_id,
    encode_prompt,
    eos_id,
    stop_token_ids,
    use_chat_template,
)
from megatron_eaopd.data.tokenizer import build_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _folder(path, eos="<|im_end|>", template=CHATML, generation_eos=None) -> str:
    """An HF fast tokenizer (byte-level BPE; ids 0-4 are SPECIALS) saved in ``path``, with a
    generation_config.json when ``generation_eos`` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["What is 1 + 2? The answer is 3."] * 10, trainer)
    kwargs = {"eos_token": eos} if eos else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", chat_template=template, **kwargs
    )
    fast.save_pretrained(str(path))
    if generation_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return str(path)


def _load(folder):
    return build_tokenizer(TokenizerConfig(kind="huggingface", path=folder))


def test_the_chat_templates_end_of_turn_ends_responses(tmp_path):
    """A base model's folder (EOS <|endoftext|>, no generation ids) with a ChatML template:
    prompts in the template, and responses that stopped only at <|endoftext|> ran on past the
    turn's <|im_end|>. The template's turn end is now a stop id, after the EOS."""
    tok = _load(_folder(tmp_path / "base", eos="<|endoftext|>"))
    assert stop_token_ids(tok) == [0]  # no template in use: the EOS only
    assert chat_turn_end_id(tok) == 2
    use_chat_template(tok)
    assert stop_token_ids(tok) == [0, 2]
    ids = encode_prompt(tok, "What is 1 + 2?")
    assert tok.decode(ids).startswith("<|im_start|>user\n") and ids[-1] != 2
    # an instruct folder already stopping there: nothing twice, the folder's order kept
    tok = _load(_folder(tmp_path / "inst", generation_eos=[2, 0]))
    use_chat_template(tok)
    assert stop_token_ids(tok) == [2, 0]


def test_a_template_without_a_special_turn_end_adds_nothing(tmp_path):
    tok = _load(_folder(tmp_path / "plain", eos="<|endoftext|>", template=PLAIN))
    assert chat_turn_end_id(tok) is None  # "\n" after the turn: not a special token
    use_chat_template(tok)
    assert stop_token_ids(tok) == [0]


def test_eos_from_generation_config_or_refused_before_any_model(tmp_path):
    """A tokenizer without EOS passed every check and failed at the first evaluation, after
    both models had loaded; its generation_config.json ids were not used."""
    tok = _load(_folder(tmp_path / "gen", eos=None, generation_eos=[2, 0]))
    assert tok.eos_token_id is None
    assert eos_id(tok) == 2 and stop_token_ids(tok) == [2, 0]
    bare = _load(_folder(tmp_path / "bare", eos=None, template=PLAIN))
    with pytest.raises(ValueError, match="no EOS token: set eos_token .* generation_config"):
        stop_token_ids(bare)


def test_prepare_data_refuses_a_tokenizer_without_an_end(tmp_path):
    from megatron_eaopd.config import load_config
    from megatron_eaopd.data import prepare_data

    folder = _folder(tmp_path / "bare", eos=None)
    prompts = tmp_path / "distill.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}?", "answer": i}) + "\n"
                               for i in range(8)))  # fmt: skip
    cfg = load_config(
        None,
        ["task.name=jsonl", f"task.distill_file={prompts}", "tokenizer.kind=huggingface",
         f"tokenizer.path={folder}", "teacher_prep.enabled=false",
         f"model.teacher_checkpoint={tmp_path / 'teacher'}", "rollout.prompts_per_iteration=4",
         "rollout.mini_batch_size=4", f"training.output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    with pytest.raises(TaskError, match=f"tokenizer.path='{folder}': the tokenizer has no EOS"):
        prepare_data(cfg)


def test_the_export_carries_the_runs_stop_ids(tmp_path):
    """A base folder (generation_config eos 0) run with the chat template stopped at 0 and 2;
    the exported generation_config.json listed 0 only, so generate on the export ran past the
    turn's end."""
    from megatron_eaopd.models.hf.save import generation_config_with_stops

    folder = _folder(tmp_path / "base", eos="<|endoftext|>", generation_eos=0)
    with open(os.path.join(folder, "generation_config.json")) as f:
        written = {**json.load(f), "do_sample": True}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(written, f)
    tok = _load(folder)
    use_chat_template(tok)
    gen = generation_config_with_stops(folder, stop_token_ids(tok))
    assert gen == {"eos_token_id": [0, 2], "do_sample": True}  # the rest kept
    assert generation_config_with_stops(folder, [0]) is None  # all listed: copied as it is
    # a folder without generation_config.json: its config.json's ids, with the stops
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": 0}))
    assert generation_config_with_stops(str(bare), [0, 3]) == {
        "bos_token_id": 5,
        "eos_token_id": [0, 3],
    }
