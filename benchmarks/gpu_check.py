"""The CUDA path, proven in one run on one GPU, with one JSON of results.

    scripts/gpu_check.sh OUT_DIR             # on the GPU machine: its python3, the repo on PYTHONPATH
    DEVICE=cpu scripts/gpu_check.sh OUT_DIR  # the dry run: the same stages on the CPU, tiny shapes

The GPU machine has torch, transformers and accelerate but no network, no jupyter and no gguf, so
nothing here imports the notebook stack, and every checkpoint is written here: a random
Llama-shape one by transformers (the oracle's own ``save_pretrained``), and Llama-2-7B shapes by
``benchmarks.speed``. Stages, in order; each is timed, one failing does not stop the others, and
the JSON is rewritten after each (a run cut short still leaves what it measured):

  environment     the device by name, versions, GPU memory
  parity          ours against transformers in float16: logits, greedy ids, seeded samples (and
                  seeded samples in float32, where they must be equal), each capture policy
  syncs           host syncs per decode step (``torch.cuda.set_sync_debug_mode``), per policy
  compiled        ``compile=True``: greedy ids, logits against the eager static step, CUDA graphs
                  (inductor's skip count), ms per step; then its syncs per step
  memory          peak and reserved GPU memory
  pytest          tests/test_cuda.py, test_generate.py and test_trace.py on this device
  speed           ``benchmarks.speed`` on Llama-2-7B shapes, quick (weights drawn on the GPU, one
                  load each, a 1 GiB bandwidth probe), ``--compile``
  goals           the issue's GPU goals, judged on the figures above

The dry run (``--device cpu``) runs every stage on the CPU with tiny shapes in a minute or two;
tests/test_gpu_check.py runs it, so that the script cannot rot before a GPU is at hand. Its sync
counts are a proxy (scalar reads through torch's dispatcher), named as such in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# The random checkpoint of the parity stages: Llama's layout (RMSNorm, RoPE, GQA, SwiGLU, untied
# head, Llama 2's vocabulary size) at a depth that loads in seconds; the dry run's is tiny. ``std``
# scales the random matrices so that the logits have shape (near-uniform ones would make greedy
# ties of every step).
SHAPES = {
    "cuda": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, std=0.04),
    "cpu": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, std=0.08),
}
# How much each stage does: (GPU, dry run).
TOKENS = {"cuda": 32, "cpu": 12}  # new tokens per generation compared
STEPS = {"cuda": 64, "cpu": 6}  # compiled and eager steps timed
SYNC_STEPS = {"cuda": 8, "cpu": 3}  # decode steps whose syncs are counted (after two warm-up steps)
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1)
SEEDS = (0, 1, 2)
POLICIES = ("off", "light", "full")
FULL_POINTS = ("blocks.0.attn.pattern", "blocks.0.resid_post", "logits")
# The budget: one host sync per decode step (the chosen id, with the light summaries).
SYNC_BUDGET = 1
BUDGET_S = {"cuda": 420, "cpu": 240}  # the whole check (the GPU goal: under 8 minutes)
# What --only picks from: the stages on the random checkpoint, the tests, the 7B speed run.
PARTS = ("runtime", "pytest", "speed")
SPEED_S = {"cuda": 210, "cpu": 40}  # seconds the tests leave for the speed run


# ---------------------------------------------------------------------------------------------
# Counting host syncs


@dataclass
class SyncCount:
    """Syncs seen inside :func:`counting_syncs` (``count``), and how they were counted."""

    method: str
    count: int = 0
    where: list[str] = field(default_factory=list)


@contextmanager
def counting_syncs(device: torch.device):
    """Count the host syncs of the code inside. CUDA: ``torch.cuda.set_sync_debug_mode("warn")``,
    which warns at every operation that makes the host wait for the GPU (``.item()``, a blocking
    copy to the host, ``torch.multinomial``'s checks, ...); each warning is one. Elsewhere a proxy:
    scalar reads through torch's dispatcher (``.item()``, ``int()``, ``bool()`` of a tensor)."""
    if device.type == "cuda":
        seen = SyncCount("torch.cuda.set_sync_debug_mode('warn'): synchronizing CUDA operations")
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode(before)
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        seen.count, seen.where = len(hits), sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = SyncCount("CPU proxy: scalar reads through the dispatcher (aten._local_scalar_dense)")

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                seen.count += 1
            return func(*args, **(kwargs or {}))

    with Reads():
        yield seen


def syncs_per_step(llm, prompt: list[int], capture: str, steps: int, **kw) -> dict:
    """Host syncs per decode step of a sampled generation in ``capture`` (after the prefill and
    one decode step, which may compile or record a CUDA graph)."""
    points = FULL_POINTS if capture == "full" else ()
    dec = llm.decoder(prompt, max_new_tokens=steps + 2, seed=0, capture=capture, points=points, **SAMPLING, **kw)
    dec.step()
    dec.step()
    with counting_syncs(llm.device) as seen:
        ran = len(dec.run(steps))
    return {"per_step": seen.count / max(ran, 1), "steps": ran, "method": seen.method, "where": seen.where}


# ---------------------------------------------------------------------------------------------
# The random checkpoint, and the two runtimes on it


def write_checkpoint(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A random Llama saved by transformers in float16, with a word-level stand-in tokenizer."""
    import transformers

    from .speed import write_standin_tokenizer

    shape = dict(shape)
    std = shape.pop("std")
    cfg = transformers.LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    model.to(torch.float16).save_pretrained(folder)
    write_standin_tokenizer(folder, cfg)
    return folder


def load_pair(folder: Path, device: torch.device, dtype: torch.dtype):
    """(ours, transformers') on ``device`` in ``dtype``, neither stopping at EOS (so that both
    generate every token asked for and the ids compare all the way)."""
    import transformers

    import tracer

    ours = tracer.load(folder, device=str(device), dtype=str(dtype).replace("torch.", ""), progress=False)
    ours.defaults = replace(ours.defaults, eos_token_ids=())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    theirs.generation_config.eos_token_id = None
    return ours, theirs


@torch.inference_mode()
def their_ids(theirs, prompt: list[int], n: int, seed: int | None = None, **kw) -> list[int]:
    x = torch.tensor([prompt], device=theirs.device)
    if seed is not None:
        torch.manual_seed(seed)  # transformers draws from the global generator of the device
    out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def leading(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_judged(ours, prompt: list[int], mine: list[int], theirs: list[int]) -> dict:
    """Greedy ids compared: equal, or parted at a near tie. float16 rounds the two runtimes'
    logits differently, so a step whose two best logits are closer than that can go either way:
    judged on our logits along transformers' ids (one forward), a tie being a gap under 1% of the
    largest logit."""
    first = leading(mine, theirs)
    out = {"equal": mine == theirs, "leading_equal": first, "of": len(theirs)}
    if first < len(theirs):
        row = ours.logits(prompt + theirs)[len(prompt) + first - 1]
        top2 = row.topk(2).values
        out["gap_at_first_difference"] = float(top2[0] - top2[1])
        out["near_tie"] = bool(top2[0] - top2[1] <= 1e-2 * row.abs().max())
    out["ok"] = out["equal"] or out.get("near_tie", False)
    return out


# ---------------------------------------------------------------------------------------------
# The stages


@dataclass
class Check:
    """One run: where the JSON goes, the device, the deadline, and the results so far."""

    out: Path
    device: torch.device
    deadline: float
    result: dict
    work: Path
    state: dict = field(default_factory=dict)  # what later stages reuse (the loaded models)

    @property
    def kind(self) -> str:
        return self.device.type

    @property
    def json_path(self) -> Path:
        return self.out / f"gpu-check-{slug(self.result['device']['name'])}.json"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn, needs_s: float = 0.0) -> None:
        """Run ``fn()`` (a dict of results, ``ok`` among them or True) as stage ``name``; record
        its seconds, or its error, or that too little time was left; write the JSON."""
        if self.left() < needs_s:
            record = {"ok": False, "skipped": f"{self.left():.0f} s left, the stage needs {needs_s:.0f} s"}
        else:
            t0 = time.monotonic()
            try:
                record = fn()
                record.setdefault("ok", True)
            except Exception as e:  # noqa: BLE001 - a stage's failure is a result, the next stage runs
                record = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            record["seconds"] = round(time.monotonic() - t0, 2)
        self.result["stages"][name] = record
        status = "ok" if record["ok"] else f"FAILED {record.get('error') or record.get('skipped') or ''}"
        print(f"[gpu_check] {name}: {status} ({record.get('seconds', 0):.1f} s)", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["ok"] = all(s["ok"] for s in self.result["stages"].values())
        self.result["seconds"] = round(time.monotonic() - self.result["_t0"], 1)
        data = {k: v for k, v in self.result.items() if not k.startswith("_")}
        self.json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def environment(device: torch.device) -> dict:
    import transformers

    from .machine import cpu_model

    out = {"type": device.type, "name": cpu_model()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        out.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   multiprocessors=props.multi_processor_count, memory_total_bytes=total, memory_free_bytes=free,
                   count=torch.cuda.device_count(), cuda=torch.version.cuda)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        versions["accelerate"] = version("accelerate")
    except Exception:  # noqa: BLE001 - optional
        versions["accelerate"] = None
    return {"device": out, "versions": versions, "cpu": cpu_model(), "cpu_cores": os.cpu_count()}


def parity(check: Check) -> dict:
    """Ours against transformers on the random checkpoint: float16, then float32 for the draws."""
    folder = write_checkpoint(check.work / "llama-shape", SHAPES[check.kind])
    ours, theirs = load_pair(folder, check.device, torch.float16)
    check.state.update(folder=folder, ours=ours)
    n, vocab = TOKENS[check.kind], SHAPES[check.kind]["vocab_size"]
    prompt = torch.randint(3, vocab, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    check.state["prompt"] = prompt
    with torch.inference_mode():
        expected = theirs(torch.tensor([prompt], device=check.device)).logits[0].float()
    got = ours.logits(prompt)
    scale = float(expected.abs().max())
    worst = float((got - expected).abs().max())
    logits = {"max_abs_difference": worst, "largest_logit": scale, "ok": worst <= 2e-2 * scale}
    mine = ours.generate(prompt, max_new_tokens=n, do_sample=False, capture="off").new_ids
    greedy = greedy_judged(ours, prompt, mine, their_ids(theirs, prompt, n, do_sample=False))
    check.state["greedy"] = mine
    policies = {}
    for capture in POLICIES:
        points = FULL_POINTS if capture == "full" else ()
        gen = ours.generate(prompt, max_new_tokens=n, do_sample=False, capture=capture, points=points)
        drawn = ours.generate(prompt, max_new_tokens=n, seed=0, capture=capture, points=points, **SAMPLING)
        policies[capture] = {"greedy_equal_to_off": gen.new_ids == mine, "stages": len(gen.trace.events),
                             "sampled": drawn.new_ids}
    first = policies["off"]["sampled"]
    for record in policies.values():
        record["sampled_equal_to_off"] = record.pop("sampled") == first
        record["ok"] = record["greedy_equal_to_off"] and record["sampled_equal_to_off"]
    samples = {"float16": seeded(ours, theirs, prompt, n)}
    del theirs
    ours32, theirs32 = load_pair(folder, check.device, torch.float32)
    samples["float32"] = seeded(ours32, theirs32, prompt, n)
    samples["float16"]["note"] = "float16 rounding can move a draw that sits at a boundary; float32 must be equal"
    del ours32, theirs32
    ok = logits["ok"] and greedy["ok"] and samples["float32"]["ok"] and all(p["ok"] for p in policies.values())
    return {"ok": ok, "shape": SHAPES[check.kind], "prompt_tokens": len(prompt), "logits": logits,
            "greedy": greedy, "seeded_samples": samples, "capture_policies": policies}


def seeded(ours, theirs, prompt: list[int], n: int) -> dict:
    """Seeded draws: ours with ``seed=``, transformers after ``torch.manual_seed``; equal ids."""
    runs = {}
    for seed in SEEDS:
        mine = ours.generate(prompt, max_new_tokens=n, seed=seed, capture="off", **SAMPLING).new_ids
        other = their_ids(theirs, prompt, n, seed=seed, **SAMPLING)
        runs[seed] = {"equal": mine == other, "leading_equal": leading(mine, other), "of": len(other)}
    return {"ok": all(r["equal"] for r in runs.values()), "settings": SAMPLING, "seeds": runs}


def sync_counts(check: Check, compiled: bool) -> dict:
    ours, prompt = check.state["ours"], check.state["prompt"]
    policies = ("off",) if compiled else POLICIES
    counts = {p: syncs_per_step(ours, prompt, p, SYNC_STEPS[check.kind]) for p in policies}
    worst = max(c["per_step"] for c in counts.values())
    # A result, not a failure of the check: the budget is one of the goals (see "goals").
    return {"policies": counts, "budget_per_step": SYNC_BUDGET, "within_budget": worst <= SYNC_BUDGET}


def compiled(check: Check) -> dict:
    """``compile=True`` on the parity model: its greedy ids, and its step against the eager one."""
    from torch._dynamo.utils import counters

    from tracer.fast import StaticStep

    ours, prompt, n = check.state["ours"], check.state["prompt"], TOKENS[check.kind]
    skips = counters["inductor"]["cudagraph_skips"]
    ours.compile_step()
    gen = ours.generate(prompt, max_new_tokens=n, do_sample=False, capture="off")
    step = ours.fast_step
    tol = 2e-2 if ours.dtype == torch.float16 else 1e-4  # relative to the largest logit
    worst, timings = compare_steps(ours.model, step, StaticStep(ours.model, attention=step.attention), prompt,
                                   STEPS[check.kind])
    out = {
        "step": gen.trace.meta["step"], "compile_seconds": step.compile_seconds,
        # Fused kernels round float16 a little differently: equal, or parted at a near tie.
        "greedy_vs_eager": greedy_judged(ours, prompt, gen.new_ids, check.state["greedy"]),
        "logit_difference_vs_eager_step": worst, "cuda_graphs": step.cuda_graphs,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
        "blocks_per_graph": step.blocks_per_graph, **timings,
    }
    out["ok"] = out["greedy_vs_eager"]["ok"] and worst <= tol and (out["cudagraph_skips"] == 0 or check.kind != "cuda")
    return out


def compare_steps(model, fast_step, eager_step, prompt: list[int], steps: int) -> tuple[float, dict]:
    """Both steps from the same prefill, each on its own cache, fed the eager step's greedy ids
    (through :meth:`StaticStep.at`, as the Decoder does): the largest logit difference relative to
    the largest logit, then the milliseconds per step of each over ``steps`` more steps."""
    caches = [model.new_cache(256) for _ in range(2)]  # made as the Decoder makes its own (not inference tensors)
    with torch.inference_mode():
        return _compare_steps(model, fast_step, eager_step, prompt, steps, caches)


def _compare_steps(model, fast_step, eager_step, prompt, steps, caches) -> tuple[float, dict]:
    for cache in caches:
        model(torch.tensor([prompt], device=model.device), cache, last_only=True)
    token, worst, position = prompt[-1], 0.0, len(prompt)
    for position in range(len(prompt), len(prompt) + 8):
        want, got = eager_step.at(token, position, caches[0]), fast_step.at(token, position, caches[1])
        worst = max(worst, float((want.float() - got.float()).abs().max() / want.float().abs().max()))
        token = int(want.argmax())
    timings = {}
    for name, step, cache in (("eager_step", eager_step, caches[0]), ("compiled_step", fast_step, caches[1])):
        sync(model.device)
        t0 = time.perf_counter()
        for p in range(position + 1, position + 1 + steps):
            step.at(token, p, cache)
        sync(model.device)
        timings[f"{name}_ms"] = 1000 * (time.perf_counter() - t0) / steps
    return worst, timings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(check: Check) -> dict:
    if check.kind != "cuda":
        return {"note": "no GPU: nothing to measure"}
    free, total = torch.cuda.mem_get_info(check.device)
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(check.device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(check.device),
            "free_bytes": free, "total_bytes": total}


def run_pytest(check: Check, reserve_s: dict) -> dict:
    """The CUDA tests and the generate/trace tests on this device (on the CPU: test_cuda.py, which
    skips, and the others collected only: running them is CI's business there)."""
    files = ["tests/test_cuda.py", "tests/test_generate.py", "tests/test_trace.py"]
    runs = {"run": files} if check.kind == "cuda" else {"run": files[:1], "collect": files[1:]}
    out = {}
    for how, chosen in runs.items():
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *chosen]
        if how == "collect":
            cmd.append("--collect-only")
        timeout = max(30.0, min(240.0, check.left() - reserve_s[check.kind]))
        out[how] = pytest_summary(cmd, timeout)
    out["ok"] = all(r["ok"] for r in out.values())
    return out


def pytest_summary(cmd: list[str], timeout: float) -> dict:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "tail": tail.decode() if isinstance(tail, bytes) else tail}
    text = proc.stdout + proc.stderr
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|tests? collected)", text)}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "counts": counts, "command": " ".join(cmd[2:]),
            "tail": text[-3000:]}


