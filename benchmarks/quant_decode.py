"""Quantized decode on the CPU, ours against llama.cpp on the very same GGUF file.

    python -m benchmarks.quant_decode --shape llama-1b --types Q8_0 Q4_0 \\
        --out benchmarks/results/quant/cpu-llama-1b-quant-decode.json
    python -m benchmarks.quant_decode --shape llama2-7b --types Q4_K_M --tokens 16 \\
        --out benchmarks/results/quant/cpu-llama2-7b-q4_k_m.json

For each type a GGUF of the shape's random weights is written once into the cache folder (the same
seed for every type, so Q8_0 and Q4_0 round the same weights; Q4_K_M, which gguf.quants cannot
make, is llama.cpp's mix of random Q4_K/Q6_K blocks with sane scales: benchmarks.gguf_writer).
Each engine then runs in a fresh process, the two alternating ``--rounds`` times:

- ours: ``tracer.load(path)`` (the default keeps the blocks on the CPU), greedy decode with capture
  "off" and with capture "light" (the trace's overhead on this path);
- llama.cpp (``pip install -e .[llamacpp]``, built from PyPI's sdist): the same prompt ids, greedy.

Each reports load to first token (load + the 16-token prompt's prefill + one token), decode
tokens/s (``--tokens`` steps after the first new token, best of two), and peak resident memory
above the process's baseline after its imports (VmHWM, reset after them). Both use ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .machine import cpu_model

GOALS = {"Q8_0": 1.0, "Q4_0": 0.8}  # ours / llama.cpp decode tokens/s at least (1B shapes)
GOAL_LIGHT = 0.9  # light capture's decode within 10% of capture off
GOAL_RSS_OVER_FILE = 500 * 1000**2  # peak RSS above baseline <= file size + 500 MB (7B Q4_K_M)
PROMPT = list(range(300, 316))  # 16 ids of the stand-in vocabulary


def gguf_path(shape: str, qtype: str, cache: Path) -> Path:
    """The cached random GGUF of ``shape`` in ``qtype`` (written the first time)."""
    from .gguf_load import standin_vocabulary
    from .gguf_writer import MIXES, write_random_gguf, write_random_mixed_gguf
    from .speed import SHAPES

    cfg = SHAPES[shape]
    path = cache / f"{shape}-{qtype}.gguf"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        vocab = standin_vocabulary(cfg.vocab_size)
        t0 = time.perf_counter()
        if qtype in MIXES:
            write_random_mixed_gguf(path, cfg, mix=qtype, tokenizer=vocab, name=f"random-{shape}")
        else:
            write_random_gguf(path, cfg, qtype=qtype, tokenizer=vocab, name=f"random-{shape}")
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# --- one engine in a fresh process ------------------------------------------------------------------


def peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def ours_rate(llm, n: int, capture: str) -> float:
    """Decode tokens/s of ``n`` steps after the prefill and first token (the Decoder, greedy)."""
    dec = llm.decoder(PROMPT, max_new_tokens=n + 1, do_sample=False, capture=capture)
    dec.step()  # the prefill and the first new token
    t0 = time.perf_counter()
    dec.run(n)
    seconds = time.perf_counter() - t0
    assert len(dec.new_ids) == n + 1, (len(dec.new_ids), dec.finish_reason)
    return n / seconds


def ours(path: str, n: int, threads: int) -> dict:
    import torch

    import tracer
    from tracer import kernels

    torch.set_num_threads(threads)
    kernels.library()  # built or loaded before the baseline, as any load does
    reset, base = peak_reset(), status_bytes("VmRSS")
    t0 = time.perf_counter()
    llm = tracer.load(path, device="cpu", progress=False)
    llm.generate(PROMPT, max_new_tokens=1, do_sample=False, capture="off")
    first = time.perf_counter() - t0
    rates: dict[str, list[float]] = {"off": [], "light": []}
    for _ in range(2):  # alternating, best of two each
        for capture in rates:
            rates[capture].append(ours_rate(llm, n, capture))
    peak = status_bytes("VmHWM" if reset else "VmRSS") - base
    return {"load_to_first_token_s": first, "decode_tok_s": max(rates["off"]),
            "decode_light_tok_s": max(rates["light"]), "peak_rss_above_baseline_bytes": peak,
            "paths": sorted(set(llm.load_trace.meta.get("quantized", {}).values())),
            "matvec": llm.load_trace.meta["matvec"]}


def llamacpp(path: str, n: int, threads: int) -> dict:
    from .llamacpp import LlamaCppRunner

    reset, base = peak_reset(), status_bytes("VmRSS")
    t0 = time.perf_counter()
    runner = LlamaCppRunner(Path(path), threads, n_ctx=len(PROMPT) + n + 8)
    runner.generate(PROMPT, 1)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(2):
        runner.generate(PROMPT, n + 1)
        rates.append(n / runner.decode_seconds)
    peak = status_bytes("VmHWM" if reset else "VmRSS") - base
    return {"load_to_first_token_s": first, "decode_tok_s": max(rates), "peak_rss_above_baseline_bytes": peak}


def run_child(engine: str, path: Path, n: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.quant_decode", "--child", engine, "--file", str(path),
           "--tokens", str(n), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{engine} on {path.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


# --- the comparison --------------------------------------------------------------------------------


def compare(path: Path, qtype: str, args) -> dict:
    """Both engines on ``path``, alternating ``args.rounds`` times; medians and the goals."""
    runs: dict[str, list[dict]] = {"ours": [], "llama.cpp": []}
    engines = ["ours"] + (["llama.cpp"] if not args.no_llamacpp else [])
    for r in range(args.rounds):
        for engine in engines if r % 2 == 0 else engines[::-1]:
            res = run_child(engine, path, args.tokens, args.threads)
            runs[engine].append(res)
            print(f"  {qtype} {engine:9s} decode {res['decode_tok_s']:6.2f} tok/s, first token "
                  f"{res['load_to_first_token_s']:5.2f} s, peak {res['peak_rss_above_baseline_bytes'] / 1e6:6.0f} MB",
                  flush=True)
    med = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for e, rs in runs.items() if rs}
    out = {"file": str(path), "file_bytes": path.stat().st_size, "runs": runs, "median": med}
    o = med["ours"]
    out["light_over_off"] = o["decode_light_tok_s"] / o["decode_tok_s"]
    goals = {"light_within_10pct": out["light_over_off"] >= GOAL_LIGHT}
    if "llama.cpp" in med:
        out["ours_over_llamacpp"] = o["decode_tok_s"] / med["llama.cpp"]["decode_tok_s"]
        if qtype in GOALS:
            goals[f"ours_over_llamacpp_at_least_{GOALS[qtype]}"] = out["ours_over_llamacpp"] >= GOALS[qtype]
    if qtype == "Q4_K_M":
        over = max(r["peak_rss_above_baseline_bytes"] for r in runs["ours"]) - out["file_bytes"]
        out["ours_peak_rss_over_file_bytes"] = over
        goals["peak_rss_at_most_file_plus_500MB"] = over <= GOAL_RSS_OVER_FILE
    out["goals"] = goals
    return out


def machine(threads: int) -> dict:
    import torch

    from .speed import cpu_simd

    return {"cpu_model": cpu_model(), "cpu_simd": cpu_simd(), "cores": os.cpu_count(), "threads": threads,
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", help="benchmarks.speed.SHAPES: llama-1b or llama2-7b")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0"], help="matrix types (or Q4_K_M)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per engine, alternating")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llama-tracer-bench"))
    ap.add_argument("--no-llamacpp", action="store_true", help="ours only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = ours if args.child == "ours" else llamacpp
        print("RESULT " + json.dumps(fn(args.file, args.tokens, args.threads)), flush=True)
        return
    from .speed import llamacpp_version

    if not args.no_llamacpp:
        from .llamacpp import available

        if (missing := available()) is not None:
            raise SystemExit(f"llama.cpp comparison: {missing} (or pass --no-llamacpp)")
    result = {"benchmark": "llama-tracer quantized decode vs llama.cpp (benchmarks/quant_decode.py)",
              "shape": args.shape, "machine": machine(args.threads), "tokens": args.tokens,
              "prompt_tokens": len(PROMPT), "llama_cpp": None if args.no_llamacpp else llamacpp_version(),
              "types": {}}
    for qtype in args.types:
        result["types"][qtype] = compare(gguf_path(args.shape, qtype, Path(args.cache)), qtype, args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    for qtype, r in result["types"].items():
        print(f"{qtype}: ours/llama.cpp {r.get('ours_over_llamacpp', float('nan')):.2f}, "
              f"light/off {r['light_over_off']:.3f}, goals {r['goals']}")


if __name__ == "__main__":
    main()
