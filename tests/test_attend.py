"""tracer/attend.py: one decode token's attention over the whole cache, masked or on the CPU kernel,
and when the static step uses the kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cuda import cpu_tests  # noqa: F401  (the fixture)
from test_model import small_model

import tracer
from tracer import attend, fast, kernels
from tracer.fast import StaticStep
from tracer.kernels import Limits

KERNEL = kernels.library()
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One rounding of the float32 result to the storage type, plus float32 summation differences.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# CPU tests: tracer.load without device= fails here (on a GPU host "auto" would be CUDA).
pytestmark = pytest.mark.usefixtures("cpu_tests")


def _inputs(Hkv, n_rep, hd, S, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hkv, n_rep, hd, generator=g).to(dtype)
    k = (2 * torch.randn(1, Hkv, S, hd, generator=g)).to(dtype)  # peaked enough to matter
    v = torch.randn(1, Hkv, S, hd, generator=g).to(dtype)
    return q, k, v


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    Hkv=st.integers(1, 4), n_rep=st.integers(1, 16), hd=st.sampled_from([8, 16, 64, 128, 256]),
    S=st.integers(1, 40), data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99),
)
def test_kernel_matches_the_masked_attention_it_replaces(Hkv, n_rep, hd, S, data, dtype, seed):
    """Slots after the position are garbage (nan, inf): the kernel never reads them, and what it
    computes over the rest is what attend.masked computes over every slot."""
    pos = data.draw(st.integers(0, S - 1))
    q, k, v = _inputs(Hkv, n_rep, hd, S, dtype, seed)
    position = torch.tensor([pos])
    scale = hd**-0.5
    with torch.inference_mode():
        want = attend.masked(q, k, v, position, scale)
        k[:, :, pos + 1 :] = float("nan")
        v[:, :, pos + 1 :] = float("inf")
        assert attend.fits(q, k, v, position, KERNEL.limits)
        got = attend.decode_attention(q, k, v, position, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_kernel
def test_a_cache_slice_with_a_head_stride_is_read_correctly():
    """Keys of a longer cache, sliced to the slots written (the eager layout): rows stay
    contiguous, heads are max_len rows apart."""
    q, k, v = _inputs(2, 3, 16, 32, torch.float16, 0)
    position = torch.tensor([9])
    with torch.inference_mode():
        want = attend.masked(q, k[:, :, :10], v[:, :, :10], position, 0.25)
        assert attend.fits(q, k[:, :, :10], v[:, :, :10], position, KERNEL.limits)
        got = attend.decode_attention(q, k[:, :, :10], v[:, :, :10], position, 0.25)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@needs_kernel
@pytest.mark.parametrize("pos", [-1, 32])
def test_a_position_outside_the_cache_is_refused(pos):
    q, k, v = _inputs(2, 2, 8, 32, torch.float32, 0)
    with torch.inference_mode(), pytest.raises(IndexError, match=f"position {pos} is outside the cache's 32 slots"):
        attend.decode_attention(q, k, v, torch.tensor([pos]), 1.0)


def test_fits_only_what_the_kernel_can_do():
    """Within the limits a library reports (made up here: the real ones are test_kernels' business)."""
    limits = Limits(max_parts=3, max_head_dim=32, head_dim_step=8, max_rep=4)
    q, k, v = _inputs(2, 4, 16, 8, torch.float16, 0)
    pos = torch.tensor([3])
    with torch.inference_mode():
        assert attend.fits(q, k, v, pos, limits)
        assert not attend.fits(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), pos, limits)  # batch
        assert not attend.fits(q[..., :12], k[..., :12], v[..., :12], pos, limits)  # hd not a multiple of 8
        assert not attend.fits(*_inputs(2, 4, 40, 8, torch.float16, 0), pos, limits)  # hd above 32
        assert attend.fits(*_inputs(2, 4, 32, 8, torch.float16, 0), pos, limits)  # hd of 32
        assert not attend.fits(q.float(), k, v, pos, limits)  # mixed dtypes
        assert not attend.fits(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos, limits)  # rows not contiguous
        assert not attend.fits(q, k, v, pos.int(), limits)
        assert not attend.fits(q, k, v, torch.tensor([1, 2]), limits)
        assert not attend.fits(_inputs(1, 5, 16, 8, torch.float16, 0)[0], k[:, :1], v[:, :1], pos, limits)  # n_rep > 4
    assert not attend.fits(q, k, v, pos, limits)  # autograd on


def test_use_kernels_torch_turns_the_attention_kernel_off():
    llm = tracer.load(None, device="cpu", dtype="float32", progress=False)
    assert fast.use_kernels(llm.model, "torch") == "torch"
    assert StaticStep(llm.model).attention is attend.masked
    fast.use_kernels(llm.model, "auto")
    assert isinstance(StaticStep(llm.model).attention, attend.OnKernel) == KERNEL.available


@needs_kernel
def test_the_step_uses_the_kernel_only_for_caches_of_min_keys_or_more():
    """Below attend.MIN_KEYS cached key elements per layer the compiled loops are as fast: the
    static step keeps them. Seen through nan in unwritten value slots, which only the masked torch
    attention multiplies (by a zero weight, giving nan)."""
    model = small_model().to(torch.float16)
    fast.use_kernels(model, "kernel")
    step = StaticStep(model)
    cfg = model.config
    per_slot = cfg.num_key_value_heads * cfg.head_dim
    assert attend.MIN_KEYS % per_slot == 0
    with torch.inference_mode():
        for slots, kernel_used in ((attend.MIN_KEYS // per_slot - 1, False), (attend.MIN_KEYS // per_slot, True)):
            cache = model.new_cache(slots)
            model(torch.tensor([[1, 2, 3]]), cache)
            for t in cache.values:
                t[:, :, 4:] = float("nan")
            logits = step(torch.tensor([[4]]), torch.tensor([3]), cache)
            assert bool(logits.isfinite().all()) == kernel_used, slots


@needs_kernel
def test_a_compiled_step_on_the_kernel_equals_the_eager_step():
    """torch.compile sees the kernel as one opaque op after the cache write it depends on; its logits equal the eager step's."""
    model = small_model().to(torch.float16)
    fast.use_kernels(model, "kernel")
    step = StaticStep(model, attention=attend.OnKernel(KERNEL.limits, min_keys=0))
    compiled = torch.compile(lambda *a: step(*a), dynamic=False)  # the whole step as one graph
    ids = [1, 2, 3, 4, 5]
    with torch.inference_mode():
        a, b = model.new_cache(16), model.new_cache(16)
        model(torch.tensor([ids]), a)
        model(torch.tensor([ids]), b)
        token = torch.tensor([[6]])
        for p in range(len(ids), len(ids) + 4):
            want = step(token, torch.tensor([p]), a)
            got = compiled(token, torch.tensor([p]), b)
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
            # The cache write happened before the kernel read it (compiled RoPE may round a key
            # differently by one float16 step).
            torch.testing.assert_close(b.keys[0][:, :, : p + 1], a.keys[0][:, :, : p + 1], atol=1e-3, rtol=4e-3)
            token = want.argmax(-1, keepdim=True)
