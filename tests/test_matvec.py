"""tracer/matvec.py: the one-row product kernel, and the model's products on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cuda import cpu_tests  # noqa: F401  (the fixture)

import tracer
from tracer import fast, kernels, matvec
from tracer.errors import DeviceError
from tracer.matvec import KernelLinear, KernelStacked
from tracer.model import Stacked

KERNEL = kernels.library()
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Worst elementwise difference from a float64 product, in units of the output's spacing (eps *
# |y| + eps * sum|w x|): one rounding of the result plus float32 summation error.
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# CPU tests: tracer.load without device= fails here (on a GPU host "auto" would be CUDA).
pytestmark = pytest.mark.usefixtures("cpu_tests")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.double() @ x.double().reshape(-1))


def _assert_close_to_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    exact = _reference(x, w)
    scale = (w.double().abs() @ x.double().abs().reshape(-1))
    bound = ULP[w.dtype] * exact.abs() + 2**-20 * scale + 1e-30
    err = (got.double().reshape(-1) - exact).abs()
    assert bool((err <= bound).all()), f"worst {float((err / bound).max()):.2f} x the bound"


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 67), k=st.integers(1, 70), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99)
)
def test_kernel_matches_the_exact_product_for_any_shape(n, k, dtype, seed):
    """Every row count (groups of four and the remainder) and column count (lanes of eight and
    the tail), in each storage dtype: one rounding away from the float64 product."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    out = torch.empty(n, dtype=dtype)
    _assert_close_to_exact(KERNEL.run(x, w, out), x, w)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 9), n=st.integers(1, 37), k=st.one_of(st.integers(1, 70), st.integers(250, 700)),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 99),
)
def test_several_rows_match_the_exact_product_for_any_shape(t, n, k, dtype, seed):
    """The prompt kernel: odd and even row counts, row-group and lane remainders, short rows and
    rows of a few hundred columns, each row of the result one rounding away from its float64
    product."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(t, k, generator=g).to(dtype)
    out = KERNEL.run_rows(x, w, torch.empty(t, n, dtype=dtype))
    for row in range(t):
        _assert_close_to_exact(out[row], x[row], w)


@needs_kernel
def test_a_long_prompt_is_cut_into_chunks_and_agrees_with_torch():
    """More rows than one kernel call takes (64): the chunks join into F.linear's result (603
    columns: lanes of eight and a three-column tail)."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 603, generator=g) * 0.05).half()
    x = torch.randn(1, 150, 603, generator=g).half()
    with torch.inference_mode():
        assert matvec.fits(x, w)
        got = matvec.linear(x, w)
        torch.testing.assert_close(got, F.linear(x, w))
        one_by_one = torch.cat([matvec.linear(x[:, i : i + 1], w) for i in range(150)], dim=1)
    # Row by row (the one-row kernel) and in chunks (the prompt kernel) sum in the same order.
    assert torch.equal(got, one_by_one)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_agrees_with_torch_on_model_shapes(dtype):
    """matvec.linear on a decode-shaped input is F.linear up to summation order."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1408, 256, generator=g) * 0.05).to(dtype)
    x = torch.randn(1, 1, 256, generator=g).to(dtype)
    with torch.inference_mode():
        assert matvec.fits(x, w)
        got = matvec.linear(x, w)
        want = F.linear(x, w)
    assert got.shape == want.shape == (1, 1, 1408) and got.dtype == dtype
    _assert_close_to_exact(got, x, w)
    torch.testing.assert_close(got, want)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.integers(1, 40), min_size=1, max_size=3), k=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES), threads=st.sampled_from([1, 2]), seed=st.integers(0, 99),
)
def test_several_matrices_in_one_call_equal_one_call_each(rows, k, dtype, threads, seed):
    """q, k and v (or gate and up) as one call: each part's rows summed exactly as alone, the
    results one after another."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=g).to(dtype) for n in rows]
    x = torch.randn(k, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        together = KERNEL.run(x, ws, torch.empty(sum(rows), dtype=dtype))
        apart = torch.cat([KERNEL.run(x, w, torch.empty(w.shape[0], dtype=dtype)) for w in ws])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, apart)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stacked_is_one_layer_with_the_weights_stacked(use_kernel, tokens, dtype):
    """model.Stacked and its kernel twin (one call for one row) give the stacked layer's product."""
    if use_kernel and not KERNEL.available:
        pytest.skip(KERNEL.reason)
    stacked = KernelStacked(KERNEL.limits.max_parts) if use_kernel else Stacked()
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(96, n, bias=False, dtype=dtype) for n in (128, 64, 64)]
    for m in layers:
        m.weight.data = torch.randn(m.weight.shape, generator=g).to(dtype)
    x = torch.randn(1, tokens, 96, generator=g).to(dtype)
    with torch.inference_mode():
        got = stacked(x, *layers)
        stacked = F.linear(x.double(), torch.cat([m.weight for m in layers]).double())
    assert got.shape == (1, tokens, 256) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(got.double(), stacked, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate(dtype):
    """A NaN in the activations must reach the logits, where the decoder reports it."""
    w = torch.ones(64, 128, dtype=dtype)
    x = torch.ones(128, dtype=dtype)
    x[5] = float("nan")
    assert torch.isnan(KERNEL.run(x, w, torch.empty(64, dtype=dtype))).all()
    x[5] = float("inf")
    assert torch.isposinf(KERNEL.run(x, w, torch.empty(64, dtype=dtype))).all()


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    """Each row is summed by one thread in a fixed order: bit-identical with 1 or 2 threads."""
    w = torch.randn(4099, 300).half()
    x = torch.randn(300).half()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL.run(x, w, torch.empty(4099, dtype=torch.half))
        torch.set_num_threads(2)
        two = KERNEL.run(x, w, torch.empty(4099, dtype=torch.half))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_fits_only_one_row_inference_products():
    w = torch.randn(128, 64)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        assert matvec.fits(x, w)
        assert not matvec.fits(torch.randn(2, 64), w)  # two float32 rows: torch's BLAS
        assert matvec.fits(torch.randn(2, 64).half(), w.half())  # two float16 rows: the prompt kernel
        assert not matvec.fits(x, w, torch.zeros(128))  # bias
        assert not matvec.fits(x.half(), w)  # mixed dtypes
        assert not matvec.fits(x.double(), w.double())  # no float64 kernel
        assert not matvec.fits(x, w.t().contiguous().t())  # column-major weight
        assert not matvec.fits(torch.randn(1, 8), torch.randn(4, 8))  # too small to matter
        assert not matvec.fits(x.to("meta"), w.to("meta"))  # not on the CPU
    # Under autograd the kernel (no backward) is never used.
    assert not matvec.fits(x, w.requires_grad_())


# --- The model ---------------------------------------------------------------------------------


@torch.no_grad()
def _forced_decode_logits(model, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """float32 logits [len(forced), V] of the decode steps that read ``forced`` after ``prompt``:
    one prefill, then one token at a time through the cache (the one-row products)."""
    cache = model.new_cache(len(prompt) + len(forced))
    rows = [model(torch.tensor([prompt], device=model.device), cache, last_only=True)[0, -1]]
    for t in forced[:-1]:
        rows.append(model(torch.tensor([[t]], device=model.device), cache, last_only=True)[0, -1])
    return torch.stack(rows).float().cpu()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_embedded_model_decodes_the_same_with_the_kernel_and_with_torch(dtype):
    """The embedded model, greedy, 40 tokens: kernel or F.linear, the same ids and close logits.

    Two products of one dtype round differently (ours sums in float32 and rounds once; torch's
    bfloat16 kernels differ between CPUs), so a step whose two best logits are closer than the
    dtype's spacing can be a tie in one and not the other. The greedy ids must then agree up to
    such a step, judged on float32 logits of the same prefix; and fed the same tokens, the two
    paths' logits must agree at every step, their argmax too wherever float32 sees no tie.
    """
    llm = tracer.load(None, device="cpu", dtype=dtype, progress=False)
    expected = "kernel" if KERNEL.available else "torch"
    assert llm.load_trace.meta["matvec"] == expected
    prompt = llm.tokenizer.encode("Once upon a time")
    kw = dict(max_new_tokens=40, do_sample=False, capture="light")
    with_kernel = llm.generate("Once upon a time", **kw)
    forced = with_kernel.new_ids
    kernel_logits = _forced_decode_logits(llm.model, prompt, forced)
    assert fast.use_kernels(llm.model, "torch") == "torch"
    with_torch = llm.generate("Once upon a time", **kw)
    torch_logits = _forced_decode_logits(llm.model, prompt, forced)
    assert (with_kernel.trace.meta["matvec"], with_torch.trace.meta["matvec"]) == (expected, "torch")
    assert len(forced) == len(with_torch.new_ids) == 40

    reference = _forced_decode_logits(tracer.load(None, device="cpu", dtype="float32", progress=False).model, prompt, forced)
    top2 = reference.topk(2, dim=-1).values
    spacing = ULP[getattr(torch, dtype)] * top2[:, 0].abs().clamp(min=1)  # one step of the dtype there
    tie = (top2[:, 0] - top2[:, 1]) <= 2 * spacing  # [40]: steps that the dtype cannot decide

    diverged = next((i for i, (a, b) in enumerate(zip(forced, with_torch.new_ids)) if a != b), None)
    if diverged is not None:
        r = reference[diverged]
        assert bool(tie[diverged]), f"step {diverged}: no near-tie in float32, yet {forced[diverged]} vs {with_torch.new_ids[diverged]}"
        assert abs(float(r[forced[diverged]] - r[with_torch.new_ids[diverged]])) <= 2 * float(spacing[diverged])

    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    torch.testing.assert_close(kernel_logits, torch_logits, atol=tol, rtol=tol)
    # ...and the kernel is no further from float32 than torch's product is (it rounds once).
    kernel_error, torch_error = ((x - reference).abs().max() for x in (kernel_logits, torch_logits))
    assert kernel_error <= 1.5 * torch_error + 1e-5, (float(kernel_error), float(torch_error))
    decided = ~tie
    assert int(decided.sum()) >= 36, f"only {int(decided.sum())} of 40 steps decided in float32"
    assert torch.equal(kernel_logits.argmax(-1)[decided], torch_logits.argmax(-1)[decided])
    # The recorded trace holds what the kernel's run computed.
    steps = [e.top_logits for e in with_kernel.trace.events if e.stage == "decode_step"]
    assert len(steps) >= 39
    for i, e in enumerate(steps, start=1):
        torch.testing.assert_close(torch.tensor(e["values"][:1]), kernel_logits[i, forced[i]].reshape(1), atol=tol, rtol=tol)


@needs_kernel
def test_every_decode_product_of_the_embedded_model_runs_on_the_kernel():
    llm = tracer.load(None, device="cpu", dtype="float16", progress=False)
    model = llm.model
    x = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.float16)
    with torch.inference_mode():
        for name, m in model.named_modules():
            assert type(m) not in (torch.nn.Linear, Stacked), name  # every product swapped
            if isinstance(m, KernelLinear):
                assert matvec.fits(torch.zeros(1, 1, m.in_features, dtype=torch.float16), m.weight), name
        assert isinstance(model.lm_head, KernelLinear) and matvec.fits(x, model.output_weight())


def test_use_kernels_validates_its_argument(monkeypatch):
    llm = tracer.load(None, device="cpu", dtype="float32", progress=False)
    with pytest.raises(ValueError, match="'auto', 'kernel' or 'torch'"):
        fast.use_kernels(llm.model, "fast")
    monkeypatch.setattr("tracer.kernels.library", lambda: kernels.Library(None, "no kernel in this test"))
    with pytest.raises(DeviceError, match="no kernel in this test"):
        fast.use_kernels(llm.model, "kernel")
    assert fast.use_kernels(llm.model, "auto") == "torch"
    assert not any(isinstance(m, (KernelLinear, KernelStacked)) for m in llm.model.modules())
