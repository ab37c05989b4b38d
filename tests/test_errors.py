"""Every bad input ends in one clear TracerError; nothing unsafe is loaded (issue 6).

The table of cases lives in ``failure_modes.py`` and also renders ``docs/failure-modes.md``; the
tests below run each case once, then check the cases that need more than "this error came out":
no unpickling, no file opened outside the model folder, warnings, interrupted saves, the CLI, and
the hub's offline and gated messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import builders
import failure_modes as fm
import pytest
import torch

import tracer
from tracer import api
from tracer.config import LlamaConfig
from tracer.errors import (
    CheckpointError,
    DeviceError,
    NumericsError,
    TraceError,
    TracerError,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fm.Workspace.build(tmp_path_factory.mktemp("errors"))


@pytest.fixture(scope="module")
def outcomes(ws):
    """Each case run once: case name -> what it raised."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {case.name: fm.run_case(case, ws) for case in fm.CASES}


@pytest.mark.parametrize("case", fm.CASES, ids=[f"{c.area}:{c.name}" for c in fm.CASES])
def test_case_gives_its_error(case, outcomes):
    exc = outcomes[case.name]
    assert type(exc) is case.error, f"expected {case.error.__name__}, got {exc!r}"
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message
    assert exc.__cause__ is None or isinstance(exc.__cause__, TracerError)


def test_failure_table_is_current(ws, outcomes):
    rows = [(case, ws.normalize(str(outcomes[case.name]))) for case in fm.CASES]
    rendered = fm.render(rows)
    committed = fm.TABLE.read_text() if fm.TABLE.is_file() else ""
    assert committed == rendered, (
        "docs/failure-modes.md is out of date with tests/failure_modes.py; regenerate it with "
        "`python tests/failure_modes.py`"
    )


def test_case_names_are_unique():
    names = [c.name for c in fm.CASES]
    assert len(names) == len(set(names))


# --- nothing unsafe is loaded -----------------------------------------------------------------


