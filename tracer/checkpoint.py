"""Stages 2-3 of the walkthrough: find the weight files, then load them shard by shard, tensor by tensor.

Resolution: a local folder, or a hub repo id through ``huggingface_hub`` (its cache, ``revision``,
``token``, ``HF_HUB_OFFLINE=1``). ``model.safetensors`` is preferred; otherwise
``model.safetensors.index.json`` names the shards in its ``weight_map``. Pickle ``.bin`` files are
never opened: unpickling runs code.

Loading reads each safetensors file by hand (8-byte header length, JSON header, raw bytes), one
tensor at a time, straight into the model's (already allocated) parameter or into a one-tensor
buffer that is cast and moved. So host memory stays bounded by about one tensor, every header is
checked before any byte is trusted, and a truncated or corrupt file is named in the error.

Each checkpoint tensor is one of our parameters (the model computes q/k/v and gate/up as one
product each without stacking their weights). On the CPU, a parameter whose bytes lie in the file
as the model wants them (same dtype) becomes a view of the memory-mapped file instead of a copy:
nothing is read until first use, and the pages are shared with the OS page cache. That is how
transformers loads too. The mapping is private (copy-on-write): editing a weight in memory never
writes to the file.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import LlamaConfig, read_json
from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pth")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a bigger header is corrupt or hostile

# safetensors dtype codes -> torch dtypes
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# Tensors some older checkpoints carry that are derived, not learned: skip them quietly.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint's files are, and which weight files were chosen."""

    source: str
    folder: Path
    origin: str  # "local" or "hub-cache"
    weight_files: tuple[Path, ...]
    index_file: Path | None
    weight_map: dict[str, str] | None
    root: Path  # files may not resolve outside this folder (hub cache: the repo's cache folder)
    repo_id: str | None = None
    revision: str | None = None

    @property
    def sharded(self) -> bool:
        return self.index_file is not None

    @property
    def config_file(self) -> Path:
        return self.folder / "config.json"

    @property
    def generation_config_file(self) -> Path | None:
        p = self.folder / "generation_config.json"
        return p if p.is_file() else None

    def summary(self) -> dict:
        """JSON-able description for the ``resolve`` trace event."""
        return {
            "source": self.source,
            "folder": str(self.folder),
            "origin": self.origin,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "sharded": self.sharded,
            "index_file": self.index_file.name if self.index_file else None,
            "weight_files": [p.name for p in self.weight_files],
            "bytes": [p.stat().st_size for p in self.weight_files],
            "files_in_folder": sorted(p.name for p in self.folder.iterdir()),
            "tensors_per_file": _count_per_file(self.weight_map),
        }


def _count_per_file(weight_map: dict[str, str] | None) -> dict[str, int] | None:
    if weight_map is None:
        return None
    counts: dict[str, int] = {}
    for f in weight_map.values():
        counts[f] = counts.get(f, 0) + 1
    return counts


def _inside(path: Path, root: Path, what: str) -> Path:
    """Resolve ``path`` (following symlinks) and refuse it if it leaves ``root``."""
    real = path.resolve()
    if real != root and root not in real.parents:
        raise CheckpointError(
            f"{what} resolves to {real}, outside the model folder {root}: refusing to read it "
            "(a path with '..', an absolute path or an escaping symlink)"
        )
    return real


def choose_weight_files(folder: Path, root: Path, source: str) -> tuple[tuple[Path, ...], Path | None, dict | None]:
    """Prefer model.safetensors; else the index and its shards; pickle-only gets a clear refusal."""
    single = folder / SINGLE_FILE
    if single.is_file():
        return (_inside(single, root, SINGLE_FILE),), None, None
    index = folder / INDEX_FILE
    if index.is_file():
        _inside(index, root, INDEX_FILE)
        weight_map = parse_index(index)
        files: list[Path] = []
        for name in sorted(set(weight_map.values())):  # shard order: model-00001-of-N first
            shard = folder / name
            _inside(shard, root, f"{INDEX_FILE} entry {name!r}")
            if not shard.is_file():
                raise CheckpointError(
                    f"{index}: weight_map names shard {name!r}, but {shard} does not exist "
                    "(an interrupted download? fetch the missing file)"
                )
            files.append(shard)
        return tuple(files), index, weight_map
    pickles = [p.name for p in folder.iterdir() if p.name in PICKLE_FILES or p.suffix in (".bin", ".pth", ".pt")]
    if pickles:
        raise CheckpointError(
            f"{source}: only pickle weight files found ({', '.join(sorted(pickles))}). This tool "
            "loads safetensors only, because unpickling can run arbitrary code. Convert the "
            "checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True)) or "
            "use a repo revision that ships model.safetensors"
        )
    raise CheckpointError(
        f"{source}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE} in {folder}"
    )


