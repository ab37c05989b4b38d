"""The walkthrough's run.py, on our runtime.

The walkthrough loads meta-llama/Llama-2-7b-chat-hf in float16 on one GPU, wraps the prompt in the
Llama 2 system-prompt template and runs a text-generation pipeline with
max_new_tokens=512, do_sample=True, temperature=0.7, top_p=0.95, top_k=40, repetition_penalty=1.1.
This does the same with ``tracer`` (on the embedded model unless --model is given) and prints, like
the pipeline, the prompt followed by the generated text.

    python examples/run.py                                         # embedded model, CPU
    python examples/run.py --model meta-llama/Llama-2-7b-chat-hf   # GPU + access to the gated repo
"""

from __future__ import annotations

import argparse
import sys

import tracer
from tracer.cli import WALKTHROUGH, WALKTHROUGH_SYSTEM

PROMPT_TEMPLATE = "[INST] <<SYS>>\n" + WALKTHROUGH_SYSTEM + "\n<</SYS>>\n{prompt}[/INST]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="folder or hub repo id (default: embedded model)")
    parser.add_argument("--prompt", default="Tell me about the Bennet sisters.")
    parser.add_argument("--max-new-tokens", type=int, default=WALKTHROUGH["max_new_tokens"])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto = the checkpoint's dtype on CUDA (fp16)")
    args = parser.parse_args()

    llm = tracer.load(args.model, device=args.device, dtype=args.dtype)
    settings = {k: v for k, v in WALKTHROUGH.items() if k != "max_new_tokens"}
    # Keep within the model's context: the embedded model is small.
    budget = llm.config.max_position_embeddings - len(llm.tokenizer.encode(PROMPT_TEMPLATE.format(prompt=args.prompt)))
    text = PROMPT_TEMPLATE.format(prompt=args.prompt)
    try:
        gen = llm.generate(text, max_new_tokens=min(args.max_new_tokens, budget), seed=args.seed, **settings)
    except tracer.TracerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text + gen.text)  # the pipeline's generated_text: prompt + continuation
    return 0


if __name__ == "__main__":
    sys.exit(main())
