"""The whole recipe, corpus to shipped folder, as one function the CLI and the tests call."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.machine import cpu_model
from tools.train_tiny.corpus import Corpus
from tools.train_tiny.export import export_model, write_log_csv
from tools.train_tiny.tokenizer import encode_stream, load_tokenizer, train_tokenizer
from tools.train_tiny.train import TrainSettings, train

SUMMARY_FILE = "run_summary.json"


def scored_targets(stream: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The tokens a model is scored on: every token but the first, BOS excluded (as in training)."""
    targets = stream[1:]
    return targets[targets != bos_id]


def unigram_baseline(train_stream: torch.Tensor, heldout_stream: torch.Tensor, vocab_size: int, bos_id: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one smoothed train frequencies.

    This is the best a model that ignores context entirely can do (up to smoothing): the bar a
    language model must clear to show it learned anything about sequences.
    """
    counts = torch.bincount(scored_targets(train_stream, bos_id), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[scored_targets(heldout_stream, bos_id)].mean())


def run(
    settings: TrainSettings,
    corpus: Corpus,
    workdir: Path,
    out_dir: Path,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """Tokenizer, training and export; returns the run summary (also written to the workdir).

    The summary holds everything the model card reports; the fp32 weights are kept in the
    workdir too, so the card can be rewritten later without retraining.
    """
    workdir, out_dir = Path(workdir), Path(out_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_paras, heldout_paras = corpus.split()
    tok_path = train_tokenizer(train_paras, workdir / "tokenizer" / "tokenizer.model", settings.vocab_size, settings.seed)
    sp = load_tokenizer(tok_path)
    train_stream = encode_stream(sp, train_paras)
    heldout_stream = encode_stream(sp, heldout_paras)
    t_prep = time.perf_counter() - t0

    result = train(settings, train_stream, heldout_stream, on_log=on_log)
    torch.save(result.model.state_dict(), workdir / "model_fp32.pt")
    export_model(result.model, tok_path, out_dir)
    write_log_csv(result.log, out_dir / "training_log.csv")

    cfg = result.model.config
    final = result.log[-1]
    tokens_per_step = settings.batch_size * settings.seq_len
    summary = {
        "settings": settings.as_dict(),
        "num_parameters": cfg.num_parameters,
        "param_counts": cfg.param_counts(),
        "corpus": {
            "stats": corpus.stats(),
            "sources": [
                {"file": s.name, "sha256": s.sha256, "license": s.license} for s in corpus.sources
            ],
            "train_paragraphs": len(train_paras),
            "heldout_paragraphs": len(heldout_paras),
            "train_bytes": sum(len(p.encode("utf-8")) for p in train_paras),
            "heldout_bytes": sum(len(p.encode("utf-8")) for p in heldout_paras),
            "train_tokens": len(train_stream),
            "heldout_tokens": len(heldout_stream),
            "heldout_scored_tokens": len(scored_targets(heldout_stream, sp.bos_id())),
        },
        "tokens_seen": settings.steps * tokens_per_step,
        "epochs": settings.steps * tokens_per_step / len(train_stream),
        "final_train_loss": final["train_loss"],
        "final_heldout_loss": final["heldout_loss"],
        "final_heldout_perplexity": math.exp(final["heldout_loss"]),
        "final_train_perplexity": math.exp(final["train_loss"]),
        "unigram_heldout_loss": unigram_baseline(train_stream, heldout_stream, sp.vocab_size(), sp.bos_id()),
        "train_seconds": result.seconds,
        "prepare_seconds": t_prep,
        "hardware": {
            "cpu": cpu_model(),
            "threads": settings.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
