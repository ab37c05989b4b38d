"""Finding attention heads by what they do, and testing them by removing them (notebook 04).

Trained transformers grow a few kinds of heads that can be recognised from their attention
weights alone (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et
al. 2022, "In-context Learning and Induction Heads"):

- **first-token heads** put most of their weight on position 0. A head with nothing useful to read
  parks its weight there (an "attention sink", Xiao et al. 2023), so its output changes little;
- **previous-token heads** put their weight on the token just before: each position learns what
  came before it;
- **induction heads** complete a repeat: at the second ``A`` of ``A B ... A`` they attend to the
  ``B`` that followed the first ``A``, and so predict ``B`` again. The classic test is a random
  token sequence repeated twice: nothing but copying can predict the second copy.

Each score is a pure function of attention weights ``[..., T, S]`` (any leading dims, e.g. every
layer and head ``[L, H, T, S]``) from one forward without a cache (S == T), and returns ``[...]``:
the mean weight a head puts where that kind of head looks, a number from 0 to 1.
:func:`uniform_pattern` gives the baseline of a head that spreads its weight evenly. The helpers
below them use only the model's hook points: ``blocks.*.attn.pattern`` to read the weights,
``blocks.*.resid_post`` for the logit lens, and ``blocks.{i}.attn.z`` (each head's output before
``o_proj``) to zero heads and see what the model loses without them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..hooks import ATTN_PATTERN, ATTN_Z, RESID_POST

# ---------------------------------------------------------------------------------------------
# The test sequence


@dataclass(frozen=True)
class RepeatedTokens:
    """``prefix`` tokens (BOS, when the tokenizer adds one), then ``period`` random tokens twice."""

    ids: list[int]
    prefix: int
    period: int
    seed: int

    @property
    def second_copy(self) -> range:
        """Positions of the second copy."""
        return range(self.prefix + self.period, self.prefix + 2 * self.period)

    @property
    def predictable(self) -> range:
        """Positions whose token copying can predict: the second copy but its first token (which
        follows the first copy's last token, a pair never seen before)."""
        return range(self.prefix + self.period + 1, self.prefix + 2 * self.period)


def repeated_random_tokens(tokenizer, period: int = 50, *, seed: int = 0) -> RepeatedTokens:
    """``period`` distinct random token ids (no special tokens), drawn with a seeded generator,
    repeated twice; BOS first exactly when the tokenizer adds it to text (``add_bos_token``).

    Distinct ids make the induction target unique: each token of the second copy occurred once
    before, followed by one known token."""
    banned = set(tokenizer.special_tokens.values()) | {tokenizer.bos_id, tokenizer.eos_id}
    order = torch.randperm(tokenizer.vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    seq = [i for i in order if i not in banned][:period]
    head = [tokenizer.bos_id] if tokenizer.add_bos_token else []
    return RepeatedTokens(head + seq + seq, len(head), period, seed)


# ---------------------------------------------------------------------------------------------
# Scores: attention weights [..., T, S] -> [...]


def _square(patterns: torch.Tensor) -> torch.Tensor:
    p = patterns.detach().float().cpu()
    if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"scores want the weights of a forward without a cache, [..., T, T]; "
                         f"got shape {tuple(p.shape)}")
    return p


def first_token_score(patterns: torch.Tensor) -> torch.Tensor:
    """Mean weight on position 0, over the queries 1..T-1 (query 0 can only see itself)."""
    return _square(patterns)[..., 1:, 0].mean(-1)


def previous_token_score(patterns: torch.Tensor) -> torch.Tensor:
    """Mean weight of query i on key i - 1, over the queries 1..T-1."""
    return torch.diagonal(_square(patterns), offset=-1, dim1=-2, dim2=-1).mean(-1)


def induction_score(patterns: torch.Tensor, period: int, *, prefix: int = 0) -> torch.Tensor:
    """On a sequence repeated twice after ``prefix`` tokens: mean weight of each query q in the
    second copy on key q - period + 1, the token that followed q's token in the first copy."""
    p = _square(patterns)
    q = torch.arange(prefix + period, min(prefix + 2 * period, p.shape[-1]))
    if len(q) == 0:
        raise ValueError(f"no second copy: {p.shape[-1]} tokens, prefix {prefix}, period {period}")
    return p[..., q, q - period + 1].mean(-1)


def uniform_pattern(T: int) -> torch.Tensor:
    """The baseline head [T, T]: every query spreads its weight evenly over the keys it may see."""
    mask = torch.ones(T, T).tril()
    return mask / mask.sum(-1, keepdim=True)


@dataclass(frozen=True)
class Head:
    """One attention head and its score; ``name`` is "layer.head" (as in the papers)."""

    layer: int
    head: int
    score: float

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.head}"


