"""Train a sentencepiece BPE tokenizer with Llama 2's settings, and encode the corpus with it.

The trainer options mirror the ``trainer_spec``/``normalizer_spec`` stored inside Llama 2's
``tokenizer.model`` (BPE, byte fallback, digits split one by one, identity normalization,
a dummy-prefix space, whitespace kept as is), so the shipped tokenizer behaves like Llama 2's
in every way but vocabulary size.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import torch

LLAMA2_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    treat_whitespace_as_suffix=False,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    character_coverage=0.99995,
    # Llama 2 has every digit as a piece; our corpus has so few 4s and 5s that coverage alone
    # would leave them to byte fallback.
    required_chars="0123456789",
)


def _lines(paragraphs: Iterable[str]) -> Iterator[str]:
    # Llama 2's tokenizer was trained on lines, so "\n" never became a piece and is encoded by
    # byte fallback as <0x0A>. Feeding lines keeps that behaviour.
    for para in paragraphs:
        for line in para.split("\n"):
            if line:
                yield line


def train_tokenizer(paragraphs: list[str], out_path: Path, vocab_size: int, seed: int = 0) -> Path:
    """Trains the tokenizer on ``paragraphs`` and writes ``tokenizer.model`` to ``out_path``.

    ``vocab_size`` counts everything: 3 specials, 256 byte-fallback pieces and the merges.
    The result is deterministic for a given input (BPE merges are greedy; all input is used).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: 259 ids go to specials and bytes")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(paragraphs),
        model_writer=model,
        vocab_size=vocab_size,
        # All sentences, in order: no sampling, so no randomness in what the trainer sees.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # Austen's paragraphs are single long lines; keep them instead of skipping them.
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
        **LLAMA2_TRAINER_OPTIONS,
    )
    out_path.write_bytes(model.getvalue())
    return out_path


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Loads a trained ``tokenizer.model``."""
    return spm.SentencePieceProcessor(model_file=str(path))


def encode_stream(sp: spm.SentencePieceProcessor, paragraphs: list[str]) -> torch.Tensor:
    """Encodes paragraphs into one int64 token stream, each paragraph as ``<s> tokens </s>``.

    Every paragraph starts with BOS, as a prompt does at inference time, so the model learns
    what text looks like right after BOS; ending each with EOS (as Llama's pretraining ends each
    document) teaches it to stop at a natural end instead of running on into a new paragraph.
    """
    ids: list[int] = []
    for para_ids in sp.encode(paragraphs):
        ids.append(sp.bos_id())
        ids.extend(para_ids)
        ids.append(sp.eos_id())
    return torch.tensor(ids, dtype=torch.int64)
