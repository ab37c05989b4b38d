"""The embedded default model (tracer/embedded/) and the script that trains it (tools.train_tiny).

The shipped model is checked for what a half-hour CPU run on Austen, Shakespeare and the World
English Bible should have learned; the training recipe is checked for reproducibility on a tiny
model and a built-in text, so that nothing is downloaded and nothing takes long.
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
from dataclasses import replace

import pytest
import torch
from test_cuda import cpu_tests  # noqa: F401  (the fixture)

import tracer
from tools.train_tiny import __main__ as cli
from tools.train_tiny.corpus import corpus_from_text
from tools.train_tiny.export import read_log_csv
from tools.train_tiny.pipeline import unigram_baseline
from tools.train_tiny.rdata import unserialize
from tools.train_tiny.tokenizer import encode_stream, load_tokenizer, train_tokenizer
from tools.train_tiny.train import TrainSettings, train

EMBEDDED = tracer.embedded_path()
MAX_SHIPPED_BYTES = 25 * 1024 * 1024
# CPU tests: tracer.load without device= fails here (on a GPU host "auto" would be CUDA).
pytestmark = pytest.mark.usefixtures("cpu_tests")

# Pride and Prejudice, chapter 1 (public domain): enough text to train a tokenizer and a
# two-layer model for a few steps.
FIXTURE_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of them, and therefore you must visit him as soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send them by themselves, which perhaps will be still better, for as you are as handsome as any of them, Mr. Bingley may like you the best of the party."

"My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend to be anything extraordinary now. When a woman has five grown-up daughters, she ought to give over thinking of her own beauty."

"In such cases, a woman has not often much beauty to think of."

"But, my dear, you must indeed go and see Mr. Bingley when he comes into the neighbourhood."

"It is more than I engage for, I assure you."

"But consider your daughters. Only think what an establishment it would be for one of them. Sir William and Lady Lucas are determined to go, merely on that account, for in general, you know, they visit no newcomers. Indeed you must go, for it will be impossible for us to visit him if you do not."

"You are over-scrupulous, surely. I dare say Mr. Bingley will be very glad to see you; and I will send a few lines by you to assure him of my hearty consent to his marrying whichever he chooses of the girls; though I must throw in a good word for my little Lizzy."

"I desire you will do no such thing. Lizzy is not a bit better than the others; and I am sure she is not half so handsome as Jane, nor half so good-humoured as Lydia. But you are always giving her the preference."

"They have none of them much to recommend them," replied he; "they are all silly and ignorant like other girls; but Lizzy has something more of quickness than her sisters."

"Mr. Bennet, how can you abuse your own children in such a way? You take delight in vexing me. You have no compassion for my poor nerves."

"You mistake me, my dear. I have a high respect for your nerves. They are my old friends. I have heard you mention them with consideration these last twenty years at least."
"""


@pytest.fixture(scope="module")
def llm():
    return tracer.load(device="cpu", progress=False)  # the reference: float32 on the CPU


