"""The thread through every stage: typed events, the ordered trace, and its save/reload.

Stage names (these exact strings; notebooks and tests use them)::

    config, resolve, load_shard, tokenize, prefill, decode_step, sample, detokenize

A stage is recorded with ``with trace.stage(name) as stage: ...; stage.event = ...``: the trace
times the block, stamps the event and puts it in its place (:meth:`Trace.add`). Events are built
from what they describe (``LoadShardEvent`` is the loader's ``ShardReport``, ``TokenizeEvent``
takes an ``Encoding``).

Every event carries its own small summaries (shapes, norms, top-k lists) even when no tensor is
kept; ``capture="full"`` adds tensors at chosen hook points. A trace saves to one folder —
``events.json`` (the events), ``tensors.safetensors`` (the tensors) and ``manifest.json`` (sizes and
SHA-256 of both) — written beside the target and renamed into place, so a save interrupted midway
leaves the old trace intact, and a truncated or edited folder fails to load with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .checkpoint import ShardReport
from .errors import TraceError

if TYPE_CHECKING:
    from .config import LlamaConfig
    from .tokenizer import Encoding

STAGES = ("config", "resolve", "load_shard", "tokenize", "prefill", "decode_step", "sample", "detokenize")
CAPTURE_POLICIES = ("off", "light", "full")
FORMAT = "llama-tracer-trace"
VERSION = 1


class MemoryProbe:
    """Reads the process RSS (and, on CUDA, allocated/peak GPU bytes) as often as asked.

    A traced decode reads memory once per token. Opening /proc/self/statm each time costs several
    times the read itself, so the probe keeps the file open and re-reads it with ``pread``. The fd
    closes with :meth:`close` or when the probe is collected. A forked child reopens the file, so
    it reads its own RSS and not its parent's.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else None
        self._cuda = dev if dev is not None and dev.type == "cuda" and torch.cuda.is_available() else None
        self._fd: int | None = None
        self._pid: int | None = None
        self._closer: weakref.finalize | None = None
        self._no_statm = False  # no /proc here (not Linux): RSS is left out, not retried per step

    def snapshot(self) -> dict[str, int]:
        """Current RSS in bytes (``rss_bytes``) and the CUDA counters where they apply."""
        snap: dict[str, int] = {}
        if not self._no_statm:
            try:
                if self._pid != os.getpid():
                    self._open()
                pages = int(os.pread(self._fd, 256, 0).split()[1])  # statm: size resident ...
                snap["rss_bytes"] = pages * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                self._no_statm = True
                self.close()
        if self._cuda is not None:
            snap["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self._cuda)
            snap["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self._cuda)
        return snap

    def _open(self) -> None:
        self.close()
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, fd)
        self._fd, self._pid = fd, os.getpid()

    def close(self) -> None:
        """Close the kept file (a later snapshot opens it again)."""
        if self._closer is not None:
            self._closer()  # runs os.close once; the finalizer is then dead
        self._fd = self._pid = self._closer = None


def memory_snapshot(device: torch.device | str | None = None) -> dict[str, int]:
    """Current process RSS (bytes) and, on CUDA, allocated/peak GPU bytes: one reading."""
    probe = MemoryProbe(device)
    try:
        return probe.snapshot()
    finally:
        probe.close()


# ---------------------------------------------------------------------------------------------
# Events


@dataclass
class Event:
    """Common fields: order, wall-clock start, duration, memory after, kept tensors."""

    stage: ClassVar[str] = ""
    seq: int = -1
    time: float = 0.0
    seconds: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tensors"}
        d["stage"] = self.stage
        d["tensor_names"] = sorted(self.tensors)
        return d


@dataclass
class ConfigEvent(Event):
    """config.json parsed: the typed config and the memory arithmetic."""

    stage: ClassVar[str] = "config"
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    num_parameters: int = 0
    memory_table: list[dict[str, Any]] = field(default_factory=list)
    runtime_dtype: str = ""
    runtime_bytes: int = 0

    @classmethod
    def from_config(cls, cfg: LlamaConfig, source: str, runtime_dtype: str) -> ConfigEvent:
        """The event describing ``cfg`` (read from ``source``) loaded in ``runtime_dtype``."""
        return cls(source=source, config=cfg.summary(), num_parameters=cfg.num_parameters,
                   memory_table=cfg.memory_table(), runtime_dtype=runtime_dtype,
                   runtime_bytes=cfg.memory_bytes(runtime_dtype))


@dataclass
class ResolveEvent(Event):
    """Which weight files were found and chosen."""

    stage: ClassVar[str] = "resolve"
    source: str = ""
    folder: str = ""
    origin: str = ""
    format: str = "safetensors"  # or "gguf"
    note: str | None = None  # why this source was chosen (a named model: hub cache or offline copy)
    repo_id: str | None = None
    revision: str | None = None
    sharded: bool = False
    index_file: str | None = None
    weight_files: list[str] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    files_in_folder: list[str] = field(default_factory=list)
    tensors_per_file: dict[str, int] | None = None


@dataclass
class LoadShardEvent(Event, ShardReport):
    """One weight file read tensor by tensor: the loader's :class:`~tracer.checkpoint.ShardReport`
    (file, tensors, bytes, casts, device, per stored type, seconds) as a trace event. Its fields
    are declared once, there; the event adds the stamp every event has (time, memory)."""

    stage: ClassVar[str] = "load_shard"

    @classmethod
    def from_report(cls, report: ShardReport, *, memory: dict[str, int] | None = None) -> LoadShardEvent:
        """The event for a shard just loaded (it started ``report.seconds`` ago)."""
        fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(ShardReport)}
        return cls(time=time.time() - report.seconds, memory=dict(memory or {}), **fields)