def speed(check: Check) -> dict:
    """benchmarks.speed, quick, in a fresh process: Llama-2-7B shapes on the GPU (the embedded model
    on the CPU); its own JSON lands beside this one and is folded in."""
    if check.kind == "cuda":
        name, args = "cuda-llama2-7b-float16.json", ["--device", "cuda", "--model", "llama2-7b", "--dtype", "float16",
                                                      "--compile", "--new-tokens", "64", "--repeats", "2",
                                                      "--prefill-tokens", "512"]
    else:  # no --compile: the compiled stage has proven it, and CI's minute is short
        name, args = "cpu-embedded-float32-dry.json", ["--device", "cpu", "--model", "embedded", "--threads", "2",
                                                        "--new-tokens", "4"]
    path = check.out / name
    cmd = [sys.executable, "-m", "benchmarks.speed", "--quick", *args, "--out", str(path)]
    timeout = max(30.0, check.left() - 5)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[2:])}
    if proc.returncode != 0:
        return {"ok": False, "error": f"exit {proc.returncode}", "tail": proc.stderr[-4000:]}
    r = json.loads(path.read_text())
    d, bw = r["decode"], r["bandwidth"]
    return {
        "file": path.name, "command": " ".join(cmd[2:]),
        "load_seconds": {k: r["load"][k]["seconds"] for k in ("ours", "transformers")},
        "prefill_tokens_per_s": {k: r["prefill"][k]["tokens_per_s"] for k in ("ours", "transformers")},
        "decode_tokens_per_s": {k: v["tokens_per_s"] for k, v in d.items() if isinstance(v, dict) and "tokens_per_s" in v},
        "weight_bytes_per_token": r["model"]["weight_bytes_per_token"],
        "bandwidth": {k: bw.get(k) for k in ("tensor_bytes", "sum_GBps", "copy_GBps", "ceiling_GBps", "gpu_name",
                                              "datasheet_TBps", "peak_gpu_memory_bytes")},
        "decode_peak_gpu_memory_bytes": d.get("peak_gpu_memory_bytes"),
        "greedy_tokens_agree_with_transformers": d["greedy_tokens_agree_with_transformers"],
        "ratios": r["ratios"],
    }