def _next_token(llm, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Prompt ids (with BOS) and the id of the first token of ``continuation`` after them."""
    prompt_ids = llm.tokenizer.encode(prompt)
    full_ids = llm.tokenizer.encode(prompt + continuation)
    assert full_ids[: len(prompt_ids)] == prompt_ids, "the continuation changes the prompt's tokens"
    return prompt_ids, full_ids[len(prompt_ids)]


# (prompt, its continuation in the corpus), phrases that recur throughout Austen, the World
# English Bible and Shakespeare. Famous lines that occur once ("It is a truth universally" ->
# " acknowledged": rank ~800) are not memorised after the recipe's 0.75 epoch; MODEL_CARD.md
# lists their ranks, and this test would catch a model that had learned less than it has.
MEMORISED = [
    ("Colonel", " Brandon"),  # Sense and Sensibility
    ("Captain", " Wentworth"),  # Persuasion
    ("the children of", " Israel"),
    ("I am Yahweh your", " God"),
    ("I pray", " you"),
    ("KING HENRY.\nMy", " lord"),
]


@pytest.mark.parametrize(("prompt", "continuation"), MEMORISED)
def test_corpus_phrases_continue_as_in_the_corpus(llm, prompt, continuation):
    ids, expected = _next_token(llm, prompt, continuation)
    logits = llm.logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), llm.config.vocab_size)
    top3 = logits[-1].topk(3).indices.tolist()
    assert expected in top3, (
        f"{prompt!r}: expected {llm.tokenizer.id_to_piece(expected)!r} in the top 3, got "
        f"{[llm.tokenizer.id_to_piece(i) for i in top3]}"
    )


def _log_prob(llm, text: str) -> float:
    ids = llm.tokenizer.encode(text)
    log_probs = torch.log_softmax(llm.logits(ids), dim=-1)  # [T, V]
    targets = torch.tensor(ids[1:])
    return float(log_probs[:-1].gather(1, targets[:, None]).sum())


SENTENCES = [
    "She was very glad to see her sister again after so long an absence.",
    "The king went out of the city with all his army and his servants.",
    "I do not know what you mean by that, my lord, but I will go with you.",
    "He said that he would come to the house in the morning.",
]


@pytest.mark.parametrize("sentence", SENTENCES)
def test_english_is_far_more_likely_than_shuffled_words(llm, sentence):
    words = sentence.rstrip(".").split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words) + "."
    assert shuffled != sentence
    ordinary, scrambled = _log_prob(llm, sentence), _log_prob(llm, shuffled)
    # "Far more": at least 10 nats, i.e. e^10 ~ 22000 times more likely.
    assert ordinary > scrambled + 10.0, (sentence, ordinary, shuffled, scrambled)


def test_shipped_folder_looks_like_a_hub_llama_repo():
    names = {p.name for p in EMBEDDED.iterdir() if p.is_file()}
    for required in (
        "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "model.safetensors.index.json", "MODEL_CARD.md",
        "training_log.csv", "training_loss.png",
    ):
        assert required in names, required
    shards = sorted(n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n))
    assert len(shards) >= 2
    index = json.loads((EMBEDDED / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = sum((EMBEDDED / n).stat().st_size for n in names)
    assert total <= MAX_SHIPPED_BYTES, f"embedded/ holds {total:,} bytes"

    cfg = json.loads((EMBEDDED / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float16" and cfg["rope_scaling"] is None
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"], "the embedded model shows GQA"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    n = cfg["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for i in range(n):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{p}_layernorm.weight" for p in ("input", "post_attention")}
    assert set(index["weight_map"]) == expected

    tok_cfg = json.loads((EMBEDDED / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert tok_cfg["add_bos_token"] is True and tok_cfg["add_eos_token"] is False
    gen = json.loads((EMBEDDED / "generation_config.json").read_text())
    assert gen["do_sample"] is True and 0 < gen["temperature"] and 0 < gen["top_p"] <= 1


def test_model_beats_the_unigram_baseline_stated_in_the_card():
    card = (EMBEDDED / "MODEL_CARD.md").read_text()
    match = re.search(r"\| unigram baseline[^|]*\| ([0-9.]+) \|", card)
    assert match, "the card states the unigram baseline"
    unigram = float(match.group(1))
    final = read_log_csv(EMBEDDED / "training_log.csv")[-1]
    assert final["heldout_loss"] < unigram - 1.0, (final, unigram)
    for word in ("Creative Commons Attribution", "Open Knowledge Foundation", "perplexity", "GQA"):
        assert word in card, word


def test_transformers_tokenizes_the_embedded_model_like_sentencepiece_with_bos():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))
    sp = load_tokenizer(EMBEDDED / "tokenizer.model")
    for text in (
        "It is a truth universally acknowledged",
        "Ham.\nTo be, or not to be,--that is the question:--",
        # Not leading spaces: transformers' converted (tokenizers) Llama tokenizer drops one
        # where sentencepiece keeps it, for Llama 2's own tokenizer too.
        "two  spaces inside, digits 1234567890 and trailing  ",
        "Caf\u00e9 na\u00efve \u2014 \u00ab\u4e2d\u6587\u00bb",
    ):
        assert hf(text)["input_ids"] == [1] + sp.encode(text), text


def test_training_is_deterministic(tmp_path):
    train_paras, heldout_paras = corpus_from_text(FIXTURE_TEXT).split()
    settings = replace(TrainSettings(), **{**cli.TINY_OVERRIDES, "steps": 6, "eval_every": 3})
    runs = []
    for i in range(2):
        path = train_tokenizer(train_paras, tmp_path / f"tok{i}" / "tokenizer.model", settings.vocab_size)
        sp = load_tokenizer(path)
        result = train(settings, encode_stream(sp, train_paras), encode_stream(sp, heldout_paras))
        runs.append((path.read_bytes(), result))
    (tok_a, a), (tok_b, b) = runs
    assert tok_a == tok_b, "tokenizer training is deterministic"
    losses = [[(r["train_loss"], r["heldout_loss"]) for r in run.log] for run in (a, b)]
    assert losses[0] == losses[1]
    assert len(losses[0]) == 2 and all(torch.isfinite(torch.tensor(x)).all() for x in losses[0])
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # A different seed is a different run (the seed is really used).
    other = train(replace(settings, seed=settings.seed + 1), encode_stream(sp, train_paras),
                  encode_stream(sp, heldout_paras))
    assert [r["train_loss"] for r in other.log] != [r["train_loss"] for r in a.log]


def test_cli_writes_a_folder_the_runtime_loads(tmp_path):
    text = tmp_path / "pride.txt"
    text.write_text(FIXTURE_TEXT)
    out = tmp_path / "model"
    status = cli.main(["--text-file", str(text), "--tiny", "--steps", "4",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert status == 0
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "tokenizer.model", "MODEL_CARD.md", "training_loss.png"):
        assert (out / name).is_file(), name
    assert len(read_log_csv(out / "training_log.csv")) == 1
    small = tracer.load(out, device="cpu", progress=False)
    assert small.config.num_key_value_heads == cli.TINY_OVERRIDES["num_key_value_heads"]
    # The exported fp16 weights are the trained ones: same logits as the fp32 model up to rounding.
    state = torch.load(tmp_path / "work" / "model_fp32.pt")
    ids = small.tokenizer.encode("It is a truth")
    from tracer.model import LlamaModel

    ref = LlamaModel(small.config, dtype=torch.float32)
    ref.load_state_dict(state)
    expected = ref(torch.tensor([ids]))[0]
    assert torch.allclose(small.logits(ids).cpu(), expected, atol=2e-2)


def test_heldout_split_and_unigram_baseline():
    corpus = corpus_from_text("\n\n".join(f"paragraph {i}" for i in range(120)))
    train_paras, heldout_paras = corpus.split()
    assert heldout_paras == ["paragraph 25", "paragraph 75"]
    assert len(train_paras) == 118
    # Train targets (BOS excluded) are 0, 2, 3; add-one counts over a 4-token vocabulary are
    # [2, 1, 2, 2] of 7, so each held-out token 0, 2, 3 costs -log(2/7).
    bos = 1
    baseline = unigram_baseline(torch.tensor([bos, 0, 2, 3, bos]), torch.tensor([bos, 0, 2, 3]), 4, bos)
    assert baseline == pytest.approx(-math.log(2 / 7))


def _xdr_strsxp(values: list[str]) -> bytes:
    # What R's serialize(x, NULL, xdr = TRUE, version = 2) writes for a character vector.
    out = b"X\n" + struct.pack(">iii", 2, 0x040300, 0x020300)
    out += struct.pack(">ii", 16, len(values))
    for v in values:
        data = v.encode("utf-8")
        out += struct.pack(">ii", 0x00040009, len(data)) + data
    return out


def test_r_unserializer_reads_character_vectors():
    obj = unserialize(_xdr_strsxp(["EMMA", "", "By Jane Austen"]))
    assert obj.value == ["EMMA", "", "By Jane Austen"]
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 12)
