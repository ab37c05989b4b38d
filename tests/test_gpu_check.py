"""The prepared GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py), its dry run on the CPU,
and the guards that keep the CPU tests about the CPU on a GPU host. Device: the CPU throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cuda import cpu_tests  # noqa: F401  (the fixture)

import tracer

ROOT = Path(__file__).resolve().parent.parent
# The modules of CPU tests that once took device="auto" for the CPU (a GPU host would have run
# them on CUDA): each now names its device, and the fixture makes a load without one fail here.
CPU_MODULES = ("test_attend.py", "test_matvec.py", "test_embedded.py", "test_kernels.py", "test_fast.py")


@pytest.mark.slow
def test_the_dry_run_proves_every_stage_on_the_cpu_and_writes_one_json(tmp_path):
    """DEVICE=cpu scripts/gpu_check.sh: the GPU check end to end, tiny shapes, every stage ok, one
    JSON named after the device with the figures the GPU run will fill in."""
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("gpu-check-*.json")
    r = json.loads(path.read_text())
    assert r["dry_run"] and r["ok"] and r["device"]["type"] == "cpu" and r["device"]["name"]
    stages = r["stages"]
    assert list(stages) == ["environment", "parity", "syncs", "compiled", "compiled_syncs", "memory", "pytest", "speed"]
    assert all(s["ok"] for s in stages.values()), {k: s.get("error") for k, s in stages.items()}
    parity = stages["parity"]
    assert parity["greedy"]["equal"] and parity["logits"]["max_abs_difference"] <= 2e-2 * parity["logits"]["largest_logit"]
    assert all(s["equal"] for s in parity["seeded_samples"]["float32"]["seeds"].values())
    assert set(parity["capture_policies"]) == {"off", "light", "full"}
    assert set(stages["syncs"]["policies"]) == {"off", "light", "full"} and set(stages["compiled_syncs"]["policies"]) == {"off"}
    assert all(p["per_step"] >= 0 and "proxy" in p["method"] for p in stages["syncs"]["policies"].values())
    c = stages["compiled"]
    assert c["step"] == "compiled-block" and c["compile_seconds"] and c["greedy_vs_eager"]["ok"] and not c["cuda_graphs"]
    assert c["compiled_step_ms"] > 0 and c["eager_step_ms"] > 0
    pt = stages["pytest"]
    assert pt["run"]["counts"]["skipped"] >= 1 and pt["collect"]["counts"]["tests collected"] >= 1
    speed = stages["speed"]
    assert {"ours_off", "ours_light", "ours_full", "transformers"} <= set(speed["decode_tokens_per_s"])
    assert (tmp_path / speed["file"]).is_file() and speed["bandwidth"]["ceiling_GBps"] > 0
    assert r["goals"]["judged_on"].startswith("the dry run")
    assert r["seconds"] <= r["budget_s"]


def test_the_check_and_the_runtime_import_without_the_notebook_stack():
    """The GPU machine has no jupyter, ipywidgets, nbclient, playwright or gguf: the check, the
    speed benchmark, the runtime and the tests' conftest import and load without them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'ipywidgets', 'jupyterlab', 'jupyter_client', 'nbclient', 'nbformat',\n"
        "                                  'ipykernel', 'playwright', 'gguf'}:\n"
        "            raise ImportError(f'{name} is not on the GPU machine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, 'tests')\n"
        "import conftest, builders, test_cuda, test_generate, test_trace\n"
        "import benchmarks.gpu_check, benchmarks.speed, tracer, tracer.fast\n"
        "tracer.load(None, device='cpu', progress=False).generate('It is', max_new_tokens=2, capture='full')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_sync_counting_off_the_gpu_counts_scalar_reads():
    """The dry run's proxy: each scalar read through the dispatcher is one (the GPU counts with
    torch.cuda.set_sync_debug_mode instead)."""
    from benchmarks.gpu_check import counting_syncs

    x = torch.arange(6.0)
    with counting_syncs(torch.device("cpu")) as seen:
        x.sum().item()
        int(x.argmax())
        y = x * 2  # no read
    assert seen.count == 2 and "proxy" in seen.method and y.shape == x.shape


@pytest.mark.usefixtures("cpu_tests")
def test_a_cpu_test_that_names_no_device_fails_here_as_it_would_on_a_gpu_host():
    """In the CPU test modules "auto" fails on the CPU too, so a test that leans on it (a CPU kernel
    expected, CPU tensors compared) is caught here rather than on the first GPU host; every one of
    those modules has the fixture."""
    with pytest.raises(AssertionError, match="pass device='cpu'"):
        tracer.load(None, progress=False)
    assert tracer.load(None, device="cpu", progress=False).device.type == "cpu"
    for name in CPU_MODULES:
        assert 'pytestmark = pytest.mark.usefixtures("cpu_tests")' in (ROOT / "tests" / name).read_text(), name


def test_the_speed_benchmark_draws_gpu_weights_on_the_gpu_and_keeps_the_cpus_numbers():
    """benchmarks.speed's random weights: the CPU's are what the old code drew (a model built on
    the CPU, then init_weights with a seeded CPU generator); on a GPU they are drawn there. The
    GPU's probe reads at least 1 GiB and each loader loads once or twice."""
    from benchmarks import speed
    from tracer.model import LlamaModel, init_weights

    cfg = speed.standin_config()
    before = LlamaModel(cfg, dtype=torch.float16)
    init_weights(before, torch.Generator().manual_seed(0))
    now = speed.random_weights(cfg, "cpu")
    for (name, a), b in zip(before.state_dict().items(), now.state_dict().values()):
        assert torch.equal(a, b), name
    assert speed.random_weights(cfg, "cuda").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert min(speed.PROBE_BYTES["cuda"]) >= 1 << 30 and speed.PROBE_BYTES["cpu"] == (128 << 20, 2 << 30)
    assert 1 <= speed.LOAD_RUNS_CUDA <= 2 and speed.LOAD_RUNS == 4
