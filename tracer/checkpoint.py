"""Stage 3 of the walkthrough: fill the model from its weight files, file by file, tensor by tensor.

``tracer.resolution`` found the files; each weight format has its own reader beside this module
(``tracer.safetensors_file`` for the hub's safetensors, ``tracer.gguf_file`` for llama.cpp's
GGUF), and both name their tensors as the hub does, so one table (:func:`checkpoint_layout`) maps
every checkpoint tensor to one of our parameters. transformers does the same work in
``_load_pretrained_model`` / ``_load_state_dict_into_meta_model`` / ``set_module_tensor_to_device``.

The model is allocated once (``LlamaModel.allocate``); each tensor then goes straight into its
parameter, or through a one-tensor buffer that is cast (and, for GGUF, dequantized a few rows at a
time) on its way, so host memory stays bounded by about one tensor. On the CPU, a tensor stored
exactly as the model wants it becomes a view of the memory-mapped file instead of a copy.
Each checkpoint tensor is one of our parameters (the model computes q/k/v and gate/up as one
product each without stacking their weights), so a same-dtype CPU load copies no weight.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import LlamaConfig
from .errors import CheckpointError
from .gguf_file import GGUFFile, GGUFWeights, hf_config, rope_freq_factors
from .resolution import INDEX_FILE, SINGLE_FILE, ResolvedCheckpoint
from .safetensors_file import SafetensorsFile

# Tensors some older checkpoints carry that are derived, not learned: skip them quietly.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(resolved: ResolvedCheckpoint) -> LlamaConfig:
    """Stage 1 for any format: config.json, or the GGUF's metadata read as a config.json (plus
    Llama 3.1's rope scaling, which a GGUF keeps as its ``rope_freqs`` tensor)."""
    if resolved.format != "gguf":
        return LlamaConfig.from_file(resolved.config_file)
    path = resolved.weight_files[0]
    g = GGUFFile.open(path)
    cfg = LlamaConfig.from_dict(hf_config(g), f"{path} (GGUF metadata)")
    factors = rope_freq_factors(g)
    if factors is None:
        return cfg
    return replace(cfg, rope=replace(cfg.rope, freq_factors=tuple(factors.tolist())))


# ---------------------------------------------------------------------------------------------
# Name map: checkpoint tensor -> one of our parameters


@dataclass(frozen=True)
class Slot:
    """Where a checkpoint tensor goes: our parameter ``param``, of this ``shape``."""

    param: str
    shape: tuple[int, ...]


def checkpoint_layout(cfg: LlamaConfig) -> dict[str, Slot]:
    """The declarative map from hub tensor names to our parameters."""
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layout = {"model.embed_tokens.weight": Slot("embed.weight", (V, D))}
    for i in range(cfg.num_hidden_layers):
        hf, us = f"model.layers.{i}", f"blocks.{i}"
        parts = {
            "self_attn.q_proj": ("attn.wq", q, D),
            "self_attn.k_proj": ("attn.wk", kv, D),
            "self_attn.v_proj": ("attn.wv", kv, D),
            "self_attn.o_proj": ("attn.wo", D, q),
            "mlp.gate_proj": ("mlp.w_gate", F, D),
            "mlp.up_proj": ("mlp.w_up", F, D),
            "mlp.down_proj": ("mlp.w_down", D, F),
        }
        for name, (param, rows, cols) in parts.items():
            layout[f"{hf}.{name}.weight"] = Slot(f"{us}.{param}.weight", (rows, cols))
            with_bias = cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias
            if with_bias:
                layout[f"{hf}.{name}.bias"] = Slot(f"{us}.{param}.bias", (rows,))
        layout[f"{hf}.input_layernorm.weight"] = Slot(f"{us}.ln1.weight", (D,))
        layout[f"{hf}.post_attention_layernorm.weight"] = Slot(f"{us}.ln2.weight", (D,))
    layout["model.norm.weight"] = Slot("final_norm.weight", (D,))
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = Slot("lm_head.weight", (V, D))
    return layout


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class ShardReport:
    """What loading one weight file did (the ``load_shard`` trace event's payload).

    ``by_type`` breaks it down per stored type ("float16", "Q4_1", ...): tensors, bytes on disk,
    bytes in memory and seconds spent reading, casting and dequantizing them.
    """

    file: str
    index: int
    count: int
    bytes_on_disk: int
    format: str = "safetensors"
    tensors: int = 0
    bytes_read: int = 0
    bytes_in_memory: int = 0
    casts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = ""
    seconds: float = 0.0
    unexpected: list[str] = field(default_factory=list)
    tensors_mapped: int = 0  # of ``tensors``: views of the memory-mapped file, not copies
    by_type: dict[str, dict] = field(default_factory=dict)


def open_weights(path: Path, resolved: ResolvedCheckpoint, cfg: LlamaConfig, *, map_file: bool):
    """The reader of one weight file in the checkpoint's format (safetensors or GGUF)."""
    if resolved.format == "gguf":
        g = GGUFFile.open(path)
        return GGUFWeights(g, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, map_file_=map_file)
    return SafetensorsFile(path, map_file_=map_file)


