"""tracer.api: devices, dtypes, the public names, the walkthrough example and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tracer
from tracer.api import pick_device, pick_dtype
from tracer.config import LlamaConfig
from tracer.errors import DeviceError

ROOT = Path(__file__).resolve().parent.parent


def test_auto_device_and_dtype_rules():
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, torch_dtype="float16")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", cfg, torch.device("cuda")) == torch.float16
    assert pick_dtype("bfloat16", cfg, torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("stored, ram_gb, expected", [
    ("float16", 64, torch.float32),   # 27 GB of float32 fits in half of 64 GB
    ("float16", 16, torch.float16),   # a 16 GB laptop: the checkpoint's 16-bit type
    ("bfloat16", 16, torch.bfloat16),
    ("float32", 16, torch.float16),   # a float32 checkpoint too big: float16 halves it
])
def test_auto_dtype_on_the_cpu_fits_a_7b_model_in_memory(monkeypatch, stored, ram_gb, expected):
    """dtype="auto" on the CPU: float32 unless the float32 weights exceed half of the RAM."""
    from tracer import api

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, torch_dtype=stored)  # Llama-2-7B: 27 GB in float32
    monkeypatch.setattr(api, "physical_memory", lambda: ram_gb * 10**9)
    assert pick_dtype("auto", cfg, torch.device("cpu")) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")


def test_public_api_shapes(tiny_llm):
    ids = tiny_llm.tokenizer.encode("The people", add_bos=True)
    assert ids[0] == tiny_llm.tokenizer.bos_id
    logits = tiny_llm.logits(ids)
    assert logits.shape == (len(ids), tiny_llm.config.vocab_size) and logits.dtype == torch.float32
    gen = tiny_llm.generate("The people", max_new_tokens=5, do_sample=True, temperature=0.7, top_k=40,
                            top_p=0.95, repetition_penalty=1.1, seed=0)
    assert gen.prompt_ids == ids and 1 <= len(gen.new_ids) <= 5
    # As transformers' pipeline cuts it: the whole text minus the prompt's (keeps the leading space).
    whole = tiny_llm.tokenizer.decode(gen.prompt_ids + gen.new_ids)
    assert "The people" + gen.text == whole
    again = tiny_llm.generate("The people", max_new_tokens=5, do_sample=True, temperature=0.7, top_k=40,
                              top_p=0.95, repetition_penalty=1.1, seed=0)
    assert again.new_ids == gen.new_ids  # seeded sampling is reproducible


def test_generation_config_json_supplies_defaults(make_checkpoint):
    folder, _ = make_checkpoint(kv_heads=4, generation_config={"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    llm = tracer.load(folder, device="cpu", progress=False)
    settings, _ = llm.settings()
    assert (settings.do_sample, settings.temperature, settings.top_p, settings.top_k) == (True, 0.6, 0.9, 50)
    settings, _ = llm.settings(temperature=1.2, do_sample=False)
    assert (settings.do_sample, settings.temperature) == (False, 1.2)


def test_llama2_chat_format_at_token_level(tiny_llm):
    tok = tiny_llm.tokenizer
    ids = tok.llama2_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids == tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    two = tok.llama2_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Again"}])
    assert two == tok.encode("[INST] Hi [/INST] Hello ") + [tok.eos_id] + tok.encode("[INST] Again [/INST]")


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_generate_json(tiny_checkpoint):
    out = run_cli("generate", "--model", str(tiny_checkpoint), "--prompt", "The people",
                  "--max-new-tokens", "4", "--greedy", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    llm = tracer.load(tiny_checkpoint, device="cpu", progress=False)
    assert result["new_ids"] == llm.generate("The people", max_new_tokens=4, do_sample=False).new_ids


def test_cli_trace_writes_a_loadable_folder(tiny_checkpoint, tmp_path):
    out = run_cli("trace", "--model", str(tiny_checkpoint), "--prompt", "The people", "--max-new-tokens", "3",
                  "--out", str(tmp_path / "t"), "--capture", "full", "--points", "blocks.0.attn.pattern")
    assert out.returncode == 0, out.stderr
    trace = tracer.Trace.load(tmp_path / "t")
    assert trace.stages[0] == "config" and trace.stages[-1] == "detokenize"
    assert "blocks.0.attn.pattern" in trace.of("prefill")[0].tensors


def test_cli_matvec_choice_reaches_the_trace(tiny_checkpoint, tmp_path):
    out = run_cli("trace", "--model", str(tiny_checkpoint), "--prompt", "The people", "--max-new-tokens", "2",
                  "--out", str(tmp_path / "t"), "--matvec", "torch")
    assert out.returncode == 0, out.stderr
    assert tracer.Trace.load(tmp_path / "t").meta["matvec"] == "torch"


def test_walkthrough_example_runs():
    """examples/run.py as a script (its seeds and the chat model: tests/test_examples.py)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "run.py"), "--model", "embedded",
                          "--max-new-tokens", "8", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("It is a truth universally acknowledged") and "chat format" in out.stderr