@dataclass
class TokenizeEvent(Event):
    """Text (after any chat template) to pieces and ids.

    ``template``: None for plain text; for a chat, where the checkpoint's template came from
    ("tokenizer_config.json", "chat_template.jinja", "GGUF metadata") or "llama2-chat" (Llama 2's
    [INST] format, built at the token level). ``added_bos``/``added_eos``: the tokenizer (or the
    template) put a BOS first / an EOS last; False for ids given by the caller.
    """

    stage: ClassVar[str] = "tokenize"
    text: str = ""
    template: str | None = None
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    added_bos: bool = False
    added_eos: bool = False

    @classmethod
    def from_encoding(cls, enc: Encoding) -> TokenizeEvent:
        """The event describing a tokenized prompt (the fields have the :class:`Encoding`'s names)."""
        return cls(**{f.name: getattr(enc, f.name) for f in dataclasses.fields(enc)})


@dataclass
class ForwardEvent(Event):
    """Shared by prefill and decode_step: one forward pass with the KV cache."""

    step: int = 0
    positions: list[int] = field(default_factory=list)  # [first, last]
    input_ids: list[int] = field(default_factory=list)
    kv_cache: dict[str, Any] = field(default_factory=dict)
    top_logits: dict[str, list] = field(default_factory=dict)  # ids/values at the last position
    residual_norms: list[float] | None = None  # per layer, last position (with lens=True)
    logit_lens: list[dict[str, list]] | None = None  # per layer: top ids/probs (with lens=True)


@dataclass
class PrefillEvent(ForwardEvent):
    stage: ClassVar[str] = "prefill"


@dataclass
class DecodeStepEvent(ForwardEvent):
    stage: ClassVar[str] = "decode_step"


