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

import json
import time
from pathlib import Path

import numpy as np
import torch

from tracer.config import LlamaConfig

from . import gguf_writer
from .gguf_writer import LAYER_NAMES, TOP_NAMES, gguf_name, rope_pairs_to_neighbours  # noqa: F401 - re-exported

INSTALL = "pip install -e .[llamacpp] (llama-cpp-python and gguf; builds llama.cpp: cmake and a C++ compiler, ~10 min)"


def available() -> str | None:
    """None when llama_cpp and gguf import, else what to install."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: {INSTALL}"
    return None


GGUF_TYPES = {"float16": "F16", "float32": "F32"}  # run dtype -> ggml type of the matrices


def is_fresh(out: Path, *inputs: Path) -> bool:
    """Whether ``out`` exists and is no older than any of ``inputs`` (a cached conversion)."""
    return out.is_file() and all(out.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def checkpoint_tensors(folder: Path):
    """``(name, array)`` for every tensor of the safetensors checkpoint in ``folder``, one file open at a time."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for file in files:
        with safe_open(str(folder / file), framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def write_gguf(folder: Path, cfg: LlamaConfig, out: Path, dtype: str = "float16") -> Path:
    """The checkpoint in ``folder`` as a GGUF file at ``out`` with matrices in ``dtype`` (reused
    while newer than the checkpoint's config.json and than this converter)."""
    if dtype not in GGUF_TYPES:
        raise ValueError(f"llama.cpp comparison: dtype must be one of {list(GGUF_TYPES)}, got {dtype!r}")
    if is_fresh(out, folder / "config.json", Path(__file__), Path(gguf_writer.__file__)):
        return out
    # Norm weights stay float32, as llama.cpp's own converter keeps 1-D tensors (gguf_writer does).
    return gguf_writer.write_llama_gguf(out, cfg, checkpoint_tensors(folder), qtype=GGUF_TYPES[dtype],
                                        tokenizer={"tokenizer.ggml.model": "no_vocab"}, name=folder.name)


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
        """``n`` new tokens, each the argmax of the last position's logits (no sampler chain).
        :attr:`decode_seconds`: the time after the first new token (the decode steps alone)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for i in range(n):
            if i == 1:
                started = time.perf_counter()
            # The last position's logits, read in place (Llama keeps no copy unless logits_all).
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
            token = int(np.argmax(logits))
            out.append(token)
            if i + 1 < n:
                self.llm.eval([token])
        self.decode_seconds = time.perf_counter() - started if n > 1 else 0.0
        return out


def runner(folder: Path, cfg: LlamaConfig, gguf_path: Path, dtype: str, threads: int, n_ctx: int) -> LlamaCppRunner:
    """Convert the checkpoint to ``gguf_path`` in ``dtype`` (once) and load it in llama.cpp."""
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    path = write_gguf(folder, cfg, gguf_path, dtype)
    return LlamaCppRunner(path, threads or torch.get_num_threads(), n_ctx)
