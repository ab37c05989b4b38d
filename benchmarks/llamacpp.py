"""llama.cpp on the same checkpoint: the optional ``--with-llamacpp`` column of benchmarks.speed.

llama.cpp is the CPU engine people pick instead of transformers. PyPI's ``llama-cpp-python`` builds
it from source (``pip install -e .[llamacpp]``: about ten minutes on two cores, with cmake and a C++
compiler); ``gguf`` writes its file format. To time it on the very weights the other columns use,
the checkpoint's safetensors are written once to a GGUF file in the run's dtype (float16 or
float32) in the benchmark's cache folder. The file has no tokenizer (``no_vocab``): the benchmark feeds token ids, as everywhere.

What the conversion must get right, so that llama.cpp computes the same function as ours:
- q and k projections are re-ordered. HF's RoPE rotates the pairs (i, i + d/2) of each head, while
  llama.cpp's rotates neighbours (2i, 2i + 1); within each head, output row ``h*d + j*d/2 + i``
  (half j, index i) moves to ``h*d + 2i + j``;
- Llama 3.1's frequency-dependent RoPE scaling goes in as a ``rope_freqs`` tensor of per-frequency
  divisors (unscaled / scaled inverse frequency);
- tied embeddings: no ``output.weight``, and llama.cpp uses ``token_embd.weight`` for the logits.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from tracer.config import LlamaConfig
from tracer.model import rope_inv_freq

INSTALL = "pip install -e .[llamacpp] (llama-cpp-python and gguf; builds llama.cpp: cmake and a C++ compiler, ~10 min)"

# HF tensor name (after "model.layers.{i}.") -> GGUF tensor name (after "blk.{i}.").
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def available() -> str | None:
    """None when llama_cpp and gguf import, else what to install."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: {INSTALL}"
    return None


def rope_pairs_to_neighbours(w: np.ndarray, heads: int) -> np.ndarray:
    """Re-order a q/k projection's rows from HF's half-split RoPE layout to llama.cpp's interleaved one."""
    out, cols = w.shape
    d = out // heads
    return w.reshape(heads, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor name."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in LAYER_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"


GGUF_TYPES = {"float16": np.float16, "float32": np.float32}  # numpy has no bfloat16


def is_fresh(out: Path, *inputs: Path) -> bool:
    """Whether ``out`` exists and is no older than any of ``inputs`` (a cached conversion)."""
    return out.is_file() and all(out.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def write_gguf(folder: Path, cfg: LlamaConfig, out: Path, dtype: str = "float16") -> Path:
    """The checkpoint in ``folder`` as a GGUF file at ``out`` with matrices in ``dtype`` (reused
    while newer than the checkpoint's config.json and than this converter)."""
    import gguf
    from safetensors import safe_open

    if dtype not in GGUF_TYPES:
        raise ValueError(f"llama.cpp comparison: dtype must be one of {list(GGUF_TYPES)}, got {dtype!r}")
    if is_fresh(out, folder / "config.json", Path(__file__)):
        return out
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tmp = out.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
    if cfg.rope.rope_type == "llama3":
        plain = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default"))
        w.add_tensor("rope_freqs.weight", (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy().astype(np.float32))
    elif cfg.rope.rope_type != "default":
        raise ValueError(f"rope_type {cfg.rope.rope_type!r} is not converted for llama.cpp here")
    for file in files:
        with safe_open(str(folder / file), framework="np") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name.endswith("q_proj.weight"):
                    t = rope_pairs_to_neighbours(t, cfg.num_attention_heads)
                elif name.endswith("k_proj.weight"):
                    t = rope_pairs_to_neighbours(t, cfg.num_key_value_heads)
                # Norm weights stay float32, as llama.cpp's own converter keeps 1-D tensors.
                w.add_tensor(gguf_name(name), t.astype(np.float32 if t.ndim == 1 else GGUF_TYPES[dtype]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


class LlamaCppRunner:
    """Greedy decode with llama.cpp from token ids, as the other columns decode."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.load_seconds = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """``n`` new tokens, each the argmax of the last position's logits (no sampler chain)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for i in range(n):
            # The last position's logits, read in place (Llama keeps no copy unless logits_all).
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
            token = int(np.argmax(logits))
            out.append(token)
            if i + 1 < n:
                self.llm.eval([token])
        return out


def runner(folder: Path, cfg: LlamaConfig, gguf_path: Path, dtype: str, threads: int, n_ctx: int) -> LlamaCppRunner:
    """Convert the checkpoint to ``gguf_path`` in ``dtype`` (once) and load it in llama.cpp."""
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    path = write_gguf(folder, cfg, gguf_path, dtype)
    return LlamaCppRunner(path, threads or torch.get_num_threads(), n_ctx)