def top_heads(scores: torch.Tensor, k: int = 3) -> list[Head]:
    """The ``k`` highest-scoring heads of an [L, H] score grid, best first."""
    H = scores.shape[1]
    values, flat = scores.flatten().topk(min(k, scores.numel()))
    return [Head(int(i) // H, int(i) % H, float(v)) for v, i in zip(values, flat, strict=True)]


def control_heads(scores: torch.Tensor, k: int, *, seed: int, exclude=()) -> list[Head]:
    """``k`` heads drawn at random (seeded) among those scoring below the mean of the [L, H] grid,
    but for ``exclude`` ((layer, head) pairs or :class:`Head`): heads not of the kind being tested,
    to remove as a control."""
    skip = set(_pairs(exclude))
    pool = [(layer, h) for layer, h in torch.nonzero(scores < scores.mean()).tolist() if (layer, h) not in skip]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return [Head(*pool[i], float(scores[pool[i]])) for i in order]


def _pairs(heads: Iterable) -> list[tuple[int, int]]:
    return [(h.layer, h.head) if isinstance(h, Head) else (int(h[0]), int(h[1])) for h in heads]


# ---------------------------------------------------------------------------------------------
# On the model, through hook points


def attention_patterns(llm, ids) -> torch.Tensor:
    """Every layer's attention weights for ``ids``, [L, H, T, T] (one forward without a cache).

    Recording ``blocks.*.attn.pattern`` makes each layer compute its weights explicitly."""
    L = llm.config.num_hidden_layers
    with llm.model.hooks.record(ATTN_PATTERN.glob) as rec:
        llm.logits(ids)
    return torch.stack([rec[ATTN_PATTERN.at(i)][0].float() for i in range(L)])


@torch.inference_mode()
def logit_lens_probs(llm, ids, position: int = -1) -> torch.Tensor:
    """The logit lens, [L, V]: each block's output (``resid_post``) at ``position``, read through
    the final norm and lm_head as if it were the last layer, as probabilities. The last row is the
    model's own next-token distribution."""
    L = llm.config.num_hidden_layers
    with llm.model.hooks.record(RESID_POST.glob) as rec:
        llm.logits(ids)
    h = torch.stack([rec[RESID_POST.at(i)][0, position] for i in range(L)])  # [L, D]
    return llm.model.unembed(h.to(llm.device)).float().softmax(-1).cpu()


def first_top_layer(probs: torch.Tensor, token_id: int) -> int | None:
    """The first layer whose top guess (in [L, V] lens probabilities) is ``token_id``; None if none."""
    hits = (probs.argmax(-1) == token_id).nonzero()
    return int(hits[0]) if len(hits) else None


def _by_layer(heads: Iterable) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in _pairs(heads):
        out.setdefault(layer, []).append(head)
    return out


@contextmanager
def zero_heads(llm, heads: Iterable) -> Iterator[None]:
    """Inside the block, the given heads ((layer, head) pairs or :class:`Head`) output zeros.

    A patching hook on ``blocks.{layer}.attn.z`` [B, T, H, hd] returns a copy with those heads'
    outputs zeroed, so ``o_proj`` adds nothing of theirs to the residual stream ("zero
    ablation"). Only those query heads: in GQA the key/value head they share is untouched."""
    with ExitStack() as stack:
        for layer, hs in _by_layer(heads).items():
            def ablate(z: torch.Tensor, point, hs=hs) -> torch.Tensor:
                z = z.clone()
                z[:, :, hs] = 0
                return z

            stack.enter_context(llm.model.hooks.attach(ATTN_Z.at(layer), ablate))
        yield


def token_losses(llm, ids, ablate: Iterable = ()) -> torch.Tensor:
    """[T]: at each position t, -log p(ids[t] | ids[:t]) in nats (NaN at 0, which nothing
    predicts), with the heads in ``ablate`` zeroed (:func:`zero_heads`)."""
    ids = [int(i) for i in ids]
    with zero_heads(llm, ablate):
        logits = llm.logits(ids)  # [T, V]
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
    nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return torch.cat([torch.tensor([float("nan")]), nll])


def loss_on(llm, ids, positions, ablate: Iterable = ()) -> float:
    """Mean loss (nats) on the tokens at ``positions``, with the heads in ``ablate`` zeroed."""
    return float(token_losses(llm, ids, ablate)[list(positions)].mean())
