"""tracer/kernels: building the C library (cache, lock, time limits), when it is built, its limits,
and the torch operators registered on first use."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_cuda import cpu_tests  # noqa: F401  (the fixture)
from test_model import small_model

import tracer
from tracer import attend, fast, kernels
from tracer.errors import DeviceError
from tracer.kernels import build
from tracer.matvec import KernelLinear, KernelStacked
from tracer.model import LlamaModel

ROOT = Path(__file__).resolve().parent.parent
KERNEL = kernels.library()
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
needs_machine = pytest.mark.skipif(
    KERNEL.reason.startswith(("the kernel is x86-64 only", "the kernel needs AVX2")), reason=KERNEL.reason
)
# CPU tests: tracer.load without device= fails here (on a GPU host "auto" would be CUDA).
pytestmark = pytest.mark.usefixtures("cpu_tests")


def _script(path: Path, body: str) -> str:
    """An executable shell script at ``path`` (a stand-in compiler); its path."""
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache folder, a process that has not loaded the library yet, and a
    compiler that records each call (``calls``) and fails it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def recording(args, what, timeout):
        calls.append(list(args))
        raise build.Unavailable("no compiler in this test")

    monkeypatch.setattr(build, "run_compiler", recording)
    build.library.cache_clear()
    yield calls
    build.library.cache_clear()  # the next user loads the real cache's library again


# --- Building ----------------------------------------------------------------------------------


def test_a_machine_without_a_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    """No compiler: no error, a reason, and the model keeps F.linear ("auto") or says why not."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    k = build.load()
    assert not k.available and k.reason
    assert not list(tmp_path.glob("llama-tracer/*"))  # nothing half-built left behind


@needs_machine
def test_a_failing_build_leaves_no_file_and_says_why(monkeypatch, tmp_path):
    cc = _script(tmp_path / "brokencc", """\
        [ "$1" = --version ] && { echo brokencc 1.0; exit 0; }
        echo "out of ink" >&2
        exit 1
    """)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    k = build.load()
    assert not k.available
    assert "matvec.c" in k.reason and "failed" in k.reason and "out of ink" in k.reason
    assert list((tmp_path / "cache" / "llama-tracer").iterdir()) == []  # the temporary file is gone


@needs_kernel
def test_build_goes_to_the_cache_dir_once(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = build.load()
    built = sorted((tmp_path / "llama-tracer").glob("kernels-*.so"))
    assert first.available and built == sorted([first.path, first.quant_lib])  # the core and quant.c's
    assert first.path.name.startswith("kernels-core-") and first.quant_lib.name.startswith("kernels-quant-")
    mtimes = [p.stat().st_mtime_ns for p in built]
    again = build.load()
    assert (again.path, again.quant_lib) == (first.path, first.quant_lib)
    assert [p.stat().st_mtime_ns for p in built] == mtimes  # reused, not rebuilt
    assert not list((tmp_path / "llama-tracer").glob("tmp*"))  # no temporary left over


@needs_kernel
def test_a_library_that_will_not_load_means_no_kernel(monkeypatch, tmp_path):
    """A damaged file in the cache (not one we wrote: ours are renamed into place whole) is
    reported with its path and what to do, not a crash at the first product."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    name = build.load().path.name  # (a library in use must not be overwritten)
    damaged = tmp_path / "b" / "llama-tracer" / name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    k = build.load()
    assert not k.available and str(damaged) in k.reason and "delete it" in k.reason


@needs_kernel
def test_a_compiler_that_cannot_build_quant_c_still_gives_the_core_kernels(monkeypatch, tmp_path):
    """The libraries build apart: a compiler failing on quant.c alone leaves the 16/32-bit
    products and attention on the kernel, and quantized layers on torch's path, with the reason."""
    cc = _script(tmp_path / "pickycc", """\
        [ "$1" = --version ] && exec cc --version
        for a in "$@"; do case "$a" in *quant.c) echo "quant.c: no AVX-512 here" >&2; exit 1;; esac; done
        exec cc "$@"
    """)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    k = build.load()
    assert k.available and k.limits is not None and k.quant_lib is None and k.quant_formats == {}
    assert "quant.c" in k.quant_reason and "no AVX-512 here" in k.quant_reason
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, generator=g), torch.randn(8, 64, generator=g)
    torch.testing.assert_close(k.run(x, w, torch.empty(8)), w @ x, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr("tracer.kernels.library", lambda: k)
    monkeypatch.setattr("tracer.quant.library", lambda: k)
    import gguf

    from tracer.quant import QuantLinear
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))
    layer = QuantLinear(raw, "Q8_0", 8, 64)
    assert not layer.use_kernel  # no quantized kernel: the torch path, which still computes
    from tracer.quant import dequantize

    expected = dequantize(raw, "Q8_0", (8, 64)) @ x  # the weight its blocks stand for
    torch.testing.assert_close(layer(x.view(1, 1, 64)).view(8), expected, atol=1e-5, rtol=1e-5)
    assert list((tmp_path / "cache" / "llama-tracer").glob("kernels-quant-*")) == []


