"""Decode attention in the compiled step: torch.compile's loops over every cache slot vs the kernel.

    python -m benchmarks.decode_attention [--model llama-1b] [--slots 256 2048 8192] [--repeats 40]
                                          [--out results.json]

The compiled decode step (``tracer.fast.StaticStep``) has fixed shapes: its KV cache is a bucket of
256-slot multiples, and attention spans the whole bucket with the unwritten slots masked. On the
CPU the step can run that attention on ``tracer/kernels/attend.c`` instead, which reads only the
slots written so far. For each cache size this builds two compiled steps of the same model, one
per attention (``tracer.attend.masked``, ``tracer.attend.OnKernel``), and times them in alternation, step by step, at
positions in the bucket's second half (a generation that has filled half of its bucket or more).
Reported: median ms per step of each, their ratio, and the median of the per-pair differences
(the pair's steps are milliseconds apart, so drift in machine speed cancels).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import tracer
from tracer import attend, fast, kernels
from tracer.fast import StaticStep

from .machine import cpu_model
from .speed import DTYPES, cpu_simd, log, model_folder, write_results


def measure(model, slots: int, repeats: int) -> dict:
    """Median ms per compiled step with torch's attention and with the kernel's, at ``slots``."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    cache = model.new_cache(slots)
    token = torch.tensor([[5]])
    positions = [slots // 2 + i * (slots // 2) // repeats for i in range(repeats)]
    # The kernel whatever the cache size (min_keys=0: the step's own threshold, attend.MIN_KEYS,
    # comes from here). Two lambda expressions: two code objects, so two compiled graphs.
    masked = StaticStep(model, attention=attend.masked)
    on_kernel = StaticStep(model, attention=attend.OnKernel(kernels.library().limits, min_keys=0))
    fns = {"torch": lambda *a: masked(*a), "kernel": lambda *a: on_kernel(*a)}
    steps = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            step = torch.compile(fn, dynamic=False, options=options)
            step(token, torch.tensor([positions[0]]), cache)  # compiles
            steps[name] = step
        times = {name: [] for name in steps}
        for p in positions:
            position = torch.tensor([p])
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(token, position, cache)
                times[name].append(time.perf_counter() - t0)
    med = {name: 1000 * statistics.median(ts) for name, ts in times.items()}
    diffs = [1000 * (a - b) for a, b in zip(times["torch"], times["kernel"])]
    return {
        "slots": slots, "positions": [positions[0], positions[-1]],
        "ms_per_step": med, "ms_per_step_all": {n: [1000 * t for t in ts] for n, ts in times.items()},
        "torch_over_kernel": med["torch"] / med["kernel"],
        "paired_saving_ms_median": statistics.median(diffs),
    }


def table(r: dict) -> str:
    rows = ["| cache slots | positions | torch attention ms/step | kernel ms/step | torch / kernel | paired saving ms |",
            "|---|---|---|---|---|---|"]
    for m in r["sizes"]:
        rows.append(f"| {m['slots']} | {m['positions'][0]}-{m['positions'][1]} | {m['ms_per_step']['torch']:.1f} "
                    f"| {m['ms_per_step']['kernel']:.1f} | {m['torch_over_kernel']:.2f}x | {m['paired_saving_ms_median']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b", help="embedded or a speed.py shape (default llama-1b)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--slots", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=40, help="timed steps per variant and cache size")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    if any(s % 256 for s in args.slots):
        ap.error(f"--slots must be multiples of 256 (the compiled step's buckets), got {args.slots}")
    folder, note = model_folder(args.model, log)
    llm = tracer.load(folder, device="cpu", dtype=args.dtype, progress=False)
    if fast.use_kernels(llm.model, "auto") != "kernel":
        raise SystemExit(f"no CPU kernel here: {kernels.library().reason}")
    cfg = llm.config
    result = {
        "benchmark": "llama-tracer decode attention (benchmarks/decode_attention.py)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"device": "cpu", "cpu_model": cpu_model(), "cpu_simd": cpu_simd(), "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": {"name": args.model, "note": note, "layers": cfg.num_hidden_layers,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
        "dtype": args.dtype, "repeats": args.repeats, "sizes": [],
    }
    for slots in args.slots:
        log(f"{slots} slots ...")
        result["sizes"].append(measure(llm.model, slots, args.repeats))
    print(table(result))
    if args.out:
        write_results(result, args.out)


if __name__ == "__main__":
    main()
