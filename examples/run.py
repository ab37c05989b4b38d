"""The walkthrough's run.py, on our runtime, with a real chat model.

The walkthrough loads meta-llama/Llama-2-7b-chat-hf in float16 on one GPU, puts a system prompt
and the question into the model's chat format, and runs a text-generation pipeline with sampling
(``tracer.cli.WALKTHROUGH``: do_sample, temperature, top-p, top-k, repetition penalty). This does
the same, offline on a CPU, with SmolLM2-135M-Instruct (an instruction-tuned Llama): the system
prompt and the question go through the checkpoint's own chat template, and it prints, like the
pipeline, the prompt as rendered followed by the answer.

    python examples/run.py                                   # SmolLM2-135M-Instruct, offline
    python examples/run.py --prompt "Why is the sky blue?" --seed 3
    python examples/run.py --seed 0-19 --max-new-tokens 16   # one answer per seed, one load
    python examples/run.py --model embedded                  # the small model trained here (no chat)
    python examples/run.py --model meta-llama/Llama-2-7b-chat-hf   # GPU + access to the gated repo

``--model embedded`` cannot chat: it was trained on books only and never saw a conversation, so it
has no chat template, and Llama 2's ``[INST]`` marker is not one token to it but several ordinary
pieces. It continues a piece of text instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import tracer
from tracer.cli import WALKTHROUGH, WALKTHROUGH_SYSTEM

EMBEDDED = "embedded"  # --model value for tracer.load()'s default model
CHAT_PROMPT = "What is the capital of France?"
TEXT_PROMPT = "It is a truth universally acknowledged"  # for the embedded model: text to continue


def seeds(text: str) -> list[int]:
    """``--seed``: one seed ("3") or an inclusive range ("0-19")."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed (3) or a range of seeds (0-19), got {text!r}") from None
    if hi < lo:
        raise argparse.ArgumentTypeError(f"empty range of seeds {text!r}")
    return list(range(lo, hi + 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2",
                   help=f"'smollm2' (default: a real chat model, offline), '{EMBEDDED}' (the small model "
                        "trained here: it continues text, it cannot chat), a folder, a .gguf file or a hub repo id")
    p.add_argument("--prompt", default=None,
                   help=f"the question (default {CHAT_PROMPT!r}; with --model {EMBEDDED}: text to continue)")
    p.add_argument("--system", default=WALKTHROUGH_SYSTEM, help="the system prompt (chat models)")
    p.add_argument("--max-new-tokens", type=int, default=WALKTHROUGH["max_new_tokens"])
    p.add_argument("--seed", type=seeds, default=None,
                   help="a seed for reproducible sampling, or a range (0-19): one answer per seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = float32 on a CPU, the checkpoint's dtype on CUDA")
    return p


def prompt_kwargs(args) -> dict:
    """The prompt and how to build it: the chat template for a chat model, plain text for the embedded one."""
    if args.model == EMBEDDED:
        return {"prompt": args.prompt or TEXT_PROMPT}
    return {"prompt": args.prompt or CHAT_PROMPT, "chat": True, "system": args.system or None}


def answers(llm, args) -> Iterator[tuple[int | None, tracer.Generation]]:
    """(seed, generation) for each seed asked for (one unseeded generation without --seed)."""
    settings = {k: v for k, v in WALKTHROUGH.items() if k != "max_new_tokens"}
    kw = prompt_kwargs(args)
    room = llm.config.max_position_embeddings - len(llm.encode_prompt(**kw).ids)  # the embedded model: 512
    for seed in args.seed or [None]:
        yield seed, llm.generate(**kw, max_new_tokens=min(args.max_new_tokens, room), seed=seed,
                                 capture="off", **settings)


def why_no_chat(llm) -> str:
    pieces = llm.tokenizer.pieces(llm.tokenizer.encode("[INST]", add_bos=False))
    return (f"note: the {EMBEDDED} model never saw a chat format (no chat template; [INST] is {len(pieces)} "
            f"pieces to it: {' '.join(pieces)}), so it continues the text instead")


def main(argv: list[str] | None = None) -> int:
    """Print the prompt as the model reads it, then the answer (one per seed with a range)."""
    args = build_parser().parse_args(argv)
    try:
        llm = tracer.load(None if args.model == EMBEDDED else args.model, device=args.device, dtype=args.dtype,
                          progress=sys.stderr.isatty())
        if args.model == EMBEDDED:
            print(why_no_chat(llm), file=sys.stderr)
        shown = llm.encode_prompt(**prompt_kwargs(args)).text
        several = args.seed is not None and len(args.seed) > 1
        if several:
            print(shown)
        for seed, gen in answers(llm, args):
            # The pipeline's generated_text: the prompt, then the continuation.
            print(f"--- seed {seed} ---\n{gen.text}" if several else shown + gen.text, flush=True)
    except tracer.TracerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
