"""``python -m tools.train_tiny``: rebuild the embedded model from scratch.

    python -m tools.train_tiny                       # the shipped recipe (~30 min on 2 CPU cores)
    python -m tools.train_tiny --card-only           # rewrite MODEL_CARD.md and the plot
    python -m tools.train_tiny --text-file tools/train_tiny/smoke.txt --tiny --steps 12 \
        --no-card --workdir /tmp/w --out /tmp/m      # a smoke run: seconds, no downloads

Run from a clone of the repository: the recipe is not part of the installed package, and by
default it rewrites this repository's tracer/embedded/. Progress goes to stdout. Process-wide
settings (torch threads, the global seed) are made here, in the entry point, and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tools.train_tiny.train import TrainSettings

DEFAULT_WORKDIR = Path.home() / ".cache" / "llama-tracer" / "train_tiny"
# The source tree's embedded model (tools/train_tiny/ -> the repository root -> tracer/embedded).
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tracer" / "embedded"

# A model small enough to train in seconds, for tests and smoke runs on a few KB of text.
TINY_OVERRIDES = dict(
    vocab_size=512, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    batch_size=4, seq_len=32, warmup_steps=2, eval_every=5,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="downloads, corpus, tokenizer and fp32 weights (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the hub-style folder to write (default: %(default)s)")
    p.add_argument("--text-file", type=Path, help="train on this plain-text file instead of downloading the corpus")
    p.add_argument("--tiny", action="store_true", help="a very small model (for tests and smoke runs)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, help="seed for weights and data order")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite MODEL_CARD.md and training_loss.png from the workdir's run summary")
    p.add_argument("--no-card", action="store_true", help="skip the model card (and its sample generations)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The recipe's settings with the command line's overrides applied."""
    s = TrainSettings()
    if args.tiny:
        s = replace(s, **TINY_OVERRIDES)
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.seed is not None:
        s = replace(s, seed=args.seed)
    return s


def _print_row(row: dict) -> None:
    print(
        f"step {row['step']:5d}  train {row['train_loss']:.4f}  held-out {row['heldout_loss']:.4f}  "
        f"lr {row['lr']:.2e}  {row['seconds']:7.1f}s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    # Imported here so that --help is instant.
    from tools.train_tiny import pipeline
    from tools.train_tiny.corpus import corpus_from_text, prepare_corpus

    if args.card_only:
        from tools.train_tiny import card

        summary = json.loads((args.workdir / pipeline.SUMMARY_FILE).read_text(encoding="utf-8"))
        card.write_card(args.out, summary)
        print(f"wrote {args.out / card.CARD_FILE}")
        return 0

    settings = settings_from_args(args)
    # The process is ours: pin torch's thread count (float sums depend on how work is split)
    # and seed the global RNG, so the same command gives the same losses.
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if args.text_file is not None:
        corpus = corpus_from_text(args.text_file.read_text(encoding="utf-8"), args.text_file.stem)
    else:
        print(f"preparing corpus in {args.workdir}", flush=True)
        corpus = prepare_corpus(args.workdir)
    for source, stats in corpus.stats().items():
        print(f"  {source}: {stats['documents']} documents, {stats['bytes']:,} bytes", flush=True)
    params = settings.model_config().num_parameters
    print(f"training {params:,} parameters for {settings.steps} steps", flush=True)
    summary = pipeline.run(settings, corpus, args.workdir, args.out, on_log=_print_row)
    print(
        f"done in {summary['train_seconds']:.0f}s: held-out {summary['final_heldout_loss']:.4f} "
        f"nats/token (unigram baseline {summary['unigram_heldout_loss']:.4f})",
        flush=True,
    )
    if not args.no_card:
        # Imported only now: the card samples text with the runtime, and a long run should pick
        # up the card code as it is when training ends.
        from tools.train_tiny import card

        card.write_card(args.out, summary)
        print(f"wrote {args.out / card.CARD_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