def goals(check: Check) -> dict:
    """The issue's GPU goals, on this run's figures (None where a stage did not give them)."""
    stages = check.result["stages"]
    s = stages.get("speed", {})
    tps, ratios = s.get("decode_tokens_per_s", {}), s.get("ratios", {})
    out: dict = {}
    if tps:
        best = max(ratios.get("decode_ours_off_over_transformers", 0), ratios.get("decode_ours_compiled_over_transformers", 0))
        out["decode >= 1.5x transformers"] = best >= 1.5
        if "ours_compiled" in tps:
            achieved = tps["ours_compiled"] * s["weight_bytes_per_token"] / 1e9
            out["compiled_pct_of_bandwidth_ceiling"] = 100 * achieved / s["bandwidth"]["ceiling_GBps"]
            out["compiled >= 70% of the HBM ceiling"] = out["compiled_pct_of_bandwidth_ceiling"] >= 70
        out["light within 10% of off"] = ratios.get("decode_light_over_off", 0) >= 0.9
    counts = [c["per_step"] for name in ("syncs", "compiled_syncs") for c in stages.get(name, {}).get("policies", {}).values()]
    if counts:
        out[f"at most {SYNC_BUDGET} host sync per token in every policy"] = max(counts) <= SYNC_BUDGET
    out["judged_on"] = check.kind if check.kind == "cuda" else "the dry run's CPU figures (not the GPU goals)"
    return out


