"""The training loop: our own ``tracer.model.LlamaModel``, AdamW, cosine LR with warmup.

Everything is step-count based and seeded (weights, data order), so a run is reproducible on the
same machine and torch version: the same settings give the same losses, bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tracer.config import LlamaConfig
from tracer.model import LlamaModel, init_weights

# Targets equal to this are not scored (see ``_targets``).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainSettings:
    """Model shape and optimisation settings of one training run (the defaults ship)."""

    # Model (Llama with grouped-query attention: 8 query heads share 2 KV heads).
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704  # ~2.75 x hidden, a multiple of 64 (SwiGLU has 3 matrices)
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False  # like Llama 2: a separate lm_head
    # Optimisation.
    # About 25 minutes on 2 idle Zen 4 cores (~2,000 tokens/s in fp32): 2.9M tokens, ~0.75 epoch.
    steps: int = 1400
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 70
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 1234
    threads: int = 2  # torch threads; set by the entry point (__main__), recorded in the card

    def model_config(self) -> LlamaConfig:
        """The LlamaConfig these settings describe (what config.json will say)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="float16",
        )

    def as_dict(self) -> dict:
        """Plain dict, for the run summary."""
        return asdict(self)


@dataclass
class TrainResult:
    """The trained model and its log (one dict per evaluation)."""

    model: LlamaModel
    log: list[dict]
    seconds: float


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def chunk_stream(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cuts a token stream into rows of ``seq_len + 1`` tokens (inputs plus the shifted target).

    Rows overlap by one token so that every token is a target exactly once.
    """
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [n, seq_len + 1]


def _targets(rows: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    # BOS always follows EOS in the stream: predicting it is free and would flatter the loss.
    targets[targets == bos_id] = IGNORE_INDEX
    return inputs, targets


def batches(rows: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of rows, reshuffled each epoch by ``generator`` (the whole data order)."""
    while True:
        order = torch.randperm(len(rows), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[i : i + batch_size]]


@torch.no_grad()
def evaluate(model: LlamaModel, rows: torch.Tensor, bos_id: int, batch_size: int) -> float:
    """Mean cross-entropy (nats per scored token) of ``model`` over all ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        inputs, targets = _targets(rows[i : i + batch_size], bos_id)
        logits = model(inputs)  # [B, T, V]
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train()
    return total / count


def _param_groups(model: LlamaModel, weight_decay: float) -> list[dict]:
    # Decay the matrices only; norm gains (and embeddings, as in most Llama recipes) are not
    # pulled towards zero.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "embed" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    s: TrainSettings,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Trains a fresh model for ``s.steps`` steps; ``on_log`` gets each log row as it is made.

    Log rows: step, train_loss (mean over the steps since the previous row), heldout_loss, lr,
    seconds (wall time since the start of training).
    """
    # No process-wide settings here (threads, global seed): the entry point (__main__) makes them.
    # Weights and data order use their own seeded generators.
    cfg = s.model_config()
    model = LlamaModel(cfg, device="cpu", dtype=torch.float32)
    init_weights(model, torch.Generator().manual_seed(s.seed))
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, fused=False
    )
    train_rows = chunk_stream(train_stream, s.seq_len)
    heldout_rows = chunk_stream(heldout_stream, s.seq_len)
    data = batches(train_rows, s.batch_size, torch.Generator().manual_seed(s.seed + 1))
    bos = cfg.bos_token_id

    log: list[dict] = []
    start = time.perf_counter()
    running, n_running = 0.0, 0
    for step in range(s.steps):
        lr = lr_at(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = _targets(next(data), bos)
        logits = model(inputs)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        running += loss.item()
        n_running += 1
        last = step == s.steps - 1
        if (step + 1) % s.eval_every == 0 or last:
            row = {
                "step": step + 1,
                "train_loss": running / n_running,
                "heldout_loss": evaluate(model, heldout_rows, bos, s.batch_size),
                "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            running, n_running = 0.0, 0
            log.append(row)
            if on_log is not None:
                on_log(row)
    model.eval()
    return TrainResult(model, log, time.perf_counter() - start)