def test_pickle_is_never_unpickled(ws, monkeypatch):
    m = ws.model()
    for p in [*m.glob("*.safetensors"), m / "model.safetensors.index.json"]:
        p.unlink()
    marker = ws.root / "UNPICKLED-marker-2"
    fm.write_marker_pickle(m / "pytorch_model.bin", marker)
    (m / "consolidated.00.pth").write_bytes((m / "pytorch_model.bin").read_bytes())

    def refuse(*args, **kwargs):
        raise AssertionError("an unpickler was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    with fm.opened_paths() as seen:
        with pytest.raises(CheckpointError, match="only pickle weight files") as err:
            fm.load(m)
    assert "consolidated.00.pth" in str(err.value) and "pytorch_model.bin" in str(err.value)
    assert not marker.exists()
    assert not [p for p in seen if p.suffix in (".bin", ".pth")]
    # The marker pickle does work: unpickling it (in a fresh process) creates the file.
    code = f"import pickle; pickle.loads(open({str(m / 'pytorch_model.bin')!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "single-symlink", "config-dir"])
def test_nothing_outside_the_folder_is_opened(ws, how):
    m = ws.model()
    outside = fm.outside_file(ws)
    index = m / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    first = raw["weight_map"]["model.embed_tokens.weight"]
    if how == "dotdot":
        raw["weight_map"]["model.embed_tokens.weight"] = f"../{outside.name}"
    elif how == "absolute":
        raw["weight_map"]["model.embed_tokens.weight"] = str(outside)
    elif how == "symlink":
        (m / first).unlink()
        (m / first).symlink_to(outside)
    elif how == "single-symlink":
        index.unlink()
        (m / "model.safetensors").symlink_to(outside)
    elif how == "config-dir":  # index itself is a symlink out of the folder
        index.unlink()
        target = ws.root / "OUTSIDE-index.json"
        target.write_text(json.dumps(raw))
        index.symlink_to(target)
    if index.is_file() and not index.is_symlink():
        index.write_text(json.dumps(raw))
    with fm.opened_paths() as seen:
        with pytest.raises(CheckpointError, match="outside the model folder|not a plain file name"):
            fm.load(m)
    fm.assert_inside(seen, m)
    assert outside.resolve() not in seen


def test_unexpected_tensors_warn_and_are_ignored(ws):
    m = ws.model()
    builders.add_tensor(m, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    builders.add_tensor(m, "model.layers.0.mystery.weight", torch.ones(4, 4))
    with pytest.warns(UserWarning, match="ignored 1 unexpected tensor.*mystery") as record:
        llm = fm.load(m)
    assert not any("inv_freq" in str(w.message) for w in record)
    shards = llm.load_trace.of("load_shard")
    assert ["model.layers.0.mystery.weight"] == [u for e in shards for u in e.unexpected]
    # Same weights as the clean checkpoint, so the same greedy continuation.
    want = ws.llm.generate("Hello", max_new_tokens=4, capture="off").new_ids
    assert llm.generate("Hello", max_new_tokens=4, capture="off").new_ids == want


# --- generation -------------------------------------------------------------------------------


def test_fp16_overflow_names_layer_and_point(outcomes):
    exc = outcomes["float16 overflow in layer 1's MLP (non-finite logits)"]
    assert isinstance(exc, NumericsError)
    assert "'blocks.1.mlp.out'" in str(exc) and "float16" in str(exc)


def test_prompt_length_limit_is_exact(ws):
    llm = ws.llm
    ids = llm.tokenizer.encode("Hello")
    limit = llm.config.max_position_embeddings
    llm.decoder(ids, max_new_tokens=limit - len(ids), capture="off")  # exactly fits
    with pytest.raises(tracer.errors.GenerationError, match="max_position_embeddings"):
        llm.decoder(ids, max_new_tokens=limit - len(ids) + 1, capture="off")


# --- device -----------------------------------------------------------------------------------


def _cfg_7b(ws) -> LlamaConfig:
    base = LlamaConfig.from_file(ws.base / "config.json").to_hf_dict()
    return LlamaConfig.from_dict({**base, "num_hidden_layers": 32, "hidden_size": 4096,
                                  "intermediate_size": 11008, "vocab_size": 32000,
                                  "num_attention_heads": 32, "num_key_value_heads": 32,
                                  "head_dim": 128})


def test_check_fits_compares_with_free_memory(ws, monkeypatch):
    cfg = _cfg_7b(ws)
    assert cfg.memory_bytes("float16") * 2 == cfg.memory_bytes("float32")
    free = cfg.memory_bytes("float16") + 10**9  # fp16 fits, fp32 does not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 10**9))
    api.check_fits(cfg, torch.device("cuda"), torch.float16)
    api.check_fits(cfg, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(DeviceError) as err:
        api.check_fits(cfg, torch.device("cuda"), torch.float32)
    msg = str(err.value)
    assert f"{cfg.memory_bytes('float32') / 1e9:.1f} GB" in msg and "halves" in msg
    api.check_fits(cfg, torch.device("cpu"), torch.float32)  # the CPU is not checked


def test_cuda_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            api.pick_device(device)
    assert api.pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real CPU-only machine")
def test_cuda_absent_for_real(ws):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        tracer.load(ws.base, device="cuda", progress=False)


# --- traces -----------------------------------------------------------------------------------


def _trace(ws, text="Hello"):
    return ws.llm.generate(text, max_new_tokens=2, capture="full", points=("blocks.0.attn.z",)).trace


def test_trace_edited_with_its_manifest(ws, tmp_path):
    """Digests match, content is nonsense: still one TraceError, never a KeyError."""
    folder = _trace(ws).save(tmp_path / "t")
    for content in ('{"events": [{"stage": "nope"}]}', '{"events": 5}', "[]", "{",
                    '{"events": [{"stage": "sample", "step": {"x": 1}}], "meta": 3}',
                    "[" * 100_000 + "]" * 100_000, '{"n": ' + "9" * 5000 + "}"):
        (folder / "events.json").write_text(content)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["events.json"] = {
            "bytes": len(content.encode()),
            "sha256": hashlib.sha256(content.encode()).hexdigest(),
        }
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(TraceError):
            tracer.Trace.load(folder)
    (folder / "manifest.json").write_text('{"files": [1]}')
    with pytest.raises(TraceError, match="corrupt"):
        tracer.Trace.load(folder)


@pytest.mark.parametrize("fail_at", ["save_file", "final_replace"])
def test_interrupted_save_keeps_the_old_trace(ws, tmp_path, monkeypatch, fail_at):
    folder = _trace(ws, "Hello").save(tmp_path / "t")
    old = tracer.Trace.load(folder)
    new = _trace(ws, "The")

    class Interrupted(Exception):
        pass

    if fail_at == "save_file":
        import safetensors.torch

        def boom(*args, **kwargs):
            raise Interrupted

        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst) == folder and ".saving-" in Path(src).name:
                raise Interrupted
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted):
        new.save(folder)
    monkeypatch.undo()
    again = tracer.Trace.load(folder)
    assert again.stages == old.stages
    assert [e.to_json() for e in again.events] == [e.to_json() for e in old.events]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp folders left behind


# --- CLI --------------------------------------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_error_is_one_line():
    r = _cli("generate", "--model", "/nonexistent", "--prompt", "x")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_debug_shows_traceback():
    r = _cli("--debug", "generate", "--model", "/nonexistent", "--prompt", "x")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "CheckpointError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


# --- hub --------------------------------------------------------------------------------------


def test_hub_offline_not_cached(tmp_path):
    """The real thing: huggingface_hub reads HF_HUB_OFFLINE at import, hence a subprocess."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = _cli("info", "--model", "some-org/not-cached-llama", env=env)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "not in the local hub cache" in line and "local folder" in line
    assert "HF_HUB_OFFLINE" in line


def test_hub_gated_message(monkeypatch):
    import huggingface_hub

    def gated(*args, **kwargs):
        raise fm.gated_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError) as err:
        tracer.load("meta-llama/Llama-2-7b-chat-hf", device="cpu", progress=False)
    msg = str(err.value)
    assert "gated" in msg and "token" in msg and "meta-llama/Llama-2-7b-chat-hf" in msg


@pytest.mark.parametrize("capture", ["off", "light", "full"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_fp16_overflow_is_named_under_every_policy(ws, capture, do_sample):
    """Finiteness is checked in the step's one host copy, greedy or sampled: a named
    NumericsError, never a bare RuntimeError or a silent nonsense token."""
    m = ws.model()
    builders.edit_tensors(m, lambda n, t: torch.where(t >= 0, 6e4, -6e4)
                          if n == "model.layers.1.mlp.down_proj.weight" else t)
    llm = tracer.load(m, dtype="float16")
    kw = {"points": ["logits"]} if capture == "full" else {}
    with pytest.raises(NumericsError, match="blocks.1.mlp.out"):
        llm.generate("Hello there", max_new_tokens=2, capture=capture, do_sample=do_sample, **kw)


# --- CLI mistakes: one line, exit 2, the flag to type -------------------------------------------


def _one_line_error(r) -> str:
    """The CLI's answer to a mistake: exit 2, nothing on stdout, one 'error: ...' line on stderr."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def test_cli_unknown_hook_point_names_the_flag_and_close_names(tmp_path):
    r = _cli("trace", "--points", "block.0.attn.pattern", "--capture", "full", "--prompt", "x",
             "--out", str(tmp_path / "t"))
    line = _one_line_error(r)
    assert "--points" in line and "'block.0.attn.pattern'" in line
    assert "did you mean 'blocks.0.attn.pattern'?" in line
    assert not (tmp_path / "t").exists()


def test_cli_hook_layer_out_of_range_says_the_range(tmp_path):
    layers = tracer.load(progress=False).config.num_hidden_layers
    r = _cli("trace", "--points", f"blocks.{layers}.resid_post", "--capture", "full", "--prompt", "x",
             "--out", str(tmp_path / "t"))
    assert f"layers are 0 to {layers - 1}" in _one_line_error(r)


def test_unknown_hook_point_is_a_trace_error_in_the_api(tiny_llm):
    """The same error from the API: a TraceError (and a KeyError: a failed lookup by name)."""
    with pytest.raises(TraceError, match=r"did you mean 'blocks\.\*\.attn\.pattern'\?") as err:
        tiny_llm.generate("x", max_new_tokens=1, capture="full", points="blocks.*.attn.patern")
    assert isinstance(err.value, KeyError) and "\n" not in str(err.value)
    assert not str(err.value).startswith('"')  # not KeyError's quoted str
    with pytest.raises(TraceError, match="'embed'"):
        tiny_llm.model.hooks["embd"]


def test_cli_points_without_full_capture_names_the_flag(tmp_path):
    r = _cli("trace", "--points", "blocks.0.attn.pattern", "--prompt", "x", "--out", str(tmp_path / "t"))
    line = _one_line_error(r)
    assert "--capture full" in line and "capture='full'" not in line


def test_cli_sampling_mistake_names_the_greedy_flag():
    r = _cli("generate", "--prompt", "x", "--sample", "--temperature", "0")
    line = _one_line_error(r)
    assert "--greedy" in line and "do_sample" not in line


def test_cli_budget_message_names_the_budget_flag(tmp_path):
    r = _cli("trace", "--capture", "full", "--points", "blocks.*", "--budget-mb", "0.01", "--prompt", "x",
             "--max-new-tokens", "1", "--out", str(tmp_path / "t"))
    line = _one_line_error(r)
    assert "--budget-mb" in line and "--capture light" in line and "budget_bytes" not in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_debug_before_or_after_the_command(where):
    cmd = ["generate", "--model", "/nonexistent", "--prompt", "x"]
    r = _cli(*(["--debug", *cmd] if where == "before" else [*cmd, "--debug"]))
    assert r.returncode == 2
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize(("api", "cli"), [
    ("use greedy decoding (do_sample=False)", "use greedy decoding (--greedy)"),
    ("kept only with capture='full'", "kept only with --capture full"),
    ("over budget_bytes=536.9 MB. Raise", "over --budget-mb 536.9. Raise"),
    ("give points=['blocks.0.ln1']", "give --points ['blocks.0.ln1']"),
    ("add a chat_template.jinja or use chat=False", "add a chat_template.jinja or leave out --chat"),
    ("system= is a chat message: pass chat=True with it", "--system is a chat message: pass --chat with it"),
    ("load with dtype='bfloat16' or 'float32'", "load with --dtype bfloat16 or float32"),
    ("use device='cpu' or 'auto'", "use --device cpu or auto"),
    ("use matvec='auto' or 'torch'", "use --matvec auto or torch"),
    ("pick one with gguf_file=NAME (--gguf-file)", "pick one with --gguf-file NAME"),
    ("or load without quantized=True", "or load without --quantized yes"),
    ("pass token=... or log in", "pass --token TOKEN (or set HF_TOKEN) or log in"),
    ("torch_dtype='float16' in config.json", "torch_dtype='float16' in config.json"),  # a field, not an argument
])
def test_cli_writes_api_arguments_as_flags(api, cli):
    from tracer.cli import in_cli_words

    assert in_cli_words(api) == cli


def test_cli_contradicting_sampling_flags_is_one_line_naming_both():
    r = _cli("generate", "--prompt", "x", "--sample", "--greedy")
    line = _one_line_error(r)
    assert "--sample" in line and "--greedy" in line and "contradict" in line
