"""Shared fixtures. Add new ones below as plain, independent fixtures."""

from __future__ import annotations

import browser
import pytest


@pytest.fixture
def jupyter_isolated(tmp_path, monkeypatch):
    """Jupyter/IPython dirs in tmp_path, so a user's own kernelspecs/startup files don't leak in."""
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def chromium_browser():
    """Debian Chromium via Playwright; skips (or fails when CI=true) if either is missing."""
    browser.require_browser()
    with browser.chromium() as b:
        yield b


@pytest.fixture
def lab_page(chromium_browser, request):
    """A fresh Chromium page; saves artifacts/failed-<test>.png if the test fails."""
    with browser.new_page(chromium_browser) as page:
        yield page
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            name = "failed-" + "".join(c if c.isalnum() else "_" for c in request.node.name)
            try:
                browser.screenshot(page, name)
            except Exception:  # noqa: BLE001 - best effort diagnostics
                pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# --- Checkpoints the tests build (transformers' save_pretrained + a sentencepiece tokenizer) ---


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
    """A Llama-2-style sentencepiece tokenizer folder (tokenizer.model + tokenizer_config.json)."""
    import builders

    folder = tmp_path_factory.mktemp("tokenizer")
    builders.train_sentencepiece(folder)
    return folder


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, sp_tokenizer_dir):
    """Factory: ``make_checkpoint(**kwargs) -> (folder, hf_model)``; built once per kwargs."""
    import builders

    built: dict = {}

    def make(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in built:
            folder = tmp_path_factory.mktemp("ckpt")
            model = builders.build_checkpoint(folder, sp_tokenizer_dir, **kwargs)
            built[key] = (folder, model)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint):
    """The default small checkpoint: GQA, sharded, float32 weights; returns its folder."""
    return make_checkpoint(shard_size="60KB")[0]


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint):
    """``tracer.load`` of the default small checkpoint on the CPU in float32."""
    import tracer

    return tracer.load(tiny_checkpoint, device="cpu", dtype="float32", progress=False)


# --- Tokenizer folders of each family (tests/tokenizer_builders.py) ---


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    """Llama 3 style: byte-level BPE tokenizer.json whose post-processor adds <|begin_of_text|>."""
    import tokenizer_builders

    return tokenizer_builders.build_llama3_tokenizer(tmp_path_factory.mktemp("llama3-tokenizer"))


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory):
    """SmolLM2 style: byte-level BPE tokenizer.json that adds no BOS, a ChatML template."""
    import tokenizer_builders

    return tokenizer_builders.build_chatml_tokenizer(tmp_path_factory.mktemp("chatml-tokenizer"))


@pytest.fixture(scope="session")
def llama2_chat_tokenizer_dir(tmp_path_factory, sp_tokenizer_dir):
    """The sentencepiece Llama 2 folder with Llama-2-7b-chat-hf's chat template in its config."""
    import tokenizer_builders

    folder = tmp_path_factory.mktemp("llama2-chat-tokenizer") / "tokenizer"
    return tokenizer_builders.with_config(sp_tokenizer_dir, folder, chat_template=tokenizer_builders.LLAMA2_TEMPLATE)


# --- GGUF files the tests write (tests/gguf_builders.py over benchmarks/gguf_writer.py) ---------


@pytest.fixture(scope="session")
def gguf_cases(tmp_path_factory, sp_tokenizer_dir):
    """The builder behind ``gguf_file`` and ``damaged_gguf`` (one per session)."""
    import gguf_builders

    return gguf_builders.GgufCases(tmp_path_factory.mktemp("gguf"), sp_tokenizer_dir)


@pytest.fixture(scope="session")
def gguf_file(gguf_cases):
    """Factory: ``gguf_file(kind) -> (path, hf_model, source tokenizer)`` for a kind of
    gguf_builders.KINDS ("gpt2-f32", "llama-f16", "gpt2-q4_0-tied", ...), built once per kind."""
    pytest.importorskip("gguf")
    return gguf_cases.get


@pytest.fixture(scope="session")
def damaged_gguf(gguf_cases):
    """Factory: ``damaged_gguf(name) -> path`` for a damage of gguf_builders.DAMAGES ("truncated",
    "extra_tensors", "past_end", "undequantizable", "qwen2", "no_tokenizer", "no_vocab")."""
    pytest.importorskip("gguf")
    return gguf_cases.damage
