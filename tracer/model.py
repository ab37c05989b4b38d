"""Stage 3 and 5-6 of the walkthrough: the Llama network itself, written to be read.

embedding -> N x [RMSNorm -> attention (RoPE, GQA, KV cache) -> add -> RMSNorm -> SwiGLU MLP -> add]
-> final RMSNorm -> lm_head.

Numerics follow transformers' ``modeling_llama.py`` where it matters for agreement: RMSNorm in
float32 then back to the input dtype before the weight; cos/sin computed in float32 then cast;
softmax of the explicit attention path in float32.

Shape alphabet: B batch, T new tokens, S keys (cached + new), D hidden, H query heads, Hkv KV heads,
hd head dim, F intermediate, V vocab, L layers.

This is the one path through the network, and every traced run takes it. The fast path lives
beside it (``tracer/fast.py``): a static-shape decode step built from these layers' pieces, and
faster products put in place of :class:`Stacked` and ``nn.Linear``; nothing here knows of it.
Speed notes that do belong here: q/k/v and gate/up are one product each (:class:`Stacked`) while
their weights stay the checkpoint's separate tensors, so that on the CPU every weight is a view of
the mapped file; the KV cache is preallocated; hook points cost one list check when nothing is
attached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import hooks
from .config import LlamaConfig
from .hooks import HookPoint

# ---------------------------------------------------------------------------------------------
# Rotary position embedding (math as small functions)


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [hd/2] (float32) for ``cfg.rope``; ``seq_len`` matters for 'dynamic'."""
    rope, dim = cfg.rope, cfg.head_dim
    base = rope.theta
    if rope.rope_type == "dynamic":
        # NTK-aware scaling raises the base only once the sequence outgrows the trained length.
        seq = max(seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        scale = (rope.factor * seq / cfg.max_position_embeddings) - (rope.factor - 1)
        base = base * scale ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        # Linear scaling stretches positions; dividing the frequencies is the same thing.
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    if rope.freq_factors is not None:
        # A GGUF's rope_freqs tensor (Llama 3.1's scaling as llama.cpp stores it): one divisor per
        # frequency, applied as llama.cpp applies it.
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by ``factor``, short kept,
    the band between interpolated smoothly."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, hd] for integer ``positions`` [T], computed in float32, cast last."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]: each frequency serves a pair (i, i + hd/2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: RoPE rotates pairs (i, i+hd/2), as HF does."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, heads, hd] by position; cos/sin are [T, hd] or already [1, T, 1, hd]."""
    if cos.dim() == 2:
        cos = cos[None, :, None, :]  # [1, T, 1, hd]
        sin = sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values, one [B, Hkv, max_len, hd] tensor per layer for each.

    Sized for the length a generation asks for, not for ``max_position_embeddings`` (a Llama 3
    config says 131072). ``length`` counts the positions already written; the next forward writes
    from position ``length`` on. One tensor per layer (not one [L, ...] block) lets the static
    decode step (``tracer/fast.py``) write each layer's slots in place: a write into a slice of one
    shared block would copy the whole block there, every step.
    """

    def __init__(
        self, cfg: LlamaConfig, max_len: int, *, batch: int = 1, device=None, dtype=torch.float32
    ) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        # RoPE tables for every position this cache can hold, computed once.
        inv_freq = rope_inv_freq(cfg, max_len)
        positions = torch.arange(max_len, device=device)
        self.cos, self.sin = rope_cos_sin(inv_freq, positions, dtype)

    @property
    def k(self) -> torch.Tensor:
        """Every layer's keys stacked, [L, B, Hkv, max_len, hd] (a copy, for inspection)."""
        return torch.stack(self.keys)

    @property
    def v(self) -> torch.Tensor:
        """Every layer's values stacked, [L, B, Hkv, max_len, hd] (a copy, for inspection)."""
        return torch.stack(self.values)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (keys, values), each [B, Hkv, max_len, hd]: every slot, written or not."""
        return self.keys[i], self.values[i]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new ``k``/``v`` [B, Hkv, T, hd] of ``layer`` at positions ``start``.. and return
        views of that layer's keys and values so far, [B, Hkv, start + T, hd]."""
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget positions >= ``length`` (used to branch from an earlier step)."""
        self.length = min(self.length, length)

    def clone(self) -> KVCache:
        """An independent copy (for branching generation)."""
        other = object.__new__(KVCache)
        other.keys = [t.clone() for t in self.keys]
        other.values = [t.clone() for t in self.values]
        other.max_len, other.length = self.max_len, self.length
        other.cos, other.sin = self.cos, self.sin  # read-only tables are shared
        return other

    def bytes_used(self) -> int:
        """Bytes of the positions written so far (K and V, all layers)."""
        return self.bytes_allocated // self.max_len * self.length  # arithmetic: read per traced step

    @property
    def bytes_allocated(self) -> int:
        first = self.keys[0]
        return 2 * len(self.keys) * first.numel() * first.element_size()


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 then cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Stacked(nn.Module):
    """Several linear layers applied to one input, their outputs side by side on the last dim:
    what one layer with the weights stacked would give (q, k and v; gate and up), without stacking
    them. A fused [q + 2 kv, D] matrix would have to be copied together at every load, because a
    hub checkpoint stores them apart (k, o, q, v in name order): 12% of a Llama's weights.

    A module with no parameters of its own, so that a faster product can take its place
    (``tracer/fast.py``: one call for all of them).
    """

    def forward(self, x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
        return torch.cat([F.linear(x, m.weight, m.bias) for m in layers], dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, hd] -> [B, Hkv * n_rep, S, hd]: each KV head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    B, Hkv, S, hd = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, hd).reshape(B, Hkv * n_rep, S, hd)


def causal_mask(T: int, start: int, device) -> torch.Tensor | None:
    """Boolean [T, start + T] mask: new token i (at position start + i) sees keys 0..start + i.

    The mask is rectangular because the queries are only the T new tokens while the keys are every
    cached position too. For one decode token (T == 1) every key is visible, so no mask is needed.
    """
    if T == 1:
        return None
    rows = torch.arange(T, device=device)[:, None] + start
    cols = torch.arange(start + T, device=device)[None, :]
    return cols <= rows


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Explicit attention weights [B, H, T, S] (softmax in float32), for when the pattern is wanted."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention [B, H, T, hd] of q [B, H, T, hd] (positions from ``start``) over k/v
    [B, Hkv, start + T, hd], on torch's fused attention (no pattern materialised)."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    if T == 1:
        # One decode token sees every key, so no mask: the n_rep query heads sharing a KV head
        # become n_rep query rows of one attention call (same math as repeat_kv, without copying
        # the cache; several times faster on the CPU, where SDPA is slow for one query row).
        z = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, hd), k, v, scale=scale)
        return z.reshape(B, H, 1, hd)
    # Prefill from position 0 is plainly causal; a chunk after a past needs the rectangular mask.
    mask = causal_mask(T, start, q.device) if start > 0 else None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=H != Hkv
    )


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE and a KV cache."""

    def __init__(self, cfg: LlamaConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.wq = nn.Linear(D, self.q_size, bias=bias, device=device, dtype=dtype)
        self.wk = nn.Linear(D, self.kv_size, bias=bias, device=device, dtype=dtype)
        self.wv = nn.Linear(D, self.kv_size, bias=bias, device=device, dtype=dtype)
        self.qkv = Stacked()  # q_proj, k_proj and v_proj: three matrices, one product
        self.wo = nn.Linear(self.q_size, D, bias=bias, device=device, dtype=dtype)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.hook_q = HookPoint(hooks.ATTN_Q.at(layer))
        self.hook_k = HookPoint(hooks.ATTN_K.at(layer))
        self.hook_v = HookPoint(hooks.ATTN_V.at(layer))
        self.hook_pattern = HookPoint(hooks.ATTN_PATTERN.at(layer))
        self.hook_z = HookPoint(hooks.ATTN_Z.at(layer))
        self.hook_out = HookPoint(hooks.ATTN_OUT.at(layer))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, cache: KVCache | None
    ) -> torch.Tensor:
        """Attention output [B, T, D] for ``x`` [B, T, D] at positions ``start``..start + T - 1.

        With a ``cache`` the new keys and values are stored in it and the tokens attend to every
        position so far; without one they attend to each other only.
        """
        q, k, v = self.project(x, cos, sin)  # [B, H, T, hd], [B, Hkv, T, hd], [B, Hkv, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # [B, Hkv, S, hd], S = start + T
        if self.hook_pattern.fns:
            # Explicit probabilities, only for layers whose pattern someone asked for.
            n_rep = self.n_heads // self.n_kv
            mask = causal_mask(q.shape[2], start, x.device)
            probs = self.hook_pattern(attention_probs(q, repeat_kv(k, n_rep), mask, self.scale))  # [B, H, T, S]
            z = torch.matmul(probs, repeat_kv(v, n_rep))  # [B, H, T, hd]
        else:
            z = sdpa_attention(q, k, v, start, self.scale)  # [B, H, T, hd]
        return self.output(z)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, H, T, hd] and keys, values [B, Hkv, T, hd] of ``x`` [B, T, D]: the
        projections, RoPE on queries and keys, and their hook points."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv(x, self.wq, self.wk, self.wv).view(B, T, H + 2 * Hkv, hd)  # [B, T, H+2*Hkv, hd]
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)  # [B, T, H+Hkv, hd], [B, T, Hkv, hd]
        # q and k heads are rotated together: one set of RoPE ops serves both.
        q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=2)  # [B, T, H, hd], [B, T, Hkv, hd]
        return self.hook_q(q).transpose(1, 2), self.hook_k(k).transpose(1, 2), self.hook_v(v).transpose(1, 2)

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """The heads' outputs ``z`` [B, H, T, hd] side by side, through o_proj: [B, T, D]."""
        B, _, T, _ = z.shape
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, hd]
        return self.hook_out(self.wo(z.reshape(B, T, self.q_size)))  # [B, T, D]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up computed as one product."""

    def __init__(self, cfg: LlamaConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.ffn = cfg.intermediate_size
        D, bias = cfg.hidden_size, cfg.mlp_bias
        self.w_gate = nn.Linear(D, self.ffn, bias=bias, device=device, dtype=dtype)
        self.w_up = nn.Linear(D, self.ffn, bias=bias, device=device, dtype=dtype)
        self.gate_up = Stacked()
        self.w_down = nn.Linear(self.ffn, D, bias=bias, device=device, dtype=dtype)
        self.hook_act = HookPoint(hooks.MLP_ACT.at(layer))
        self.hook_out = HookPoint(hooks.MLP_OUT.at(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x, self.w_gate, self.w_up).split(self.ffn, dim=-1)  # [B, T, F] each
        act = self.hook_act(F.silu(gate) * up)  # [B, T, F]
        return self.hook_out(self.w_down(act))  # [B, T, D]


class Block(nn.Module):
    """One transformer layer: pre-norm attention and pre-norm MLP, each added to the residual."""

    def __init__(self, cfg: LlamaConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.ln1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.attn = Attention(cfg, layer, device, dtype)
        self.ln2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.mlp = MLP(cfg, layer, device, dtype)
        self.hook_ln1 = HookPoint(hooks.LN1.at(layer))
        self.hook_resid_mid = HookPoint(hooks.RESID_MID.at(layer))
        self.hook_ln2 = HookPoint(hooks.LN2.at(layer))
        self.hook_resid_post = HookPoint(hooks.RESID_POST.at(layer))

    def forward(self, x, cos, sin, start: int, cache: KVCache | None):
        """This layer's output [B, T, D] (see :meth:`Attention.forward` for ``start`` and ``cache``)."""
        h = x + self.attn(self.hook_ln1(self.ln1(x)), cos, sin, start, cache)
        h = self.hook_resid_mid(h)
        out = h + self.mlp(self.hook_ln2(self.ln2(h)))
        return self.hook_resid_post(out)


class LlamaModel(nn.Module):
    """The whole network. ``device="meta"`` builds it without allocating any weight."""

    def __init__(self, cfg: LlamaConfig, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        # _weight skips nn.Embedding's random init: the loader (or init_weights) fills it, and
        # normal_ on the meta device would import torch._dynamo, about 2 s of a first load.
        self.embed = nn.Embedding(V, D, _weight=torch.empty(V, D, device=device, dtype=dtype))
        self.blocks = nn.ModuleList(Block(cfg, i, device, dtype) for i in range(cfg.num_hidden_layers))
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, device, dtype)
        self.lm_head = nn.Linear(D, V, bias=False, device=device, dtype=dtype)
        if cfg.tie_word_embeddings:
            # Tied embeddings: the output projection is the input embedding matrix, one Parameter.
            self.lm_head.weight = self.embed.weight
        self.hook_embed = HookPoint(hooks.EMBED.at())
        self.hook_final_norm = HookPoint(hooks.FINAL_NORM.at())
        self.hook_logits = HookPoint(hooks.LOGITS.at())
        # Every module's points, in the order tracer.hooks declares them (which checks they all exist).
        self.hooks = hooks.gather(self.modules(), cfg.num_hidden_layers)

    # The runtime dtype and device are the final norm's: a float vector in every load, where the
    # embedding table may be kept in another form (a quantized load's blocks, tracer.quant).
    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def output_weight(self) -> torch.Tensor:
        """The [V, D] matrix that turns a hidden state into logits (lm_head's, maybe the embedding)."""
        return self.lm_head.weight

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """final_norm then lm_head — also what the logit lens applies to each layer's residual."""
        return self.lm_head(self.final_norm(h))

    def allocate(self, device) -> LlamaModel:
        """Give every parameter of a model built on the meta device uninitialised storage on
        ``device`` (as ``nn.Module.to_empty`` does, but without the half second that its first
        call spends importing torch's symbolic-shape machinery). A tied parameter stays one
        parameter. Returns the model."""
        allocated: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in allocated:
                    storage = torch.empty(p.shape, dtype=p.dtype, device=device)
                    allocated[id(p)] = nn.Parameter(storage, requires_grad=p.requires_grad)
                setattr(module, name, allocated[id(p)])
        return self

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        """A KV cache on this model's device and dtype for ``max_len`` positions."""
        return KVCache(self.config, max_len, batch=batch, device=self.device, dtype=self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] for ``input_ids`` [B, T].

        Without a cache the tokens sit at positions 0..T-1. With a cache they continue at
        ``cache.length``, their keys and values are stored, and ``cache.length`` advances by T.
        ``last_only`` computes logits for the last position only (what generation needs).
        """
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is None:
            positions = torch.arange(T, device=input_ids.device)
            cos, sin = rope_cos_sin(rope_inv_freq(self.config, T), positions, self.dtype)
        else:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {start + T}")
            cos, sin = cache.cos[start : start + T], cache.sin[start : start + T]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, T, 1, hd], for every layer

        h = self.hook_embed(self.embed(input_ids))  # [B, T, D]
        for block in self.blocks:
            h = block(h, cos, sin, start, cache)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]  # [B, 1, D]
        h = self.hook_final_norm(self.final_norm(h))
        return self.hook_logits(self.lm_head(h))  # [B, T, V]


@torch.no_grad()
def init_weights(model: LlamaModel, generator: torch.Generator | None = None) -> None:
    """Random init as transformers does: normal(0, initializer_range) for matrices, ones for norms."""
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            p.normal_(0.0, std, generator=generator)
        elif "ln" in name or "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
