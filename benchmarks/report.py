"""Render the results section of benchmarks/README.md from the JSON files in benchmarks/results/.

    python -m benchmarks.report          # print the section
    python -m benchmarks.report --write  # replace it in benchmarks/README.md

The README quotes the committed JSON, never hand-copied numbers; tests/test_benchmarks.py fails
when the two drift apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .decode_attention import table as attention_table
from .speed import table

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

TITLES = {
    "embedded": "Embedded model",
    "llama-1b": "Llama-3.2-1B shapes (random weights)",
    "llama2-7b": "Llama-2-7B shapes (random weights)",
}


def speed_section(path: Path) -> str:
    r = json.loads(path.read_text())
    m = r["machine"]
    threads = m["torch_threads"]
    title = f"{TITLES.get(r['model']['name'], r['model']['name'])}, {r['dtype']}, {m['device']}, " \
            f"{threads} thread{'s' if threads != 1 else ''}"
    agree = r["decode"]["greedy_tokens_agree_with_transformers"]
    lines = [
        f"### {title}: `results/{path.name}`",
        "",
        f"Measured {r.get('date', '?')}. Greedy tokens equal to transformers' for the first "
        f"{agree['leading_equal']} of {agree['of']}; all our variants identical: "
        f"{agree['ours_variants_identical']}."
        + (f" Compile time (once): {r['compile_seconds']:.0f} s." if "compile_seconds" in r else ""),
        "",
        table(r),
    ]
    return "\n".join(lines)


def trace_cost_section(path: Path) -> str:
    r = json.loads(path.read_text())
    timings = {"per run (whole runs in a shuffled order)": r}
    if "lockstep" in r:
        timings["lockstep (the runs advance a token each in turn)"] = r["lockstep"]
    # The model is the embedded one or a checkpoint folder that benchmarks.speed wrote (NAME-float16).
    name = Path(r["model"]).name.removesuffix("-float16")
    embedded = name == "embedded"
    command = "python -m benchmarks.trace_cost" + ("" if embedded else f" --model {r['model']}")
    command += "" if r["dtype"] == "float32" else f" --dtype {r['dtype']}"
    command += "" if r["new_tokens"] == 128 else f" --tokens {r['new_tokens']}"
    lines = [
        f"### Cost of tracing, {'embedded model' if embedded else TITLES.get(name, name)}, {r['dtype']}, {r['threads']} threads: `results/{path.name}`",
        "",
        f"`{command} --repeats {r['repeats']}`: {r['new_tokens']} new tokens, "
        f"{r['repeats']} rounds of each timing; full keeps {', '.join(r['full_points'])}.",
        "",
        "| run | " + " | ".join(f"tok/s (median), {t.split(' (')[0]}" for t in timings) + " |",
        "|---|" + "---|" * len(timings),
        *[f"| {k} | " + " | ".join(f"{t['median_tokens_per_s'][k]:.1f}" for t in timings.values()) + " |"
          for k in r["median_tokens_per_s"]],
    ]
    for title, t in timings.items():
        lines += [
            "",
            f"Ratios, {title}:",
            "",
            "| ratio | of medians | median per round | lowest, highest per round |",
            "|---|---|---|---|",
        ]
        for k, v in t["ratios"].items():
            rounds = t["per_round_ratios"][k]
            lines.append(f"| {k} | {v:.3f} | {t['per_round_ratio_medians'][k]:.3f} | {rounds[0]:.3f}, {rounds[-1]:.3f} |")
    sizes = r["trace_bytes_on_disk"]
    lines += ["", "Trace size on disk: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + "."]
    if "goals" in r:
        lines += ["", "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["goals"].items()) + "."]
    return "\n".join(lines)


def attention_section(path: Path) -> str:
    r = json.loads(path.read_text())
    m = r["machine"]
    title = f"{TITLES.get(r['model']['name'], r['model']['name'])}, {r['dtype']}, {m['device']}, {m['torch_threads']} threads"
    return "\n".join([
        f"### Decode attention in the compiled step, {title}: `results/{path.name}`",
        "",
        f"Measured {r['date']}. `python -m benchmarks.decode_attention --model {r['model']['name']} "
        f"--dtype {r['dtype']}`: {r['repeats']} steps of each, alternating. torch = the fused loops over every "
        "slot; kernel = `tracer/kernels/attend.c` over the slots written. The model uses the kernel from "
        "`tracer.attend.MIN_KEYS` key elements per layer.",
        "",
        attention_table(r),
    ])


def render() -> str:
    parts = []
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        if "trace_bytes_on_disk" in r:
            parts.append(trace_cost_section(path))
        elif r.get("benchmark", "").startswith("llama-tracer decode attention"):
            parts.append(attention_section(path))
        else:
            parts.append(speed_section(path))
    return "\n\n".join(parts)


def updated_readme() -> str:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{render()}\n\n{END}{tail}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in benchmarks/README.md")
    args = ap.parse_args(argv)
    if args.write:
        README.write_text(updated_readme())
    else:
        print(render())


if __name__ == "__main__":
    main()
