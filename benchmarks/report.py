"""Render the results in both READMEs from the JSON files in benchmarks/results/.

    python -m benchmarks.report          # print benchmarks/README.md's results section
    python -m benchmarks.report --write  # replace it there, and the speed summary in README.md

The READMEs quote the committed JSON, never hand-copied numbers; tests/test_benchmarks.py fails
when they drift apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .decode_attention import table as attention_table
from .speed import cpu_label, table

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TOP_README = HERE.parent / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- speed-summary:begin -->", "<!-- speed-summary:end -->"

TITLES = {
    "embedded": "Embedded model",
    "smollm2": "SmolLM2-135M-Instruct (the real model)",
    "llama-1b": "Llama-3.2-1B shapes (random weights)",
    "llama2-7b": "Llama-2-7B shapes (random weights)",
}
SHORT_NAMES = {"embedded": "embedded", "smollm2": "SmolLM2-Instruct, real weights", "llama-1b": "Llama-3.2-1B shapes",
               "llama2-7b": "Llama-2-7B shapes"}


def speed_section(path: Path) -> str:
    r = json.loads(path.read_text())
    m = r["machine"]
    threads = m["torch_threads"]
    title = f"{TITLES.get(r['model']['name'], r['model']['name'])}, {r['dtype']}, {m['device']}, " \
            f"{threads} thread{'s' if threads != 1 else ''} ({cpu_label(m)})"
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
        f"### Cost of tracing, {'embedded model' if embedded else TITLES.get(name, name)}, {r['dtype']}, "
        f"{r['threads']} threads ({cpu_label(r)}): `results/{path.name}`",
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
    title += f" ({cpu_label(m)})"
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


def gguf_load_line(path: Path, r: dict) -> str:
    """One sentence on a ``benchmarks.gguf_load`` file: the real model against transformers' GGUF
    reader, or a big random GGUF loaded with dtype="auto"."""
    mb = 1e6
    if "speedup" in r:
        med, g = r["median_seconds"], r["goals"]
        return (f"`{path.name}` ({r['model']}, {r['dtype']}, {len(r['runs']['ours'])} loads each, "
                f"{cpu_label(r['machine'])}): load to first logits {med['ours']:.2f} s vs transformers' "
                f"`from_pretrained(gguf_file=...)` + tokenizer {med['transformers']:.2f} s "
                f"({r['speedup']:.1f}x); peak RSS {r['ours_peak_rss_above_baseline_bytes'] / mb:.0f} MB above "
                f"baseline for a {r['ours_param_bytes'] / mb:.0f} MB model (+{g['peak_overhead_bytes'] / mb:.0f} MB)")
    ld = r["load"]
    return (f"`{path.name}` ({r['model']}, a {r['file_bytes'] / 1e9:.2f} GB file, {cpu_label(r['machine'])}, "
            f"{r['machine']['memory_bytes'] / 1e9:.0f} GB RAM): dtype=\"auto\" chose {ld['dtype']}; first logits "
            f"after {ld['seconds_to_first_logits']:.0f} s; peak RSS {ld['peak_rss_above_baseline_bytes'] / 1e9:.2f} GB "
            f"above baseline ({ld['param_bytes'] / 1e9:.2f} GB of weights)")


def gguf_load_section(path: Path) -> str:
    r = json.loads(path.read_text())
    kind = "the real model against transformers" if "speedup" in r else "a 7B-shape file, dtype=\"auto\""
    return "\n".join([f"### Opening a GGUF, {kind}: `results/{path.name}`", "",
                      f"Measured {r['started_utc']} UTC. " + gguf_load_line(path, r) + "."])


def _results() -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob("*.json"))]


def _is_speed(r: dict) -> bool:
    return r.get("benchmark", "").startswith("llama-tracer speed") and not r.get("quick")


def render() -> str:
    parts = []
    for path, r in _results():
        if "trace_bytes_on_disk" in r:
            parts.append(trace_cost_section(path))
        elif r.get("benchmark", "").startswith("llama-tracer decode attention"):
            parts.append(attention_section(path))
        elif r.get("benchmark") == "gguf_load":
            parts.append(gguf_load_section(path))
        else:
            parts.append(speed_section(path))
    return "\n\n".join(parts)


def summary() -> str:
    """README.md's speed summary: one row per speed results file, then the load, prefill,
    bandwidth and tracing figures that the prose there talks about."""
    speeds = [(p, r) for p, r in _results() if _is_speed(r)]
    # Largest model first, then the embedded model's 2-thread run before its 1-thread run; runs of
    # one setting in the order they were measured (each is kept: they differ by the VM's noise).
    speeds.sort(key=lambda pr: (-pr[1]["model"]["num_parameters"], -pr[1]["machine"]["torch_threads"], pr[1]["date"]))
    lines = [
        "| model | started (UTC) | transformers `generate` | ours, capture off | ours, light | ours, `compile=True` "
        "| ours off on torch's `F.linear` | our kernel over the weights only | llama.cpp, same weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, name: str, ratio: bool = False) -> str:
        d = r["decode"]
        if name not in d:
            return ""
        v = d[name]["tokens_per_s"]
        text = f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return text + (f" ({v / d['transformers']['tokens_per_s']:.2f}x)" if ratio else "")

    for _, r in speeds:
        threads = r["machine"]["torch_threads"]
        label = f"{SHORT_NAMES.get(r['model']['name'], r['model']['name'])} ({r['model']['num_parameters'] / 1e6:,.0f}M), " \
                f"{r['dtype']}, {threads} thread{'s' if threads != 1 else ''}"
        lines.append(
            f"| {label} | {r['date'][:16]} | {cell(r, 'transformers')} | {cell(r, 'ours_off', True)} | {cell(r, 'ours_light')} "
            f"| {cell(r, 'ours_compiled', True)} | {cell(r, 'ours_off_torch_matvec')} | {cell(r, 'kernel_only')} "
            f"| {cell(r, 'llamacpp')} |"
        )
    lines.append("")
    machines = sorted({f"{cpu_label(r['machine'])}, {r['machine']['cpu_cores']} cores, torch {r['machine']['torch']}, "
                       f"transformers {r['machine']['transformers']}" for _, r in speeds})
    dates = sorted(r["date"][:10] for _, r in speeds)
    lines.append(f"Machine: {'; '.join(machines)}; measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
                 + ". From " + ", ".join(f"`benchmarks/results/{p.name}`" for p, _ in speeds) + ":")
    lines.append("")
    for path, r in speeds:
        d, ratios, ld, bw = r["decode"], r["ratios"], r["load"], r["bandwidth"]
        agree = d["greedy_tokens_agree_with_transformers"]
        per_round = sorted(c / t for c, t in zip(d.get("ours_compiled", d["ours_off"])["tokens_per_s_all"],
                                                  d["transformers"]["tokens_per_s_all"]))
        parts = [
            f"greedy tokens equal to transformers' for {agree['leading_equal']} of {agree['of']}",
            f"{'compiled' if 'ours_compiled' in d else 'off'}/transformers per round {per_round[0]:.2f}-{per_round[-1]:.2f}",
            f"prefill of {r['settings']['prefill_tokens']} tokens {ratios['prefill_ours_over_transformers']:.2f}x transformers",
            f"load to first logits {ld['ours']['seconds']:.2f} s vs {ld['transformers']['seconds']:.2f} s, peak RSS "
            f"{ld['ours']['peak_rss_above_baseline_MB']:.0f} MB above baseline (model {ld['ours']['model_MB']:.0f} MB)",
        ]
        if "kernel_only" in d:
            gbps = d["kernel_only"]["tokens_per_s"] * r["model"]["weight_bytes_per_token"] / 1e9
            parts.append(f"kernel only reads {gbps:.1f} GB/s of weights (`x.sum()` {bw['sum_GBps']:.1f} GB/s in the same run)")
        lines.append(f"- `{path.name}`: " + "; ".join(parts) + ".")
    for path, r in _results():
        if r.get("benchmark") == "gguf_load":
            lines.append("- GGUF load, " + gguf_load_line(path, r) + ".")
        if "trace_bytes_on_disk" in r and "lockstep" in r:
            lk = r["lockstep"]["ratios"]
            lines.append(
                f"- tracing, `{path.name}` ({Path(r['model']).name}, {r['dtype']}, {r['repeats']} rounds in lockstep): "
                f"light/off {lk['light/off']:.3f}, off/bare {lk['off/bare']:.3f}; two identical bare runs "
                f"{lk['bare_again/bare']:.3f} (the noise floor)."
            )
    return "\n".join(lines)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n\n{body}\n\n{end}{tail}"


def updated_readme() -> str:
    """benchmarks/README.md with its results section rendered anew."""
    return _replace(README.read_text(), BEGIN, END, render())


def updated_top_readme() -> str:
    """README.md with its speed summary rendered anew."""
    return _replace(TOP_README.read_text(), SUMMARY_BEGIN, SUMMARY_END, summary())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true",
                    help="replace the results in benchmarks/README.md and the summary in README.md")
    args = ap.parse_args(argv)
    if args.write:
        README.write_text(updated_readme())
        TOP_README.write_text(updated_top_readme())
    else:
        print(render())


if __name__ == "__main__":
    main()