@dataclass
class SampleEvent(Event):
    """One token chosen: the top candidates after each sampling stage, and the choice."""

    stage: ClassVar[str] = "sample"
    step: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    # stage name -> {"ids": [...], "scores": [...], "probs": [...]} (top-k of that stage)
    stages: dict[str, dict[str, list]] = field(default_factory=dict)
    candidates: int = 0  # tokens left with non-zero probability
    chosen_id: int = 0
    chosen_piece: str = ""
    chosen_rank: int = 0  # 0 = the most likely under the final distribution
    chosen_prob: float = 0.0
    forced: bool = False  # picked by the user (a branch), not drawn
    # Every stage seen on one common list of tokens, so that a plot shows a token where it was
    # when a stage cut it. Traces recorded before these fields existed load them empty.
    # candidate_ids: the best after the repetition penalty, best first (the warpers never reorder
    # them), then the chosen token if it is not among them.
    candidate_ids: list[int] = field(default_factory=list)
    # stage name -> {"scores": [...], "probs": [...]} at candidate_ids (-inf and 0 where cut)
    at_candidates: dict[str, dict[str, list]] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)  # stage -> tokens left in play
    mass_kept: dict[str, float] = field(default_factory=dict)  # stage -> share of the previous stage's probability kept
    penalized: int = 0  # distinct ids the repetition penalty lowered (0 when it is 1.0)
    penalized_ids: list[int] = field(default_factory=list)  # those among candidate_ids


@dataclass
class DetokenizeEvent(Event):
    """New ids back to text."""

    stage: ClassVar[str] = "detokenize"
    new_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.stage: cls
    for cls in (
        ConfigEvent, ResolveEvent, LoadShardEvent, TokenizeEvent, PrefillEvent,
        DecodeStepEvent, SampleEvent, DetokenizeEvent,
    )
}
assert tuple(EVENT_TYPES) == STAGES
# The load's stages, listed in walkthrough order whatever order the loader meets them in:
# resolution finds config.json, so the config is read after it but shown first.
LOAD_STAGES = STAGES[:3]


# ---------------------------------------------------------------------------------------------
# The trace