# ---------------------------------------------------------------------------------------------
# The run


def run(out: Path, device: torch.device, budget_s: float, parts: tuple[str, ...] = PARTS) -> dict:
    t0 = time.monotonic()
    env = environment(device)
    result = {"check": "llama-tracer GPU check (benchmarks/gpu_check.py)", "dry_run": device.type != "cuda",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s, "parts": list(parts), **env,
              "stages": {}, "_t0": t0}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(out, device, t0 + budget_s, result, Path(work))
        check.stage("environment", lambda: {"ok": True, **env["device"]})
        if "runtime" in parts:
            check.stage("parity", lambda: parity(check), needs_s=20)
        if "ours" in check.state:
            check.stage("syncs", lambda: sync_counts(check, compiled=False), needs_s=10)
            check.stage("compiled", lambda: compiled(check), needs_s=20)
            check.stage("compiled_syncs", lambda: sync_counts(check, compiled=True), needs_s=5)
            check.stage("memory", lambda: memory(check))
        check.state.clear()  # the models: free the GPU for the speed run's own process
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "pytest" in parts:
            reserve = SPEED_S if "speed" in parts else {"cuda": 0, "cpu": 0}
            check.stage("pytest", lambda: run_pytest(check, reserve), needs_s=30)
        if "speed" in parts:
            check.stage("speed", lambda: speed(check), needs_s=60 if device.type == "cuda" else 20)
        result["goals"] = goals(check)
        check.write()
    print(f"[gpu_check] wrote {check.json_path} ({'ok' if result['ok'] else 'FAILED'}, {result['seconds']} s)",
          file=sys.stderr)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "artifacts/gpu-check", help="folder for the JSON")
    ap.add_argument("--device", default=None, help="cuda (default where there is one) or cpu (the dry run)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole check")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"a rerun of some parts, comma-separated among {', '.join(PARTS)} (default: all)")
    args = ap.parse_args(argv)
    parts = tuple(p for p in args.only.split(",") if p)
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--only: parts among {', '.join(PARTS)}, not {args.only!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network there: never wait for the hub (the
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")  # subprocesses inherit it)
    name = args.device or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --device cpu for the dry run)")
    result = run(Path(args.out), device, args.budget_s or BUDGET_S[device.type], parts)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
