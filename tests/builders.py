"""Builders for small checkpoints that the tests make themselves (nothing is downloaded).

Weights come from transformers' own ``save_pretrained`` (the oracle writes the files we must read);
the tokenizer is a sentencepiece BPE model trained here with Llama 2's settings.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three"
).split()
EXTRA = [
    "naïve café résumé", "Zürich Straße", "東京 日本語", "emoji 🦙 🚀 ✨", "numbers 12345 67890 3.14159",
    "tabs\tand\nnewlines", "  double  spaces  ", "CamelCaseWords snake_case_words", "¿Qué tal? ¡Muy bien!",
    "Ελληνικά", "Русский текст", "code: def f(x): return x**2", "[INST] <<SYS>> chat markers [/INST]",
]


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if i % 7 == 0:
            words.append(rng.choice(EXTRA))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "!", "?", ",", ";"]))
    return lines


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    """tokenizer.model + tokenizer_config.json in ``folder``, Llama 2 settings."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "sp_corpus.txt"
    text.write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }))
    return folder / "tokenizer.model"


def to_v4_style(config_path: Path) -> None:
    """Rewrite a transformers 5.x config.json in the 4.x hub style (rope_theta, rope_scaling, torch_dtype)."""
    raw = json.loads(config_path.read_text())
    params = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = params.pop("rope_theta", 10000.0)
    rope_type = params.get("rope_type", "default")
    raw["rope_scaling"] = None if rope_type == "default" else params
    if "dtype" in raw:
        raw["torch_dtype"] = raw.pop("dtype")
    raw.pop("head_dim", None)
    config_path.write_text(json.dumps(raw, indent=2))


def build_checkpoint(
    folder: Path,
    tokenizer_dir: Path,
    *,
    vocab_size: int = 400,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    tie: bool = False,
    rope_scaling: dict | None = None,
    rope_theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    style: str = "v5",
    max_position_embeddings: int = 256,
    seed: int = 0,
    generation_config: dict | None = None,
):
    """A random transformers Llama saved with ``save_pretrained``; returns the HF model (float32)."""
    import transformers

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        rope_parameters=rope,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; scale up so distributions have shape and argmax is stable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **kwargs)
    if style == "v4":
        to_v4_style(folder / "config.json")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    gen = {"bos_token_id": 1, "eos_token_id": 2, **(generation_config or {})}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return model


# --- Helpers for the error and fuzz tests: damage a built checkpoint in one precise way ---------


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> None:
    """Rewrite ``folder/config.json`` with ``changes`` applied and the keys in ``drop`` removed."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    for key in drop:
        raw.pop(key, None)
    path.write_text(json.dumps(raw, indent=2))


def shard_of(folder: Path, tensor: str) -> Path:
    """The weight file that holds ``tensor`` (single file or through the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][tensor]
    return folder / "model.safetensors"


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite every weight file with ``edit(name, tensor) -> tensor | None`` (None drops it);
    an edit may add tensors by returning a dict for the key ``"+"`` (see ``add_tensor``)."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for path in files:
        state = {}
        for name, t in load_file(str(path)).items():
            new = edit(name, t)
            if new is not None:
                state[name] = new.contiguous()
            elif weight_map is not None:
                weight_map.pop(name, None)
        save_file(state, str(path), metadata={"format": "pt"})
    if weight_map is not None:
        raw = json.loads(index.read_text())
        raw["weight_map"] = weight_map
        index.write_text(json.dumps(raw, indent=2))


def add_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """Add one tensor to the first weight file (and to the index, if any)."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    path = sorted(folder.glob("*.safetensors"))[0]
    state = load_file(str(path))
    state[name] = tensor
    save_file(state, str(path), metadata={"format": "pt"})
    if index.is_file():
        raw = json.loads(index.read_text())
        raw["weight_map"][name] = path.name
        index.write_text(json.dumps(raw, indent=2))
