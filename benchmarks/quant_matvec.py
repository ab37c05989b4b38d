"""One-row products (batch-1 decode) straight from GGUF blocks, against the float16 kernel and torch.

    python -m benchmarks.quant_matvec --out artifacts/quant-matvec.json
    python -m benchmarks.quant_matvec --layers 2 --repeats 3      # a quick look

One pass is what a Llama-3.2-1B decode step multiplies: for each of ``--layers`` layers (16 in
the model) q and o (2048 x 2048), k and v (512 x 2048), gate and up (8192 x 2048), down
(2048 x 8192), then the output layer (128256 x 2048), every matrix its own memory, in model order,
so that the weights stream from memory as in a real step and not from the cache (this VM reports
a 480 MB L3). Each format is its own set of matrices: ``Q8_0`` ... ``Q6_K`` (``quant.c``, random
blocks with sane float16 scales; ``Q4_0/avx2`` forces a path, see ``Library.quant_paths``, else
"auto"), ``f16_kernel`` (``matvec.c``, float16 weights and activations, our float16 decode),
``f32_torch`` (``F.linear`` on float32 weights). The figures: median over
``--repeats`` passes of the pass and of each shape's products, and the weight bytes read per
second. Formats run one after another (one set in memory at a time), so a drift in the machine's
load hits them unequally: compare within a run, on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tracer import kernels
from tracer.quant import TYPES, BlockType

from .machine import cpu_model

HIDDEN, FFN, KV, VOCAB, LAYERS = 2048, 8192, 512, 128256, 16
# (name, rows, columns) of one layer's matrices, in the order a step multiplies them.
LAYER_SHAPES = [("q", HIDDEN, HIDDEN), ("k", KV, HIDDEN), ("v", KV, HIDDEN), ("o", HIDDEN, HIDDEN),
                ("gate", FFN, HIDDEN), ("up", FFN, HIDDEN), ("down", HIDDEN, FFN)]
OUTPUT = ("output", VOCAB, HIDDEN)


def random_blocks(t: BlockType, rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """uint8 [rows, bytes per row] of random ``t`` blocks: random codes, float16 scales and minimums
    in [0.001, 0.01) (random bytes there could be inf or NaN)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * columns // t.block, t.bytes), dtype=np.uint8)
    for at in t.halves:
        raw[:, at : at + 2] = rng.uniform(1e-3, 1e-2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


def _shapes(layers: int) -> list[tuple[str, int, int]]:
    return [s for _ in range(layers) for s in LAYER_SHAPES] + [OUTPUT]


def _weights(fmt: str, layers: int) -> list[torch.Tensor]:
    """One pass's matrices in ``fmt``: one random template per shape, cloned per layer (each
    layer's matrix its own memory: caches do not share equal bytes)."""
    templates, kind = {}, fmt.split("/")[0]
    for name, rows, cols in set(LAYER_SHAPES + [OUTPUT]):
        if kind in TYPES:
            templates[name] = random_blocks(TYPES[kind], rows, cols)
        else:
            dtype = torch.float16 if fmt == "f16_kernel" else torch.float32
            templates[name] = (torch.randn(rows, cols) * 0.02).to(dtype)
    return [templates[name].clone() for name, _, _ in _shapes(layers)]


def _product(fmt: str, lib: kernels.Library):
    """(x for a row of ``columns``, then the call that multiplies it by one matrix) for ``fmt``."""
    kind, _, path = fmt.partition("/")
    if kind in TYPES:
        type_id = TYPES[kind].type_id
        return lambda x, w, out: lib.quant_matvec(type_id, w, x, out, path or "auto")
    if fmt == "f16_kernel":
        return lambda x, w, out: lib.run(x, w, out)
    return lambda x, w, out: F.linear(x.view(1, -1), w)


def time_format(fmt: str, layers: int, repeats: int, lib: kernels.Library) -> dict:
    """Median seconds per pass and per shape, and bytes per pass, of ``fmt``'s products."""
    weights = _weights(fmt, layers)
    shapes = _shapes(layers)
    dtype = torch.float16 if fmt == "f16_kernel" else torch.float32
    xs = {cols: torch.randn(cols).to(dtype) for _, _, cols in shapes}
    outs = [torch.empty(rows, dtype=dtype) for _, rows, _ in shapes]
    product = _product(fmt, lib)
    passes, by_shape = [], {name: [] for name, _, _ in LAYER_SHAPES + [OUTPUT]}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up (page faults, thread team)
            spent = dict.fromkeys(by_shape, 0.0)
            start = time.perf_counter()
            for (name, _, cols), w, out in zip(shapes, weights, outs):
                t0 = time.perf_counter()
                product(xs[cols], w, out)
                spent[name] += time.perf_counter() - t0
            passes.append(time.perf_counter() - start)
            for name, s in spent.items():
                by_shape[name].append(s)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    ms = statistics.median(passes[1:]) * 1e3
    return {
        "ms_per_pass": ms,
        "ms_per_pass_all": [p * 1e3 for p in passes[1:]],
        "ms_by_shape": {name: statistics.median(v[1:]) * 1e3 for name, v in by_shape.items()},
        "weight_bytes_per_pass": nbytes,
        "GBps": nbytes / ms / 1e6,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers per pass (Llama-3.2-1B: 16)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--formats", nargs="*", default=None,
                        help="Q8_0 ... Q6_K (NAME/PATH forces a kernel path: Q4_0/avx2), f16_kernel, f32_torch; "
                        "default: each quantized type on the best path (and on AVX2 where AVX-512 is the best), "
                        "then f16_kernel and f32_torch")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = kernels.library()
    if not lib.available:
        parser.error(f"no kernel: {lib.reason}")
    if args.formats is None:
        forced = [f"{name}/avx2" for name in TYPES] if "avx512" in lib.quant_paths else []
        args.formats = [*TYPES, *forced, "f16_kernel", "f32_torch"]
    result = {
        "benchmark": "quant_matvec",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "kernel_paths": list(lib.quant_paths),
        "load_average_before": os.getloadavg(),  # other processes' share of the cores
        "layers": args.layers,
        "repeats": args.repeats,
        "formats": {},
    }
    for fmt in args.formats:
        r = result["formats"][fmt] = time_format(fmt, args.layers, args.repeats, lib)
        print(f"{fmt:>10}: {r['ms_per_pass']:8.1f} ms per pass, {r['weight_bytes_per_pass'] / 1e6:7.0f} MB, "
              f"{r['GBps']:5.1f} GB/s   " + " ".join(f"{k} {v:.2f}" for k, v in r["ms_by_shape"].items()),
              flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