def load_weights(
    model: torch.nn.Module, resolved: ResolvedCheckpoint, *, map_files: bool = True, on_tensor=None
) -> Iterator[ShardReport]:
    """Fill ``model`` (allocated, e.g. by ``LlamaModel.allocate``) from the checkpoint, yielding per file.

    Checks every tensor's shape against the config, then after the last file that every expected
    tensor was seen; unexpected tensors produce a warning and are ignored (never silently used).
    With ``map_files`` (and a CPU model), parameters stored as-is become views of the mapped file.
    ``on_tensor()``, if given, is called after each tensor (a progress bar's tick).
    """
    cfg: LlamaConfig = model.config
    layout = checkpoint_layout(cfg)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    n = len(resolved.weight_files)
    for i, path in enumerate(resolved.weight_files):
        started = time.perf_counter()
        weights = open_weights(path, resolved, cfg, map_file=map_files and model.device.type == "cpu")
        report = ShardReport(path.name, i, n, path.stat().st_size, weights.format, device=str(model.device),
                             dtype=str(model.dtype).replace("torch.", ""))
        try:
            found = _match(weights, layout, resolved, cfg, report)
            for name, slot in found:
                _load_tensor(weights, name, params[slot.param], report)
                if on_tensor is not None:
                    on_tensor()
        finally:
            weights.close()
        seen.update(name for name, _ in found)
        unexpected += report.unexpected
        report.seconds = time.perf_counter() - started
        yield report
    _check_complete(layout, seen, resolved)
    if unexpected:
        warnings.warn(
            f"{resolved.source}: ignored {len(unexpected)} unexpected tensor(s): "
            + ", ".join(unexpected[:8]),
            stacklevel=2,
        )


def _match(weights, layout: dict, resolved: ResolvedCheckpoint, cfg: LlamaConfig, report: ShardReport):
    """[(hub name, slot)] for the file's tensors, shapes checked; the rest noted as unexpected."""
    if resolved.weight_map is not None:
        _check_index_agrees(resolved, weights.path, weights.entries)
    report.unexpected += getattr(weights, "unknown", [])
    found = []
    for name, entry in weights.entries.items():
        slot = layout.get(name)
        if slot is None:
            if not name.endswith(DERIVED_SUFFIXES) and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                report.unexpected.append(name)
            continue
        if entry.shape != slot.shape:
            raise CheckpointError(
                f"{weights.path}: tensor {name!r} has shape {list(entry.shape)}, but the config "
                f"implies {list(slot.shape)}: the weights do not match the config"
            )
        weights.check_dtype(name)
        found.append((name, slot))
    return found


def _load_tensor(weights, name: str, param: torch.Tensor, report: ShardReport) -> None:
    """One tensor into its parameter: a view of the mapped file where possible, else a copy."""
    t0 = time.perf_counter()
    with torch.no_grad():
        view = weights.view(name, param)
        if view is not None:
            param.data = view  # the untouched allocation it replaces is freed
        else:
            weights.fill(name, param.data)
    _account(report, weights.entries[name], param, mapped=view is not None, seconds=time.perf_counter() - t0)


def _check_complete(layout: dict, seen: set[str], resolved: ResolvedCheckpoint) -> None:
    missing = [k for k in layout if k not in seen]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"{resolved.source}: {len(missing)} expected tensor(s) missing from the weight files: "
            f"{shown}. The checkpoint is incomplete or does not match its config"
        )


def _check_index_agrees(resolved: ResolvedCheckpoint, path: Path, entries: dict) -> None:
    listed = {t for t, f in resolved.weight_map.items() if f == path.name}
    absent = sorted(listed - set(entries))
    if absent:
        raise CheckpointError(
            f"{resolved.index_file}: says {absent[0]!r} is in {path.name}, but that shard does not "
            "contain it: index and shards do not match (re-download the checkpoint)"
        )


def _account(report: ShardReport, entry, dest: torch.Tensor, *, mapped: bool, seconds: float) -> None:
    in_memory = dest.numel() * dest.element_size()
    report.tensors += 1
    report.bytes_read += entry.nbytes
    report.bytes_in_memory += in_memory
    report.tensors_mapped += mapped
    runtime = str(dest.dtype).replace("torch.", "")
    if entry.stored != runtime:
        key = f"{entry.stored}->{runtime}"
        report.casts[key] = report.casts.get(key, 0) + 1
    row = report.by_type.setdefault(entry.stored, {"tensors": 0, "bytes_on_disk": 0, "bytes_in_memory": 0,
                                                   "seconds": 0.0})
    row["tensors"] += 1
    row["bytes_on_disk"] += entry.nbytes
    row["bytes_in_memory"] += in_memory
    row["seconds"] += seconds


# ---------------------------------------------------------------------------------------------
# Writing (training export, benchmarks, tests)


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under hub names."""
    params = dict(model.named_parameters())
    return {name: params[slot.param].detach() for name, slot in checkpoint_layout(model.config).items()}


def save_pretrained(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = 2 * 1024**3,
) -> list[Path]:
    """Write ``model`` as a hub-style checkpoint: config.json and safetensors shards (+ index).

    Files are written into a temporary folder beside the target and moved in at the end, so an
    interrupted save leaves no half-written checkpoint.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous().cpu() for k, v in hf_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    cfg_dict = model.config.to_hf_dict()
    cfg_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        names = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for fname, shard in zip(names, shards):
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            names.append(INDEX_FILE)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        names.append("config.json")
        # Remove stale weight files of an earlier save so that resolution is unambiguous.
        for old in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
            if old.exists():
                old.unlink()
        for fname in names:
            os.replace(tmp / fname, folder / fname)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [folder / n for n in names]