def parse_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a model.safetensors.index.json, checked for shape and safe names."""
    raw = read_json(index, CheckpointError)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty object 'weight_map' (tensor name -> shard file)")
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index}: weight_map[{tensor!r}] must be a file name, got {fname!r}")
        p = Path(fname)
        if p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or "\\" in fname:
            raise CheckpointError(
                f"{index}: weight_map[{tensor!r}] = {fname!r} is not a plain file name in the "
                "model folder: refusing paths with '..', separators or absolute paths"
            )
        if not fname.endswith(".safetensors"):
            raise CheckpointError(
                f"{index}: weight_map[{tensor!r}] = {fname!r} is not a .safetensors file"
            )
    return weight_map


def resolve(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> ResolvedCheckpoint:
    """Find a checkpoint: a local folder, or a hub repo id (downloaded or from the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: expected a model folder, got a file")
        folder = path.resolve()
        files, index, weight_map = choose_weight_files(folder, folder, str(source))
        return ResolvedCheckpoint(str(source), folder, "local", files, index, weight_map, folder)
    return _resolve_hub(str(source), revision, token)


def _resolve_hub(repo_id: str, revision: str | None, token) -> ResolvedCheckpoint:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder nor a hub repo id of the form 'org/name'"
        )
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(
                snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
            )
        except hf_errors.GatedRepoError:
            raise CheckpointError(
                f"{repo_id} is a gated repo: accept its license on the hub, then pass token=... "
                "(or set HF_TOKEN / run `hf auth login`). A local folder works too."
            ) from None
        except hf_errors.RepositoryNotFoundError:
            raise CheckpointError(
                f"{repo_id}: repository not found on the hub (or private: pass token=...)"
            ) from None
        except hf_errors.RevisionNotFoundError:
            raise CheckpointError(f"{repo_id}: revision {revision!r} not found") from None
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
            raise CheckpointError(
                f"{repo_id}: not in the local hub cache and the hub cannot be reached ({exc.__class__.__name__}). "
                "Download it once with network access (files stay in the cache; HF_HUB_OFFLINE=1 "
                "then works), or pass a local folder"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{repo_id}: could not reach the hub ({exc}); HF_HUB_OFFLINE=1 "
                                  "with a populated cache, or a local folder, works offline") from None

    # First the small files, to learn which weight files exist, then only the weights we need.
    folder = fetch(["*.json", "tokenizer.model"])
    if (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).exists():
        shards = sorted(set(parse_index(folder / INDEX_FILE).values()))
        folder = fetch(["*.json", "tokenizer.model", *shards])
    else:
        folder = fetch(["*.json", "tokenizer.model", SINGLE_FILE])
    # Cache snapshots hold symlinks into ../../blobs: the repo's cache folder is the boundary.
    root = folder.parent.parent.resolve()
    files, index, weight_map = choose_weight_files(folder, root, repo_id)
    return ResolvedCheckpoint(
        repo_id, folder, "hub-cache", files, index, weight_map, root, repo_id, revision
    )


# ---------------------------------------------------------------------------------------------
# safetensors, read by hand


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header; every problem names the file."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: too small to be a safetensors file ({size} bytes): truncated?")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}: "
                "corrupt or truncated file (re-download it)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge numbers, absurd nesting
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object: corrupt file")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _entry(path: Path, name: str, info, data_start: int, size: int) -> TensorEntry:
    bad = f"{path}: tensor {name!r} has a malformed header entry"
    if not isinstance(info, dict):
        raise CheckpointError(bad)
    dtype = ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{bad}: data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if begin < 0 or end < begin or end - begin != nbytes:
        raise CheckpointError(f"{bad}: offsets {offsets} do not fit shape {shape} of {info.get('dtype')}")
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
            "bytes: the file is truncated (re-download it)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, nbytes)


def _read_into(f, entry: TensorEntry, path: Path, out: torch.Tensor) -> None:
    """Read ``entry``'s raw bytes into the contiguous CPU byte view ``out``."""
    f.seek(entry.begin)
    got = f.readinto(memoryview(out.numpy()).cast("B")) if entry.nbytes else 0
    if got != entry.nbytes:
        raise CheckpointError(f"{path}: tensor {entry.name!r} is truncated ({got} of {entry.nbytes} bytes)")


