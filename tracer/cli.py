"""Command line: ``python -m tracer generate|trace|info``.

Errors the tracer understands (``TracerError``) print one line and exit with status 2; ``--debug``
(before or after the command) shows the traceback too. The library's messages name keyword
arguments (``do_sample=False``); the CLI shows them as the flags to type (``--greedy``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback

from . import dtypes
from .errors import TracerError
from .knobs import KNOBS, SWITCH

# The walkthrough's run.py settings (Llama-2-7b-chat-hf in fp16, text-generation pipeline).
WALKTHROUGH = dict(max_new_tokens=512, do_sample=True, temperature=0.7, top_p=0.95, top_k=40,
                   repetition_penalty=1.1)
WALKTHROUGH_SYSTEM = "You are a helpful, respectful and honest assistant."

# --quantized's words -> tracer.load(quantized=...).
QUANTIZED_WORDS = {dtypes.AUTO: dtypes.AUTO, "yes": True, "no": False}  # tracer.quant.AUTO is dtypes.AUTO

# The library's words for a setting, in its error messages -> the flag a CLI user types. Applied
# in order to every error line the CLI prints (see in_cli_words).
API_TO_FLAGS = (
    # do_sample=True -> --sample, do_sample=False -> --greedy (the switch's words, tracer/knobs.py)
    *((rf"\b{SWITCH.name}={value}\b", f"--{SWITCH.word(value)}") for value in (True, False)),
    (r"\bcapture='(\w+)'", r"--capture \1"),
    (r"\bbudget_bytes=([\d.]+) MB", r"--budget-mb \1"),
    (r"\bpoints=", "--points "),
    (r"\buse chat=False\b", "leave out --chat"),
    (r"\bchat=True\b", "--chat"),
    (r"\bsystem=", "--system"),
    (r"\b(device|dtype|matvec)=('[\w:.]+'(?: or '[\w:.]+')*)", lambda m: f"--{m[1]} " + m[2].replace("'", "")),
    (r"\bgguf_file=NAME \(--gguf-file\)", "--gguf-file NAME"),
    *((rf"\bquantized={value!r}", f"--quantized {word}") for word, value in QUANTIZED_WORDS.items()),
    (r"\btoken=\.\.\.", "--token TOKEN (or set HF_TOKEN)"),
)


def in_cli_words(message: str) -> str:
    """An error message with the API's keyword arguments written as CLI flags (:data:`API_TO_FLAGS`)."""
    for pattern, flag in API_TO_FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def _positive_mb(text: str) -> int:
    """--budget-mb: megabytes (1e6 bytes, as the budget message counts them) -> bytes."""
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of MB, got {text!r}")
    return int(mb * 1e6)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it sets args.debug; absent, the top-level default stays.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--model", default=None,
                   help="'smollm2' (a real chat model, offline), a folder, a .gguf file or a hub repo id "
                        "(default: the small embedded model)")
    p.add_argument("--gguf-file", default=None, help="which GGUF file of a folder or hub repo holding several")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=dtypes.AUTO, choices=[dtypes.AUTO, *dtypes.RUNTIME],
                   help="auto: float32 on a CPU (16-bit where float32 would not fit in memory), the "
                        "checkpoint's dtype on CUDA")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=None, help="hub token for gated repos (or set HF_TOKEN)")
    p.add_argument("--matvec", default="auto", choices=["auto", "kernel", "torch"],
                   help="one-row products of CPU decode: our AVX2 kernel (auto: where it builds) or torch's")
    p.add_argument("--quantized", default=dtypes.AUTO, choices=list(QUANTIZED_WORDS),
                   help="a GGUF's quantized layers: kept as the file's blocks (yes; auto: on a CPU float32 "
                        "load) or dequantized at load as transformers does (no)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="make the prompt a user turn in the model's own chat template (as transformers' "
                        "apply_chat_template with add_generation_prompt); Llama 2's [INST] format for a "
                        "Llama 2 vocabulary without a template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    _add_knob_args(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--walkthrough", action="store_true",
                   help=f"the walkthrough's settings: {as_flags(WALKTHROUGH)}")


def _add_knob_args(p: argparse.ArgumentParser) -> None:
    """A flag per sampling knob (tracer/knobs.py), the switch as one flag per setting; absent, the
    knob keeps the model's default (its generation_config.json, else transformers')."""
    for knob in KNOBS:
        if knob is SWITCH:
            for value, (word, meaning) in zip((True, False), knob.words):
                p.add_argument(f"--{word}", dest=knob.name, action="append_const", const=value,
                               help=f"{meaning} ({knob.name}={value})")
        else:
            p.add_argument(knob.flag, dest=knob.name, type=knob.type, default=None,
                           help=f"{knob.help} (transformers' default: {knob.default})")


