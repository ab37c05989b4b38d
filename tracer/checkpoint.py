"""Stage 3 of the walkthrough: fill the model from its weight files, file by file, tensor by tensor.

``tracer.resolution`` found the files; each weight format has its own reader beside this module
(``tracer.safetensors_file`` for the hub's safetensors, ``tracer.gguf_file`` for llama.cpp's
GGUF), and both name their tensors as the hub does, so one table (:func:`checkpoint_layout`) maps
every checkpoint tensor to one of our parameters. transformers does the same work in
``_load_pretrained_model`` / ``_load_state_dict_into_meta_model`` / ``set_module_tensor_to_device``.

The model is allocated once (``LlamaModel.allocate``); each tensor then goes straight into its
parameter, or through a one-tensor buffer that is cast (and, for GGUF, dequantized a few rows at a
time) on its way, so host memory stays bounded by about one tensor. On the CPU, a tensor stored
exactly as the model wants it becomes a view of the memory-mapped file instead of a copy. To a GPU,
the stored bytes go through two reused pinned buffers, uploads do not block the host (which reads
the next piece meanwhile), casts run on the device, and the host waits once per file
(:class:`StagedUpload`).
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

from . import dtypes
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
    """What loading one weight file did (the ``load_shard`` trace event is this report, stamped).

    ``index`` of ``count`` files; ``num_tensors`` read, ``tensors_mapped`` of them views of the
    memory-mapped file (CPU, same dtype) rather than copies; ``casts`` counts "stored->runtime"
    dtype changes. ``by_type`` breaks it down per stored type ("float16", "Q4_1", ...): tensors,
    bytes on disk, bytes in memory and seconds spent reading, casting and dequantizing them.
    """

    file: str = ""
    index: int = 0
    count: int = 0
    bytes_on_disk: int = 0
    format: str = "safetensors"  # or "gguf"
    num_tensors: int = 0
    bytes_read: int = 0
    bytes_in_memory: int = 0
    casts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = ""
    seconds: float = 0.0
    unexpected: list[str] = field(default_factory=list)
    tensors_mapped: int = 0
    by_type: dict[str, dict] = field(default_factory=dict)


def open_weights(path: Path, resolved: ResolvedCheckpoint, cfg: LlamaConfig, *, mapped: bool):
    """The reader of one weight file in the checkpoint's format (safetensors or GGUF); with
    ``mapped``, the file is memory-mapped so that tensors can become views of it."""
    if resolved.format == "gguf":
        g = GGUFFile.open(path)
        return GGUFWeights(g, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, mapped=mapped)
    return SafetensorsFile(path, mapped=mapped)


def load_weights(
    model: torch.nn.Module, resolved: ResolvedCheckpoint, *, map_files: bool = True, on_tensor=None,
    upload: StagedUpload | None = None, keep=None,
) -> Iterator[ShardReport]:
    """Fill ``model`` (allocated, e.g. by ``LlamaModel.allocate``) from the checkpoint, yielding per file.

    Checks every tensor's shape against the config, then after the last file that every expected
    tensor was seen; unexpected tensors produce a warning and are ignored (never silently used).
    With ``map_files`` (and a CPU model), parameters stored as-is become views of the mapped file.
    A CUDA model is filled through a :class:`StagedUpload` (``upload``: given by tests to run that
    path with a fake device), synchronised once per file. ``on_tensor()``, if given, is called
    after each tensor (a progress bar's tick). ``keep(param name, stored)``, if given, is offered
    each tensor's stored bytes first (a GGUF's ``stored_blocks``, or None) and returns whether it
    took them (``tracer.quant.KeepQuantized``: a quantized load); such a tensor is counted as
    mapped, under its type's ``by_type`` row's ``"kept_quantized"``.
    """
    cfg: LlamaConfig = model.config
    layout = checkpoint_layout(cfg)
    params = dict(model.named_parameters())
    if upload is None and model.device.type == "cuda":
        upload = StagedUpload(model.device, staging_bytes=staging_size(resolved.weight_files))
    seen: set[str] = set()
    unexpected: list[str] = []
    n = len(resolved.weight_files)
    for i, path in enumerate(resolved.weight_files):
        started = time.perf_counter()
        weights = open_weights(path, resolved, cfg, mapped=map_files and model.device.type == "cpu")
        report = ShardReport(path.name, i, n, path.stat().st_size, weights.format, device=str(model.device),
                             dtype=dtypes.name_of(model.dtype))
        try:
            found = _match(weights, layout, resolved, cfg, report)
            for name, slot in found:
                if keep is None or not _kept(weights, name, slot.param, keep, report):
                    _load_tensor(weights, name, params[slot.param], report, upload)
                if on_tensor is not None:
                    on_tensor()
            if upload is not None:
                upload.finish()  # the file's uploads are done: its seconds include them
        finally:
            weights.close()
        if keep is not None:  # a quantized load: every type's row says how many stayed in blocks
            for row in report.by_type.values():
                row.setdefault("kept_quantized", 0)
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


def _load_tensor(weights, name: str, param: torch.Tensor, report: ShardReport, upload: StagedUpload | None) -> None:
    """One tensor into its parameter, by one of three routes: on the CPU, a view of the mapped file
    where the bytes serve as they lie, else a copy (cast by ``copy_``); on a GPU, ``upload``."""
    t0 = time.perf_counter()
    with torch.no_grad():
        view = weights.view(name, param)
        if view is not None:
            param.data = view  # the untouched allocation it replaces is freed
        else:
            weights.fill(name, param.data, upload)
    _account(report, weights.entries[name], param, mapped=view is not None, seconds=time.perf_counter() - t0)


def _kept(weights, name: str, param: str, keep, report: ShardReport) -> bool:
    """Whether ``keep`` took tensor ``name`` (for our ``param``) as the bytes the file stores."""
    t0 = time.perf_counter()
    stored = weights.stored_blocks(name) if hasattr(weights, "stored_blocks") else None
    if not keep(param, stored):
        return False
    _account(report, weights.entries[name], stored.blocks, mapped=True, seconds=time.perf_counter() - t0,
             kept=True, weights=stored.shape[0] * stored.shape[1])
    return True


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


def _account(report: ShardReport, entry, dest: torch.Tensor, *, mapped: bool, seconds: float,
             kept: bool = False, weights: int | None = None) -> None:
    """Count one loaded tensor into ``report``; ``weights``: the values it stands for (kept blocks:
    not the bytes ``dest`` holds)."""
    in_memory = dest.numel() * dest.element_size()
    report.num_tensors += 1
    report.bytes_read += entry.nbytes
    report.bytes_in_memory += in_memory
    report.tensors_mapped += mapped
    runtime = entry.stored if kept else dtypes.name_of(dest.dtype)  # kept blocks are not cast
    if entry.stored != runtime:
        key = f"{entry.stored}->{runtime}"
        report.casts[key] = report.casts.get(key, 0) + 1
    row = report.by_type.setdefault(entry.stored, {"tensors": 0, "weights": 0, "bytes_on_disk": 0,
                                                   "bytes_in_memory": 0, "seconds": 0.0})
    row["tensors"] += 1
    row["weights"] += dest.numel() if weights is None else weights
    row["bytes_on_disk"] += entry.nbytes
    row["bytes_in_memory"] += in_memory
    row["seconds"] += seconds
    if kept:
        row["kept_quantized"] = row.get("kept_quantized", 0) + 1


# ---------------------------------------------------------------------------------------------
# To a GPU: pinned staging, uploads that do not block, casts on the device

# Each of the two pinned staging buffers holds at most this much: page-locked host memory cannot be
# swapped out, and torch's host allocator keeps it cached after the load, so it stays small; a
# larger tensor goes up in pieces.
STAGING_BYTES = 64 * 1024**2


def staging_size(files: list[Path]) -> int:
    """Bytes per staging buffer for these weight files: STAGING_BYTES, or less for a small model."""
    largest = max((p.stat().st_size for p in files), default=0)
    return max(8, min(STAGING_BYTES, -(-largest // 8) * 8))


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host byte buffer: the GPU's copy engine reads it directly, without the host."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def cuda_upload(dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
    """Queue ``src`` (pinned host bytes) into ``dst`` (device bytes); the host goes on at once. The
    returned event completes when the copy has read ``src``."""
    dst.copy_(src, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(dst.device))
    return done


class StagedUpload:
    """Host bytes into tensors on a GPU, as a loader should move them there.

    Each piece (a tensor, or ``staging_bytes`` of a larger one) is read into one of two reused
    pinned staging buffers and uploaded without blocking: the copy engine reads one buffer while
    the host reads the file into the other. A tensor stored in another dtype than its parameter's
    goes up as stored and is cast on the device. The host waits only before refilling a buffer
    whose last upload may still be reading it, and once per shard (:meth:`finish`); the device
    runs the uploads and casts in order on one stream, so the device scratch a cast reads is reused
    safely. ``pinned``, ``upload`` and ``synchronize`` are CUDA's by default; tests pass fakes to
    run this logic on the CPU.
    """

    def __init__(self, device: torch.device | str, *, staging_bytes: int = STAGING_BYTES,
                 pinned=pinned_bytes, upload=cuda_upload, synchronize=None) -> None:
        self.device = torch.device(device)
        self.staging_bytes = staging_bytes // 8 * 8  # a whole number of elements of any dtype
        if self.staging_bytes < 8:
            raise ValueError(f"staging_bytes must be at least 8, got {staging_bytes}")
        self._pinned, self._upload = pinned, upload
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(self.device))
        self._buffers: list[torch.Tensor | None] = [None, None]  # allocated on first use
        self._in_flight: list = [None, None]  # per buffer: the upload still reading it, if any
        self._turn = 0
        self._scratch: torch.Tensor | None = None  # device bytes a piece is cast from

    def write(self, dest: torch.Tensor, stored: torch.dtype, nbytes: int, read) -> None:
        """Fill the contiguous ``dest`` from ``nbytes`` of host bytes holding its values as
        ``stored``: ``read(buf, offset)`` puts bytes [offset, offset + len(buf)) into ``buf``."""
        size = stored.itemsize
        step = self.staging_bytes // size * size
        as_bytes = dest.view(-1).view(torch.uint8)  # raises for a non-contiguous dest
        for offset in range(0, nbytes, step):
            n = min(step, nbytes - offset)
            buf = self._next_buffer()[:n]
            read(buf, offset)
            if stored == dest.dtype:
                self._in_flight[self._turn] = self._upload(as_bytes[offset:offset + n], buf)
                continue
            scratch = self._device_scratch()[:n]
            self._in_flight[self._turn] = self._upload(scratch, buf)
            first = offset // size
            dest.view(-1)[first:first + n // size].copy_(scratch.view(stored))  # the cast, on the device

    def put(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Fill ``dest`` from the host tensor ``src`` (as many values, any dtype)."""
        values = src.contiguous().view(-1)
        raw = values.view(torch.uint8)
        self.write(dest, values.dtype, raw.numel(), lambda buf, offset: buf.copy_(raw[offset:offset + len(buf)]))

    def finish(self) -> None:
        """Wait for every upload and cast so far (once per shard)."""
        self._synchronize()
        self._in_flight = [None, None]

    def _next_buffer(self) -> torch.Tensor:
        """The other staging buffer, once the upload that last read it is done."""
        self._turn ^= 1
        if self._in_flight[self._turn] is not None:
            self._in_flight[self._turn].synchronize()
            self._in_flight[self._turn] = None
        if self._buffers[self._turn] is None:
            self._buffers[self._turn] = self._pinned(self.staging_bytes)
        return self._buffers[self._turn]

    def _device_scratch(self) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.staging_bytes, dtype=torch.uint8, device=self.device)
        return self._scratch


# ---------------------------------------------------------------------------------------------
# Writing (training export, benchmarks, tests)


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under hub names (read through each module's ``weight``/``bias``, so a layer
    a quantized load keeps in blocks, ``tracer.quant``, gives the weight its blocks stand for)."""
    def tensor(param: str) -> torch.Tensor:
        layer, _, leaf = param.rpartition(".")
        return getattr(model.get_submodule(layer), leaf).detach()

    return {name: tensor(slot.param) for name, slot in checkpoint_layout(model.config).items()}


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
    cfg_dict["torch_dtype"] = dtypes.name_of(dtype)
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
