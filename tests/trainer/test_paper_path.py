"""The paper-scale command at reduced size: Hugging Face folders in, a distilled HF student out.

What `configs/qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml` runs, with the same keys, made small: a tiny
random Qwen3 teacher and a smaller Qwen3 student saved with transformers, sharing a tokenizer
trained here with the `tokenizers` library and saved as an HF tokenizer with a chat template
(applied with enable_thinking=false, as the paper configs do), JSONL prompt files, a bf16 teacher
and an fp32 student (megatron's bf16 optimizer needs CUDA), the teacher at TP 2 and the student at
TP 1 x DP 2 on 2 gloo ranks, two iterations, and the student exported at the end. The student
starts as the HF folder's model; the export loads in transformers with no missing or unexpected
keys and gives the trained student's logits.
"""

from __future__ import annotations

import json
import os
import random

import torch

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(ROOT, "configs", "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def write_prompts(folder: str) -> dict[str, str]:
    """distill.jsonl (12 prompts) and two eval files (5 and 3 prompts)."""
    rng = random.Random(0)
    paths = {}
    for name, n in (("distill", 12), ("math500", 5), ("aime24", 3)):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w") as f:
            for i in range(n):
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                f.write(json.dumps({"id": f"{name}-{i}", "prompt": f"What is {a} + {b}?",
                                    "answer": a + b}) + "\n")  # fmt: skip
        paths[name] = path
    return paths


def write_tokenizer(folder: str, corpus: list[str]) -> int:
    """A byte-level BPE trained on ``corpus``, saved as an HF fast tokenizer with the chat
    template; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=TEMPLATE,
    )  # fmt: skip
    fast.save_pretrained(folder)
    return len(fast)


def write_model(
    folder: str, vocab: int, layers: int, hidden: int, tied: bool, seed: int, std: float = 0.02
):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, torch_dtype="bfloat16", eos_token_id=2, bos_token_id=0,
        initializer_range=std,
    )  # fmt: skip
    Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def overrides(tmp: str, paths: dict) -> list[str]:
    """The paper config's keys pointed at the tiny models and files, and made small."""
    return [
        f"model.teacher_hf={tmp}/teacher",
        f"model.student_hf={tmp}/student",
        "parallel.teacher.tp=2", "parallel.teacher.pp=1",
        "parallel.student.tp=1", "parallel.student.pp=1",
        "parallel.backend=gloo", "model.student.dtype=fp32",
        f"task.distill_file={paths['distill']}",
        f"task.eval_files=[{paths['math500']},{paths['aime24']}]",
        "rollout.prompts_per_iteration=4", "rollout.mini_batch_size=2",
        "rollout.micro_batch_size=2", "rollout.max_prompt_tokens=96",
        "rollout.max_response_tokens=8",
        "eval.k=2", "eval.max_response_tokens=8", "eval.use_math_verify=false",
        "training.iterations=2", "training.epochs=1", "training.eval_interval=2",
        "training.checkpoint_interval=2",
        f"training.output_dir={tmp}/run", f"training.export_hf={tmp}/export",
        "training.export_dtype=fp32",
        "optimizer.lr=1e-3",
        "logging.wandb=false", "logging.tensorboard=false", "logging.progress_bars=false",
        "logging.console=false",
    ]  # fmt: skip


def _worker(rank, world, cfg, probe):
    from megatron_eaopd.data.sequences import encode_prompt, stop_token_ids
    from megatron_eaopd.parallel.init import destroy_parallel, use_layout
    from megatron_eaopd.trainer import Trainer

    def student_logits():  # [1, s, V_pad] at student TP 1
        with use_layout("student"), torch.no_grad():
            model = trainer.student.chunks[0]
            model.eval()
            out = model(torch.tensor([probe]), torch.arange(len(probe)).unsqueeze(0), None)
            model.train()
            return out.float()

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        prompt_ids = encode_prompt(trainer.data.tokenizer, "What is 1 + 2?")
        start = student_logits()
        summary = trainer.run()
        end = student_logits()
    finally:
        trainer.close()
        destroy_parallel()
    return {"summary": summary, "start": start, "logits": end, "prompt_ids": prompt_ids,
            "stops": stop_token_ids(trainer.data.tokenizer)}  # fmt: skip


def test_paper_config_from_hf_folders_to_an_exported_student(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_eaopd.config import load_config

    tmp = str(tmp_path)
    paths = write_prompts(tmp)
    corpus = [json.loads(line)["prompt"] for p in paths.values() for line in open(p)]
    corpus += ["Let's think step by step and output the final answer within \\boxed{}."] * 20
    vocab = write_tokenizer(f"{tmp}/tokenizer", corpus + [str(i) for i in range(50)])
    write_model(f"{tmp}/teacher", vocab, layers=2, hidden=64, tied=False, seed=1)
    write_model(f"{tmp}/student", vocab, layers=2, hidden=32, tied=True, seed=2)
    for who in ("teacher", "student"):
        AutoTokenizer.from_pretrained(f"{tmp}/tokenizer").save_pretrained(f"{tmp}/{who}")
    # as Qwen3-8B's: the instruct model stops on <|im_end|> (2) and <|endoftext|> (0)
    with open(f"{tmp}/teacher/generation_config.json", "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [2, 0], "do_sample": True}, f)

    cfg = load_config(PAPER, overrides(tmp, paths))
    # the shapes come from config.json; the tokenizer is the teacher's, with its chat template
    assert (cfg.model.student.layers, cfg.model.student.hidden) == (2, 32)
    assert cfg.model.student.tied_embeddings and not cfg.model.teacher.tied_embeddings
    assert cfg.tokenizer.path == f"{tmp}/teacher" and cfg.tokenizer.chat_template
    probe = [5, 17, 42, 7, 99, 3]
    results = run_distributed(_worker, 2, cfg, probe, timeout=900)
    r = results[0]
    assert r["summary"]["iteration"] == 2 and not r["summary"]["stopped_early"]

    tok = AutoTokenizer.from_pretrained(f"{tmp}/teacher")
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?"}], tokenize=True, add_generation_prompt=True,
        enable_thinking=False,
    )  # fmt: skip
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert r["prompt_ids"] == list(expected)
    assert r["stops"] == [2, 0]  # the tokenizer's EOS, then generation_config.json's others
    assert tok.decode(r["prompt_ids"]).endswith("<think>\n\n</think>\n\n")

    with open(f"{tmp}/run/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [x["iteration"] for x in rows if x["split"] == "train"] == [1, 2]
    evals = [x for x in rows if x["split"] == "eval"]
    assert [x["iteration"] for x in evals] == [0, 2] and "math500/avg@2" in evals[-1]

    model, info = AutoModelForCausalLM.from_pretrained(
        f"{tmp}/export", torch_dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        got = model(torch.tensor([probe])).logits[0]
        before = AutoModelForCausalLM.from_pretrained(f"{tmp}/student", torch_dtype=torch.float32)
        initial = before(torch.tensor([probe])).logits[0]
    ours = r["logits"][0, :, :vocab]
    # the student started as the HF folder's model
    assert (r["start"][0, :, :vocab] - initial).abs().max().item() < 1e-4
    # the fp32 export reproduces the trained student
    assert (got - ours).abs().max().item() < 1e-4
    assert (got - initial).abs().max().item() > (got - ours).abs().max().item()
    assert os.path.isfile(f"{tmp}/export/tokenizer_config.json")
    with open(f"{tmp}/export/config.json") as f:
        exported = json.load(f)
    # the source's context, not the run's (prompt + response) length the student was built for
    assert exported["max_position_embeddings"] == 512 and cfg.model.student.max_seq_len < 512
    with open(f"{tmp}/export/generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [2, 0]