class Stage:
    """What a ``with trace.stage(name) as stage:`` block fills in: ``stage.event``, the event it
    describes (left None, nothing is recorded: e.g. with capture="off")."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.event: Event | None = None


class Trace:
    """An ordered list of events (``trace.events``) with counters, save and load."""

    def __init__(self, events: list[Event] | None = None, meta: dict[str, Any] | None = None) -> None:
        self.events: list[Event] = []
        self.meta: dict[str, Any] = dict(meta or {})
        for e in events or []:
            self.add(e)

    def add(self, event: Event) -> Event:
        """Add ``event`` in its place, numbering the events and stamping its wall-clock time if unset.

        Its place is the end, except that a load stage goes before the later load stages that end
        the list (``LOAD_STAGES``: config, resolve, load_shard read in that order)."""
        if not event.time:
            event.time = time.time()
        at = len(self.events)
        if event.stage in LOAD_STAGES:
            later = LOAD_STAGES[LOAD_STAGES.index(event.stage) + 1:]
            while at and self.events[at - 1].stage in later:
                at -= 1
        self.events.insert(at, event)
        for seq in range(at, len(self.events)):
            self.events[seq].seq = seq
        return event

    @contextmanager
    def stage(self, name: str, *, memory: MemoryProbe | torch.device | str | None = None) -> Iterator[Stage]:
        """Time the block as stage ``name`` and add the event it sets (``stage.event``), stamped
        with the block's wall-clock start and seconds and, when ``memory`` (a device, or a
        :class:`MemoryProbe` kept open) is given, the memory after it. A block that raises, or
        sets no event, records nothing."""
        if name not in STAGES:
            raise TraceError(f"unknown stage {name!r}; stages are {list(STAGES)}")
        stage, started, t0 = Stage(name), time.time(), time.perf_counter()
        yield stage
        seconds, event = time.perf_counter() - t0, stage.event
        if event is None:
            return
        if event.stage != name:
            raise TraceError(f"stage {name!r} recorded a {event.stage!r} event")
        event.time, event.seconds = started, seconds
        if memory is not None:
            event.memory = memory.snapshot() if isinstance(memory, MemoryProbe) else memory_snapshot(memory)
        self.add(event)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    @property
    def stages(self) -> list[str]:
        """The stage of each event, in order."""
        return [e.stage for e in self.events]

    def of(self, stage: str) -> list[Event]:
        """Events of one stage."""
        if stage not in STAGES:
            raise TraceError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
        return [e for e in self.events if e.stage == stage]

    def copy(self) -> Trace:
        """A shallow copy (events shared) for extending with more events."""
        new = Trace(meta=self.meta)
        new.events = list(self.events)
        return new

    def nbytes(self) -> int:
        """Bytes of kept tensors."""
        return sum(t.numel() * t.element_size() for e in self.events for t in e.tensors.values())

    # --- save / load ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to folder ``path`` atomically (replacing an older trace there)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not (path / "manifest.json").is_file():
            if any(path.iterdir()) if path.is_dir() else True:
                raise TraceError(f"{path} exists and is not a trace folder: refusing to overwrite it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
        try:
            tensors = {
                f"{e.seq}/{name}": t.detach().cpu().contiguous()
                for e in self.events
                for name, t in e.tensors.items()
            }
            save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": FORMAT})
            doc = {"format": FORMAT, "version": VERSION, "meta": self.meta,
                   "events": [e.to_json() for e in self.events]}
            (tmp / "events.json").write_text(json.dumps(doc, indent=1, default=_json_default))
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "files": {n: _digest(tmp / n) for n in ("events.json", "tensors.safetensors")},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            # Swap in: the old trace stays complete until the new one is whole.
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:  # put the old trace back where it was
                    os.replace(old, path)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace folder; needs no model, no weights and no GPU."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise TraceError(f"{path}: not a trace folder (manifest.json missing)")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError
        except (ValueError, RecursionError, KeyError, TypeError):  # ValueError: bad JSON/UTF-8
            raise TraceError(
                f"{path}/manifest.json is corrupt: re-copy the folder or re-record the trace"
            ) from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise TraceError(f"{path}: unsupported trace format {manifest.get('format')!r} v{manifest.get('version')}")
        for name in ("events.json", "tensors.safetensors"):
            f = path / name
            if not f.is_file():
                raise TraceError(f"{path}: {name} is missing (an incomplete copy?)")
            if files.get(name) != _digest(f):
                raise TraceError(
                    f"{f}: size or SHA-256 differs from manifest.json: the file was truncated or "
                    "edited after saving; re-copy or re-record the trace"
                )
        try:
            tensors = load_file(str(path / "tensors.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise TraceError(f"{path}/tensors.safetensors cannot be read: {exc}") from None
        # The digests matched, so these fail only for a folder written by something else (or
        # edited together with its manifest): still one clear error, never a bare KeyError.
        events = path / "events.json"
        try:
            doc = json.loads(events.read_text(encoding="utf-8"))
            trace = cls(meta=dict(doc.get("meta", {})))
            for raw in doc.get("events", []):
                trace.add(_event_from_json(raw, path))
            for key, t in tensors.items():
                seq, _, name = key.partition("/")
                trace.events[int(seq)].tensors[name] = t
        except TraceError:
            raise
        except (ValueError, RecursionError, AttributeError, TypeError, IndexError) as exc:
            raise TraceError(
                f"{events}: not a valid trace ({exc.__class__.__name__}: {exc}); it was written "
                "by another tool or edited together with manifest.json; re-record the trace"
            ) from None
        return trace


def _event_from_json(raw: dict, path: Path) -> Event:
    stage = raw.get("stage") if isinstance(raw, dict) else None
    cls = EVENT_TYPES.get(stage) if isinstance(stage, str) else None
    if cls is None:
        raise TraceError(f"{path}/events.json: unknown stage {stage!r}")
    names = {f.name for f in dataclasses.fields(cls)} - {"tensors"}
    kwargs = {k: v for k, v in raw.items() if k in names}
    return cls(**kwargs)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
