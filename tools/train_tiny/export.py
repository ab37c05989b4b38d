"""Write the trained model as a Hugging Face hub style Llama folder.

Weights and config.json come from :func:`tracer.checkpoint.save_pretrained` (our parameters
under hub names); this module adds the tokenizer files and generation_config.json that a Llama 2
repo carries, and the training log as CSV.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import torch

from tracer.checkpoint import save_pretrained
from tracer.model import LlamaModel

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
LOG_COLUMNS = ("step", "train_loss", "heldout_loss", "lr", "seconds")


def _added_token(content: str) -> dict:
    # The form transformers 4.x (>= 4.34) writes for Llama 2's special tokens.
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json as current Llama-2 repos ship it (LlamaTokenizer, BOS added, no EOS).

    ``legacy: false`` is what those repos say; it only changes how text right after a special
    token is split. For plain text transformers' AutoTokenizer then gives exactly
    sentencepiece's ids with BOS in front (checked in tests/test_embedded.py).
    """
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {**_added_token(tok), "special": True}
            for i, tok in enumerate(("<unk>", "<s>", "</s>"))
        },
        **SPECIAL_TOKENS,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }


def generation_config(max_length: int) -> dict:
    """generation_config.json: sampling defaults in the spirit of Llama-2-chat's."""
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_length": max_length,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_model(model: LlamaModel, tokenizer_model: Path, out_dir: Path, shards: int = 2) -> list[Path]:
    """Writes weights (fp16, ``shards`` files), config and tokenizer files into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * 2 for p in model.parameters())  # fp16 bytes
    # save_pretrained starts a new shard when the next tensor would overflow the limit. Tensors
    # come in different sizes, so aim a little above an even split to avoid a small extra shard.
    paths = save_pretrained(
        model, out_dir, dtype=torch.float16, max_shard_bytes=math.ceil(1.2 * total / shards)
    )
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    max_len = model.config.max_position_embeddings
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(max_len))
    _write_json(out_dir / "special_tokens_map.json", {k: _added_token(v) for k, v in SPECIAL_TOKENS.items()})
    _write_json(out_dir / "generation_config.json", generation_config(max_len))
    extra = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
    return paths + [out_dir / name for name in extra]


def write_log_csv(log: list[dict], path: Path) -> None:
    """training_log.csv: one row per evaluation, losses in nats per token."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(LOG_COLUMNS)
        for row in log:
            writer.writerow([
                row["step"], f"{row['train_loss']:.5f}", f"{row['heldout_loss']:.5f}",
                f"{row['lr']:.6g}", f"{row['seconds']:.1f}",
            ])


def read_log_csv(path: Path) -> list[dict]:
    """Reads back what :func:`write_log_csv` wrote."""
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {"step": int(r["step"]), "train_loss": float(r["train_loss"]),
             "heldout_loss": float(r["heldout_loss"]), "lr": float(r["lr"]),
             "seconds": float(r["seconds"])}
            for r in csv.DictReader(f)
        ]