def test_compiled_step_generates_the_same_tokens(tiny_checkpoint):
    """load(compile=True): capture="off" decodes with a torch.compile'd LlamaModel.step, compiled
    once for a cache size and reused for every step; traced runs stay eager."""
    eager = tracer.load(tiny_checkpoint, device="cpu", progress=False)
    fast = tracer.load(tiny_checkpoint, device="cpu", progress=False, compile=True)
    assert fast.fast_step is not None and eager.fast_step is None
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=4)
    assert fast.generate("The people", capture="off", **kw).new_ids == eager.generate("The people", capture="off", **kw).new_ids
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    kw["max_new_tokens"] = 20  # another length, the same cache bucket
    assert fast.generate("The people", capture="off", **kw).new_ids == eager.generate("The people", capture="off", **kw).new_ids
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile per step or run
    with fast.model.hooks.record("blocks.0.attn.pattern") as rec:  # hooks active -> eager path
        fast.generate("The people", max_new_tokens=2, capture="off", do_sample=False)
    assert "blocks.0.attn.pattern" in rec


# --- check_fits: what a GPU load and a generation need, against a mocked free-memory figure -----


def _llama2_7b() -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=4096, torch_dtype="float16")


def _need(cfg, tokens, *, weights=True):
    from tracer import api

    return ((cfg.memory_bytes("float16") if weights else 0) + cfg.kv_cache_bytes(tokens, "float16")
            + api.activation_bytes(cfg, tokens, "float16") + api.FIT_MARGIN_BYTES)


def _memory(free, cached=0, total=80 * 10**9):
    from tracer.api import DeviceMemory

    return lambda device: DeviceMemory(free, total, cached)


def test_check_fits_counts_the_kv_cache_activations_and_a_margin():
    """Device: a mocked CUDA. The weights alone fit; the KV cache for the length asked decides."""
    from tracer.api import LOAD_FIT_TOKENS, check_fits

    cfg, cuda, fp16 = _llama2_7b(), torch.device("cuda"), torch.float16
    assert cfg.kv_cache_bytes(4096, "float16") == 2 * 1024**3  # the walkthrough's "2 GB at 4096 tokens"
    check_fits(cfg, cuda, fp16, memory=_memory(_need(cfg, LOAD_FIT_TOKENS)))  # a load: LOAD_FIT_TOKENS
    with pytest.raises(DeviceError) as err:
        check_fits(cfg, cuda, fp16, memory=_memory(_need(cfg, LOAD_FIT_TOKENS) - 1))
    check_fits(cfg, cuda, fp16, tokens=512, memory=_memory(_need(cfg, 512)))
    with pytest.raises(DeviceError) as err:
        check_fits(cfg, cuda, fp16, tokens=4096, memory=_memory(_need(cfg, 512)))
    msg = str(err.value)
    assert "\n" not in msg and "device='cpu'" in msg and "smaller dtype" in msg
    assert f"KV cache for 4096 tokens {cfg.kv_cache_bytes(4096, 'float16') / 1e9:.1f} GB" in msg
    assert f"weights in float16 {cfg.memory_bytes('float16') / 1e9:.1f} GB" in msg
    assert f"needs {_need(cfg, 4096) / 1e9:.1f} GB" in msg and f"has {_need(cfg, 512) / 1e9:.1f} GB free" in msg


def test_check_fits_counts_what_the_caching_allocator_holds_unused():
    """Device: a mocked CUDA. Reserved but unallocated memory (a notebook's dropped model) is free to us."""
    from tracer.api import check_fits

    cfg, cuda, fp16 = _llama2_7b(), torch.device("cuda"), torch.float16
    need = _need(cfg, 1024)
    check_fits(cfg, cuda, fp16, tokens=1024, memory=_memory(need - 5 * 10**9, cached=5 * 10**9))
    with pytest.raises(DeviceError, match="5.0 GB torch's allocator holds unused"):
        check_fits(cfg, cuda, fp16, tokens=1024, memory=_memory(need - 5 * 10**9 - 1, cached=5 * 10**9))


def test_check_fits_for_a_generation_counts_no_weights_and_says_to_ask_for_fewer_tokens():
    """Device: a mocked CUDA, the weights already there (Llama.decoder's check)."""
    from tracer.api import check_fits

    cfg, cuda = _llama2_7b(), torch.device("cuda")
    free = _need(cfg, 2048, weights=False)
    check_fits(cfg, cuda, torch.float16, tokens=2048, weights_loaded=True, memory=_memory(free))
    with pytest.raises(DeviceError) as err:
        check_fits(cfg, cuda, torch.float16, tokens=2049, weights_loaded=True, memory=_memory(free))
    assert "max_new_tokens" in str(err.value) and "weights" not in str(err.value)
    with pytest.raises(DeviceError, match="halves"):  # float32: the hint that a 16-bit type halves it
        check_fits(cfg, cuda, torch.float32, tokens=2048, weights_loaded=True, memory=_memory(free))


def test_check_fits_reads_no_gpu_for_a_cpu_load():
    """Device: the CPU, which is not checked (the memory reading is never called)."""
    from tracer.api import check_fits

    def unread(device):
        raise AssertionError("a CPU load read GPU memory")

    check_fits(_llama2_7b(), torch.device("cpu"), torch.float32, tokens=4096, memory=unread)
