"""tracer/tokenizer.py on its own: pieces, BOS, special tokens, byte fallback, chat, bad input.

Agreement with transformers' tokenizers is in test_oracle.py; load failures (missing or corrupt
files) are rows of the failure-mode table (tests/failure_modes.py).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tracer.errors import TokenizerError
from tracer.tokenizer import Encoding, load_tokenizer


@pytest.fixture(scope="module")
def tok(sp_tokenizer_dir):
    return load_tokenizer(sp_tokenizer_dir)


def test_sentencepiece_backend_with_llama_ids(tok):
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert {"<s>": 1, "</s>": 2}.items() <= tok.special_tokens.items()


def test_bos_follows_the_checkpoint_and_add_bos_overrides_it(tok):
    with_bos = tok.encode("The people")  # this folder's tokenizer_config.json says add_bos_token: true
    without = tok.encode("The people", add_bos=False)
    assert tok.add_bos_token and not tok.add_eos_token
    assert with_bos == [tok.bos_id] + without == tok.encode("The people", add_bos=True)
    assert tok.encode("The people", add_eos=True) == with_bos + [tok.eos_id]
    enc = tok.tokenize("The people")
    assert isinstance(enc, Encoding) and enc.added_bos and not enc.added_eos and enc.ids == with_bos
    assert enc.pieces == [tok.id_to_piece(i) for i in with_bos] == tok.pieces(with_bos)
    assert enc.pieces[0] == "<s>" and enc.pieces[1].startswith("▁")  # the dummy prefix
    assert not tok.tokenize("The people", add_bos=False).added_bos
    assert tok.tokenize("The people", add_eos=True).added_eos


@pytest.mark.parametrize("text", ["The people of the world.", "a  double  space", "naïve café", "🙂 ok", "\n\ttabs\n"])
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unknown_characters_fall_back_to_bytes(tok):
    """A character outside the vocabulary becomes its UTF-8 bytes, <0xF0><0x9F>..., not <unk>."""
    pieces = tok.pieces(tok.encode("🙂", add_bos=False))
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_special_token_strings_are_parsed_unless_asked_not_to(tok):
    """As transformers' tokenizer(text): special-token strings become their ids by default."""
    text = "Hi</s><s>there"
    parsed = tok.encode(text)
    assert parsed == tok.encode(text, parse_special=True)
    assert parsed.count(tok.eos_id) == 1 and parsed.count(tok.bos_id) == 2  # BOS first, then the literal
    plain = tok.encode(text, parse_special=False)
    assert tok.eos_id not in plain and plain.count(tok.bos_id) == 1
    assert tok.decode(plain) == text  # read as characters, they come back as characters


def test_decode_writes_or_drops_special_tokens(tok):
    ids = tok.encode("Hi there") + [tok.eos_id]
    assert tok.decode(ids) == "Hi there"
    # The dummy prefix's space is dropped only at the very start of the text; after a written
    # special token it stays, as transformers' Llama tokenizer writes it.
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Hi there</s>"


def test_bad_input_is_refused_with_the_value(tok):
    with pytest.raises(TokenizerError, match="expects a str, got list"):
        tok.encode(["Hi"])
    with pytest.raises(TokenizerError, match=rf"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="token id -1"):
        tok.decode([-1])


@pytest.mark.parametrize("messages, message", [
    ([], "at least one message"),
    ([{"role": "system", "content": "Be brief."}], "user message after the system"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last chat message"),
])
def test_llama2_chat_refuses_malformed_conversations(tok, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tok.llama2_chat(messages)


def test_llama2_chat_strips_each_turn_and_ends_answers_with_eos(tok):
    ids = tok.llama2_chat([{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "Yo"},
                           {"role": "user", "content": "Again"}])
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1  # one BOS per [INST] turn
    assert tok.decode(ids, skip_special_tokens=False) == "<s> [INST] Hi [/INST] Yo </s><s> [INST] Again [/INST]"


def test_a_checkpoint_chat_template_is_rendered_from_its_file(sp_tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ raise_exception('no assistant turns here') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
    )
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s><user>Hi<bot>"
    with pytest.raises(TokenizerError, match="refused the messages: no assistant turns here"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(TokenizerError, match="failed to render"):
        (folder / "chat_template.jinja").write_text("{% for %}")
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "Hi"}])


def test_no_chat_template_points_to_llama2_chat(tok):
    assert tok.chat_template is None  # the fixture is a Llama 2 tokenizer folder without one
    with pytest.raises(TokenizerError, match="llama2_chat"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_without_a_template_uses_the_llama2_format_for_a_llama2_vocabulary(tok):
    assert tok.is_llama2_style()  # <s>/</s> and spaces written "▁"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    enc = tok.chat(messages)
    assert enc.template == "llama2-chat" and enc.added_bos and enc.ids == tok.llama2_chat(messages)
    assert enc.text == tok.decode(enc.ids, skip_special_tokens=False) and enc.pieces == tok.pieces(enc.ids)


def test_chat_renders_the_template_and_tokenizes_without_a_second_bos(sp_tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}bot:{% endif %}"
    )
    tok = load_tokenizer(folder)
    enc = tok.chat([{"role": "user", "content": "Hi"}])
    assert enc.text == "<s>user: Hi</s>bot:" and enc.template == "chat_template.jinja"
    assert enc.ids.count(tok.bos_id) == 1 and enc.ids[0] == tok.bos_id and enc.added_bos
    assert enc.ids == tok.encode(enc.text, add_bos=False)


def test_chat_template_jinja_wins_over_the_config_entry(sp_tokenizer_dir, tmp_path):
    """As transformers: a chat_template.jinja file takes priority over tokenizer_config.json's entry."""
    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "config"}))
    tok = load_tokenizer(folder)
    assert (tok.apply_chat_template([{"role": "user", "content": "Hi"}]), tok.source) == (
        "config", "tokenizer_config.json")
    (folder / "chat_template.jinja").write_text("file")
    tok = load_tokenizer(folder)
    assert (tok.apply_chat_template([{"role": "user", "content": "Hi"}]), tok.source) == (
        "file", "chat_template.jinja")


@pytest.mark.parametrize("messages, message", [
    ([], "at least one message"),
    (["Hi"], "must be dicts"),
])
def test_template_chat_refuses_malformed_messages(sp_tokenizer_dir, tmp_path, messages, message):
    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(folder).chat(messages)


def test_add_bos_without_a_bos_token_is_refused(tok, monkeypatch):
    monkeypatch.setattr(tok, "bos_id", None)
    with pytest.raises(TokenizerError, match="add_bos=True, but this tokenizer has no BOS token"):
        tok.encode("Hi", add_bos=True)


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(_hidden=1) %}{{ ns._hidden }}",  # transformers' TemplateNamespace refuses it
    "{{ messages.__class__.__name__ }}",  # the sandbox refuses dunder attributes
])
def test_chat_templates_render_in_a_sandbox(sp_tokenizer_dir, tmp_path, template):
    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(TokenizerError, match="failed to render"):
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "Hi"}])