@needs_machine
@pytest.mark.parametrize("hangs_at", ["--version", "build"])
def test_a_compiler_that_hangs_is_given_up_on(monkeypatch, tmp_path, hangs_at):
    """Every compiler call has a time limit: a hung compiler means "no kernel" with a reason,
    soon, and leaves nothing behind."""
    answer = "" if hangs_at == "--version" else '[ "$1" = --version ] && { echo slowcc 1.0; exit 0; }\n'
    monkeypatch.setenv("CC", _script(tmp_path / "slowcc", answer + "exec sleep 60\n"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "VERSION_TIMEOUT", 1)
    monkeypatch.setattr(build, "BUILD_TIMEOUT", 1)
    t0 = time.perf_counter()
    k = build.load()
    assert time.perf_counter() - t0 < 20
    assert not k.available and "took over 1 s" in k.reason
    assert ("--version" in k.reason) == (hangs_at == "--version"), k.reason
    assert not list(tmp_path.glob("cache/llama-tracer/*"))


@needs_kernel
def test_two_processes_building_at_once_compile_once(tmp_path):
    """Two processes (two notebooks starting) against an empty cache: the build holds a lock on
    the cache folder, so the second waits for the first's library instead of compiling its own."""
    log = tmp_path / "compiles.log"
    cc = _script(tmp_path / "countingcc", f"""\
        [ "$1" = --version ] && exec cc --version
        echo "$$" >> {log}
        sleep 2  # both processes are past their "is it built?" check by now
        exec cc "$@"
    """)
    code = "from tracer.kernels import build; k = build.load(); print(k.available, k.path, k.reason)"
    env = {"CC": cc, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert [out.split()[0] for out, _ in outs] == ["True", "True"], outs
    assert len({out.split()[1] for out, _ in outs}) == 1  # the same library
    assert len(log.read_text().splitlines()) == len(build.PARTS)  # each part compiled once, by one of them


# --- When it is built ----------------------------------------------------------------------------


@needs_machine
def test_the_torch_products_build_nothing(fresh_build, tiny_checkpoint):
    """matvec="torch" never calls the compiler (nor loads the library); "auto" does (the control)."""
    llm = tracer.load(tiny_checkpoint, device="cpu", progress=False, matvec="torch")
    assert llm.load_trace.meta["matvec"] == "torch"
    assert fresh_build == [] and build.library.cache_info().currsize == 0
    tracer.load(tiny_checkpoint, device="cpu", progress=False, matvec="auto")
    assert fresh_build and fresh_build[0][1] == "--version"


@needs_machine
def test_a_model_off_the_cpu_builds_nothing_and_refuses_the_kernel(fresh_build):
    """Device: a CUDA model (its device property says so) and a real model off the CPU (meta).
    "auto" keeps torch's products and "kernel" is a one-line DeviceError rather than silently
    torch's, both decided before anything is built: no compiler call, not even ``cc --version``,
    and no library loaded. The same model on the CPU builds (the control)."""
    model = small_model()
    with mock.patch.object(LlamaModel, "device", new_callable=mock.PropertyMock, return_value=torch.device("cuda")):
        assert fast.use_kernels(model, "auto") == "torch"
        with pytest.raises(DeviceError, match=r"matvec='kernel' runs on the CPU only, but the model is on cuda") as e:
            fast.use_kernels(model, "kernel")
        assert "\n" not in str(e.value)
        assert not any(isinstance(m, (KernelLinear, KernelStacked)) for m in model.modules())
    meta = LlamaModel(small_model().config, device="meta")
    assert fast.use_kernels(meta, "auto") == "torch"
    with pytest.raises(DeviceError, match="the model is on meta"):
        fast.use_kernels(meta, "kernel")
    assert fresh_build == [] and build.library.cache_info().currsize == 0
    fast.use_kernels(model, "auto")  # the same model on the CPU: the control
    assert fresh_build and fresh_build[0][1] == "--version"


def test_importing_registers_no_operator_and_taking_the_kernels_on_does():
    """The torch operators are registered when a model first takes the kernels on, not at import."""
    code = (
        "import torch, tracer, tracer.fast, tracer.matvec, tracer.attend, tracer.kernels\n"
        "print(hasattr(torch.ops.llama_tracer, 'matvec'))\n"
        "tracer.load(None, device='cpu', progress=False, matvec='auto')\n"
        "print(hasattr(torch.ops.llama_tracer, 'matvec'), tracer.kernels.library().available)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.splitlines()
    available = after.split()[1] == "True"
    assert before == "False" and after.split()[0] == str(available)


# --- The limits the C code exports ---------------------------------------------------------------


def _defines(name: str) -> dict[str, int]:
    text = (Path(build.__file__).parent / name).read_text()
    return {k: int(v) for k, v in re.findall(r"^#define (\w+) (\d+)\s*$", text, flags=re.M)}


@needs_kernel
def test_the_limits_are_the_c_codes_own():
    """The limits Python works with are what the library exports, and those are its #defines."""
    c = {**_defines("attend.c"), **_defines("matvec.c")}
    assert KERNEL.limits == kernels.Limits(max_parts=c["MAX_PARTS"], max_head_dim=c["MAX_HD"],
                                           head_dim_step=c["HD_STEP"], max_rep=c["MAX_REP"])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_fits_up_to_the_limits_and_is_right_there(dtype):
    """fits() follows the library's limits, and at the largest head size and query heads per KV
    head that it admits the kernel computes the masked attention's result."""
    lim = KERNEL.limits
    g = torch.Generator().manual_seed(0)
    S, pos = 12, torch.tensor([9])

    def inputs(n_rep, hd):
        q = torch.randn(1, 2, n_rep, hd, generator=g).to(dtype)
        return q, torch.randn(1, 2, S, hd, generator=g).to(dtype), torch.randn(1, 2, S, hd, generator=g).to(dtype)

    with torch.inference_mode():
        q, k, v = inputs(lim.max_rep, lim.max_head_dim)
        assert attend.fits(q, k, v, pos, lim)
        want = attend.masked(q, k, v, pos, lim.max_head_dim**-0.5)
        got = attend.decode_attention(q, k, v, pos, lim.max_head_dim**-0.5)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
        assert not attend.fits(*inputs(lim.max_rep + 1, lim.head_dim_step), pos, lim)
        assert not attend.fits(*inputs(1, lim.max_head_dim + lim.head_dim_step), pos, lim)
        assert not attend.fits(*inputs(1, lim.head_dim_step + 1), pos, lim)


@needs_kernel
def test_products_take_up_to_max_parts_matrices_per_call():
    x = torch.randn(64)
    ws = [torch.randn(8, 64) for _ in range(KERNEL.limits.max_parts + 1)]
    n = KERNEL.limits.max_parts
    together = KERNEL.run(x, ws[:n], torch.empty(8 * n))
    torch.testing.assert_close(together, torch.cat(ws[:n]) @ x, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=f"up to {n} matrices"):
        KERNEL.run(x, ws, torch.empty(8 * (n + 1)))