def read_tensor(f, entry: TensorEntry, path: Path) -> torch.Tensor:
    """One tensor from an open safetensors file, in its stored dtype, on the CPU."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    _read_into(f, entry, path, buf)
    return buf.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)


# ---------------------------------------------------------------------------------------------
# Name map: checkpoint tensor -> a slice of one of our parameters


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
    """What loading one weight file did (the ``load_shard`` trace event's payload)."""

    file: str
    index: int
    count: int
    bytes_on_disk: int
    tensors: int = 0
    bytes_read: int = 0
    bytes_in_memory: int = 0
    casts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = ""
    seconds: float = 0.0
    unexpected: list[str] = field(default_factory=list)
    tensors_mapped: int = 0  # of ``tensors``: views of the memory-mapped file, not copies


def load_weights(
    model: torch.nn.Module, resolved: ResolvedCheckpoint, *, map_files: bool = True
) -> Iterator[ShardReport]:
    """Fill ``model`` (allocated, e.g. by ``LlamaModel.allocate``) from the checkpoint, yielding per shard.

    Checks every tensor's shape against the config, then after the last shard that every expected
    tensor was seen; unexpected tensors produce a warning and are ignored (never silently used).
    With ``map_files`` (and a CPU model), parameters stored as-is become views of the mapped file.
    """
    cfg: LlamaConfig = model.config
    layout = checkpoint_layout(cfg)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    n = len(resolved.weight_files)
    for i, path in enumerate(resolved.weight_files):
        started = time.perf_counter()
        report = ShardReport(path.name, i, n, path.stat().st_size, device=str(model.device),
                             dtype=str(model.dtype).replace("torch.", ""))
        entries = read_header(path)
        if resolved.weight_map is not None:
            _check_index_agrees(resolved, path, entries)
        found: list[tuple[str, TensorEntry]] = []  # (our parameter, its tensor in this file)
        for name, entry in entries.items():
            slot = layout.get(name)
            if slot is None:
                if not name.endswith(DERIVED_SUFFIXES) and not (
                    name == "lm_head.weight" and cfg.tie_word_embeddings
                ):
                    unexpected.append(name)
                    report.unexpected.append(name)
                continue
            if entry.shape != slot.shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(entry.shape)}, but config.json "
                    f"implies {list(slot.shape)}: the weights do not match the config"
                )
            if not entry.dtype.is_floating_point:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.dtype}, expected a float type")
            found.append((slot.param, entry))
            seen.add(name)
        with open(path, "rb") as f:
            mapped = _map_file(f) if map_files and model.device.type == "cpu" else None
            with torch.no_grad():
                for pname, entry in found:
                    param = params[pname]
                    view = _view_in_file(mapped, param, entry) if mapped is not None else None
                    if view is not None:
                        param.data = view  # the untouched allocation it replaces is freed
                        _account(report, entry, param, mapped=True)
                    else:
                        _fill(f, entry, path, param.data, report)
        report.seconds = time.perf_counter() - started
        yield report
    missing = [k for k in layout if k not in seen]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"{resolved.source}: {len(missing)} expected tensor(s) missing from the weight files: "
            f"{shown}. The checkpoint is incomplete or does not match config.json"
        )
    if unexpected:
        warnings.warn(
            f"{resolved.source}: ignored {len(unexpected)} unexpected tensor(s): "
            + ", ".join(unexpected[:8]),
            stacklevel=2,
        )


def _check_index_agrees(resolved: ResolvedCheckpoint, path: Path, entries: dict) -> None:
    listed = {t for t, f in resolved.weight_map.items() if f == path.name}
    absent = sorted(listed - set(entries))
    if absent:
        raise CheckpointError(
            f"{resolved.index_file}: says {absent[0]!r} is in {path.name}, but that shard does not "
            "contain it: index and shards do not match (re-download the checkpoint)"
        )


def _map_file(f) -> torch.Tensor | None:
    """The whole file as a uint8 tensor over a private (copy-on-write) memory map, or None where
    mapping is not possible (then every tensor is read)."""
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(mm, dtype=torch.uint8)  # keeps the map alive while any view lives


def _view_in_file(mapped: torch.Tensor, param: torch.Tensor, entry: TensorEntry) -> torch.Tensor | None:
    """``param`` as a view of the mapped file, if its bytes lie there exactly as it wants them
    (same dtype, aligned for it), else None."""
    if entry.dtype != param.dtype or entry.begin % param.element_size() or not param.is_contiguous():
        return None
    return mapped[entry.begin : entry.begin + entry.nbytes].view(param.dtype).view(param.shape)


def _account(report: ShardReport, entry: TensorEntry, dest: torch.Tensor, *, mapped: bool) -> None:
    report.tensors += 1
    report.bytes_read += entry.nbytes
    report.bytes_in_memory += entry.nbytes // entry.dtype.itemsize * dest.element_size()
    if mapped:
        report.tensors_mapped += 1
    if entry.dtype != dest.dtype:
        key = f"{str(entry.dtype).replace('torch.', '')}->{str(dest.dtype).replace('torch.', '')}"
        report.casts[key] = report.casts.get(key, 0) + 1


def _fill(f, entry: TensorEntry, path: Path, dest: torch.Tensor, report: ShardReport) -> None:
    """Copy one tensor into ``dest``: straight into it when dtype and device allow, else through
    a one-tensor buffer that ``copy_`` casts and moves."""
    _account(report, entry, dest, mapped=False)
    if dest.device.type == "cpu" and entry.dtype == dest.dtype and dest.is_contiguous() and entry.nbytes:
        _read_into(f, entry, path, dest.view(-1).view(torch.uint8))
    else:
        dest.copy_(read_tensor(f, entry, path).view(dest.shape))


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
