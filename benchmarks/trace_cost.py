"""What tracing costs: decode tokens/s with capture off / light / full, and the trace's size on disk.

    python -m benchmarks.trace_cost [--model PATH] [--tokens 128] [--repeats 5] [--out results.json]

Runs on the embedded model (CPU, float32) unless told otherwise. The three policies are timed in
turn, round after round, so that a machine whose speed drifts affects them alike; medians are
reported, with per-round ratios (each pair ran seconds apart). "bare" is a decode loop with no
Decoder, no sampling stages and no hooks — the runtime with the tracing code taken away — so
"off / bare" shows what the tracing code costs when off; "bare_again / bare" (the same loop twice)
shows how much two identical runs differ on this machine: the noise that "off" is judged against.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tracer
from tracer.train_tiny.pipeline import cpu_model

FULL_POINTS = ("blocks.0.attn.pattern", "blocks.*.resid_post", "logits")
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def bare_decode(llm, prompt_ids: list[int], n: int) -> None:
    """Prefill + n-1 greedy decode steps straight on the model (what 'no tracing code' means)."""
    model = llm.model
    with torch.inference_mode():
        cache = model.new_cache(len(prompt_ids) + n)
        logits = model(torch.tensor([prompt_ids]), cache, last_only=True)[0, -1]
        for _ in range(n - 1):
            token = torch.argmax(logits)
            logits = model(token.view(1, 1), cache, last_only=True)[0, -1]
        int(torch.argmax(logits))


def decode(llm, prompt_ids: list[int], n: int, capture: str):
    kw = {"points": FULL_POINTS} if capture == "full" else {}
    dec = llm.decoder(prompt_ids, max_new_tokens=n, do_sample=False, capture=capture, **kw)
    dec.eos_ids = ()  # exactly n tokens for every policy
    dec.run()
    return llm.finish(dec)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trace_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="folder or repo id (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    llm = tracer.load(args.model, device="cpu", dtype="float32", progress=False)
    prompt = llm.tokenizer.encode(PROMPT)
    n = min(args.tokens, llm.config.max_position_embeddings - len(prompt))
    runs = {
        "bare": lambda: bare_decode(llm, prompt, n),
        # The same bare loop again: bare_again/bare shows how far two identical runs differ here,
        # the yardstick for "within noise".
        "bare_again": lambda: bare_decode(llm, prompt, n),
        "off": lambda: decode(llm, prompt, n, "off"),
        "light": lambda: decode(llm, prompt, n, "light"),
        "full": lambda: decode(llm, prompt, n, "full"),
    }
    for fn in runs.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(args.repeats):
        # A new order every round (seeded): a run's place in the round (after a full trace that
        # filled memory, say) must not favour or burden one policy.
        shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - t0)
    tok_s = {k: [n / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    pairs = {"bare_again/bare": ("bare_again", "bare"), "off/bare": ("off", "bare"),
             "light/off": ("light", "off"), "full/off": ("full", "off")}
    # Per-round ratios: both runs of a pair ran seconds apart, so drift in machine speed cancels.
    per_round = {k: sorted(a / b for a, b in zip(tok_s[x], tok_s[y])) for k, (x, y) in pairs.items()}

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for capture in ("light", "full"):
            gen = decode(llm, prompt, n, capture)
            sizes[capture] = dir_bytes(gen.trace.save(Path(tmp) / capture))
        long_n = min(512, llm.config.max_position_embeddings - len(prompt))
        gen = decode(llm, prompt, long_n, "light")
        sizes[f"light_{long_n}_tokens"] = dir_bytes(gen.trace.save(Path(tmp) / "long"))

    result = {
        "model": str(llm.resolved.source),
        "device": "cpu",
        "dtype": "float32",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "new_tokens": n,
        "repeats": args.repeats,
        "full_points": list(FULL_POINTS),
        "tokens_per_s": tok_s,
        "median_tokens_per_s": med,
        "ratios": {k: med[x] / med[y] for k, (x, y) in pairs.items()},
        "per_round_ratios": per_round,
        "per_round_ratio_medians": {k: statistics.median(v) for k, v in per_round.items()},
        "trace_bytes_on_disk": sizes,
    }
    print(f"{n} new tokens, {args.repeats} rounds, median tokens/s:")
    for k, v in med.items():
        print(f"  {k:6s} {v:8.1f}   (all: {', '.join(f'{x:.1f}' for x in tok_s[k])})")
    print("ratios: of medians | median of per-round ratios [lowest, highest per-round]")
    for k, v in result["ratios"].items():
        r = per_round[k]
        print(f"  {k:16s} {v:.3f} | {statistics.median(r):.3f} [{r[0]:.3f}, {r[-1]:.3f}]")
    for k, v in sizes.items():
        print(f"  trace on disk, {k}: {v / 1e6:.2f} MB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