def as_flags(settings: dict) -> str:
    """Keyword arguments as the flags that give them: ``{"top_k": 40}`` -> ``--top-k 40``."""
    flags = []
    for name, value in settings.items():
        if name == SWITCH.name:
            flags.append(f"--{SWITCH.word(value)}")
        else:
            flags.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tracer", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation")
    _add_model_args(g)
    _add_generation_args(g)
    g.add_argument("--json", action="store_true", help="print a JSON result")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles on the first step)")

    t = sub.add_parser("trace", help="generate and save the trace folder")
    _add_model_args(t)
    _add_generation_args(t)
    t.add_argument("--out", required=True, help="trace folder to write")
    t.add_argument("--capture", default="light", choices=["light", "full"])
    t.add_argument("--points", action="append", default=[], help="hook-point glob (with --capture full)")
    t.add_argument("--budget-mb", dest="budget_bytes", type=_positive_mb, default=None, metavar="MB",
                   help="most MB of tensors --capture full keeps (default 512 MiB)")
    t.add_argument("--lens", action="store_true", help="record the logit lens per layer")

    i = sub.add_parser("info", help="show a checkpoint's config and memory arithmetic")
    _add_model_args(i)
    return parser


def _generation_kwargs(args) -> dict:
    kw = dict(WALKTHROUGH) if args.walkthrough else {}
    switch = set(getattr(args, SWITCH.name) or ())
    if len(switch) > 1:
        raise TracerError(f"--{SWITCH.word(True)} and --{SWITCH.word(False)} contradict each other; pick one")
    if switch:
        kw[SWITCH.name] = switch.pop()
    for name in ("max_new_tokens", *(k.name for k in KNOBS if k is not SWITCH), "seed"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.chat:
        kw["chat"] = True
        kw["system"] = args.system if args.system is not None else (WALKTHROUGH_SYSTEM if args.walkthrough else None)
    elif args.system is not None:
        raise TracerError("--system needs --chat")
    return kw


def _load(args):
    from .api import load

    return load(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                token=args.token, gguf_file=args.gguf_file, progress=sys.stderr.isatty(),
                compile=getattr(args, "compile", False), matvec=args.matvec,
                quantized=QUANTIZED_WORDS[args.quantized])


def _check_capture(args) -> None:
    """What the library would refuse in the capture flags (--points without --capture full, a
    point name that matches nothing) fails before the weights load: minutes for a 7B model."""
    from .generate import CaptureOptions
    from .hooks import HookPoint, HookRegistry, point_names

    CaptureOptions(policy=args.capture, points=tuple(args.points))
    if not args.points:
        return
    _, cfg = _read_config(args)
    registry = HookRegistry(HookPoint(n) for n in point_names(cfg.num_hidden_layers))
    try:
        registry.select(args.points)
    except TracerError as exc:
        raise type(exc)(f"--points: {exc}") from exc


def _read_config(args):
    """The checkpoint the model flags name, and its config (no weights read)."""
    from .api import embedded_path
    from .checkpoint import read_config
    from .resolution import resolve

    resolved = resolve(args.model or embedded_path(), revision=args.revision, token=args.token,
                       gguf_file=args.gguf_file)
    return resolved, read_config(resolved)


def run(args) -> int:
    """Execute a parsed command; returns the exit status."""
    if args.command == "info":
        resolved, cfg = _read_config(args)
        info = {"resolve": resolved.summary(), "config": cfg.summary(), "memory": cfg.memory_table()}
        if resolved.format == "gguf":  # what the file holds: a CPU load keeps its quantized blocks
            from .gguf_file import GGUFFile

            info["stored"] = GGUFFile.open(resolved.weight_files[0]).stored()
        print(json.dumps(info, indent=2, default=str))
        return 0
    kw = _generation_kwargs(args)  # contradictory flags fail before the load
    if args.command == "trace":
        _check_capture(args)
    llm = _load(args)
    if args.command == "generate":
        gen = llm.generate(args.prompt, capture="off", **kw)
        if args.json:
            print(json.dumps({"prompt_ids": gen.prompt_ids, "new_ids": gen.new_ids, "text": gen.text,
                              "finish_reason": gen.finish_reason}))
        else:
            print(gen.text)
        return 0
    gen = llm.generate(args.prompt, capture=args.capture, points=tuple(args.points), lens=args.lens,
                       budget_bytes=args.budget_bytes, **kw)
    path = gen.trace.save(args.out)
    print(gen.text)
    print(f"trace: {len(gen.trace)} events ({', '.join(dict.fromkeys(gen.trace.stages))}) -> {path}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tracer`` and the ``llama-tracer`` script."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TracerError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {in_cli_words(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
