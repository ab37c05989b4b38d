"""Every bad input the tracer refuses, as (area, case, expected error, callable) rows.

``tests/test_errors.py`` runs each row and checks that exactly the expected ``TracerError`` comes
out; the same rows render ``docs/failure-modes.md``, and a test compares the committed file with the
rendering, so the table cannot drift. Regenerate it with::

    python tests/failure_modes.py

Each callable gets a :class:`Workspace` (a fresh copy of a small checkpoint per call, built once by
transformers' ``save_pretrained``) and must raise; paths in messages are shown as ``$MODEL``.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # benchmarks/ (the GGUF writer)

import builders  # noqa: E402
import gguf_builders  # noqa: E402

import tracer  # noqa: E402
from tracer import errors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "failure-modes.md"
BASE_KWARGS = {"shard_size": "60KB"}  # sharded: index.json + several shards, float32


class Workspace:
    """A temporary root with a base checkpoint and fresh copies of it, one per case."""

    def __init__(self, root: Path, base: Path, small_vocab: Path) -> None:
        self.root = Path(root)
        self.base = Path(base)
        self.small_vocab = Path(small_vocab)
        self._n = 0
        self._llm = None
        self._gguf = None

    @classmethod
    def build(cls, root: Path) -> Workspace:
        """Train the tokenizer and build both checkpoints under ``root``."""
        root = Path(root)
        tok = root / "tokenizer"
        builders.train_sentencepiece(tok)
        base = root / "base"
        builders.build_checkpoint(base, tok, **BASE_KWARGS)
        small = root / "small-vocab"
        builders.build_checkpoint(small, tok, vocab_size=300)
        return cls(root, base, small)

    def model(self, source: Path | None = None) -> Path:
        """A fresh copy of the base checkpoint (or of ``source``) to damage."""
        self._n += 1
        dest = self.root / f"case-{self._n:03d}"
        shutil.copytree(source or self.base, dest)
        return dest

    def gguf(self, kind: str = "gpt2-f32", damage: str | None = None) -> Path:
        """A fresh copy of a GGUF file the tests write (tests/gguf_builders.py), maybe damaged."""
        if self._gguf is None:
            self._gguf = gguf_builders.GgufCases(self.root / "gguf", self.root / "tokenizer")
        src = self._gguf.damage(damage) if damage else self._gguf.get(kind).path
        self._n += 1
        dest = self.root / f"case-{self._n:03d}"
        dest.mkdir()
        shutil.copy(src, dest / "model.gguf")
        return dest / "model.gguf"

    @property
    def llm(self) -> tracer.Llama:
        if self._llm is None:
            self._llm = tracer.load(self.base, device="cpu", dtype="float32", progress=False)
        return self._llm

    def normalize(self, message: str) -> str:
        """Message with the machine's paths replaced by ``$MODEL`` / ``$TMP`` / ``$SITE``."""
        import sysconfig

        message = message.replace(sysconfig.get_paths()["purelib"], "$SITE")
        for root in {str(self.root.resolve()), str(self.root)}:
            message = re.sub(re.escape(root) + r"/case-\d+", "$MODEL", message)
            message = message.replace(root, "$TMP")
        return message


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    error: type[errors.TracerError]
    run: Callable[[Workspace], object]


def load(folder: Path, **kwargs):
    kwargs = {"device": "cpu", "dtype": "float32", "progress": False, **kwargs}
    return tracer.load(folder, **kwargs)


def _with_config(**changes):
    drop = tuple(k for k, v in changes.items() if v is _DROP)
    changes = {k: v for k, v in changes.items() if v is not _DROP}

    def run(ws: Workspace):
        m = ws.model()
        builders.edit_config(m, drop=drop, **changes)
        return load(m)

    return run


_DROP = object()


def _write(rel: str, content: str | bytes, *, delete: tuple[str, ...] = ()):
    def run(ws: Workspace):
        m = ws.model()
        for pattern in delete:
            for p in m.glob(pattern):
                p.unlink()
        target = m / rel
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return load(m)

    return run


def _delete(rel: str):
    def run(ws: Workspace):
        m = ws.model()
        (m / rel).unlink()
        return load(m)

    return run


def _weight_map(edit):
    def run(ws: Workspace):
        m = ws.model()
        index = m / "model.safetensors.index.json"
        raw = json.loads(index.read_text())
        edit(raw["weight_map"], ws)
        index.write_text(json.dumps(raw))
        return load(m)

    return run


def _map_first(value):
    def edit(weight_map, ws):
        weight_map["model.embed_tokens.weight"] = value(ws) if callable(value) else value

    return edit


def outside_file(ws: Workspace) -> Path:
    """A valid safetensors file outside every model folder, with a unique name."""
    p = ws.root / "OUTSIDE-sentinel.safetensors"
    if not p.exists():
        shutil.copy(builders.shard_of(ws.base, "model.embed_tokens.weight"), p)
    return p


def no_weights(ws):
    m = ws.model()
    for p in [*m.glob("*.safetensors"), m / "model.safetensors.index.json"]:
        p.unlink()
    return load(m)


def pickle_only(ws):
    m = ws.model()
    for p in [*m.glob("*.safetensors"), m / "model.safetensors.index.json"]:
        p.unlink()
    write_marker_pickle(m / "pytorch_model.bin", ws.root / "UNPICKLED-marker")
    return load(m)


class _Marker:
    """Unpickling this calls ``open(path, "w")``: the marker file proves a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_marker_pickle(dest: Path, marker: Path) -> None:
    dest.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Marker(marker)}))


def symlink_escape(ws):
    m = ws.model()
    shard = builders.shard_of(m, "model.embed_tokens.weight")
    shard.unlink()
    shard.symlink_to(outside_file(ws))
    return load(m)


def _damage_shard(damage):
    def run(ws):
        m = ws.model()
        shard = builders.shard_of(m, "model.embed_tokens.weight")
        data = shard.read_bytes()
        shard.write_bytes(damage(data))
        return load(m)

    return run


def _header_json(data: bytes, text: bytes) -> bytes:
    return len(text).to_bytes(8, "little") + text + data[8 + int.from_bytes(data[:8], "little"):]


def _edit_tensor(edit):
    def run(ws):
        m = ws.model()
        builders.edit_tensors(m, edit)
        return load(m)

    return run


def small_vocab(ws):
    return load(ws.small_vocab)


def _generate(**kwargs):
    def run(ws):
        prompt = kwargs.pop("prompt", "Hello")
        return ws.llm.generate(prompt, capture="off", **kwargs)

    return run


def fp16_overflow(ws):
    """Layer 1's down_proj weights are +-60000, so its output exceeds float16's max (65504)."""
    m = ws.model()
    builders.edit_tensors(m, lambda n, t: torch.where(t >= 0, 6e4, -6e4)
                          if n == "model.layers.1.mlp.down_proj.weight" else t)
    llm = load(m, dtype="float16")
    return llm.generate("Hello there", max_new_tokens=2, capture="off")


def no_cuda(ws):
    with mock.patch("torch.cuda.is_available", return_value=False):
        return load(ws.base, device="cuda")


def kernel_unavailable(ws):
    from tracer.kernels import build

    with mock.patch.dict(os.environ, {"CC": "/nonexistent/cc"}), \
            mock.patch("tracer.kernels.library", build.load):
        return load(ws.base, matvec="kernel")


def gpu_too_small(ws):
    from tracer.api import check_fits
    from tracer.config import LlamaConfig

    cfg = LlamaConfig.from_file(ws.base / "config.json")
    cfg = LlamaConfig.from_dict({**cfg.to_hf_dict(), "num_hidden_layers": 32, "hidden_size": 4096,
                                 "intermediate_size": 11008, "vocab_size": 32000,
                                 "num_attention_heads": 32, "num_key_value_heads": 32,
                                 "head_dim": 128})
    with mock.patch("torch.cuda.mem_get_info", return_value=(8 * 10**9, 24 * 10**9)):
        return check_fits(cfg, torch.device("cuda"), torch.float32)


def _gguf_damaged(damage: str):
    return lambda ws: load(ws.gguf(damage=damage))


def two_ggufs(ws):
    path = ws.gguf()
    shutil.copy(path, path.parent / "other.gguf")
    return load(path.parent)


def not_a_gguf(ws):
    path = ws.gguf()
    path.write_bytes(b"PK\x03\x04 a zip, not a GGUF" + bytes(64))
    return load(path)


def wrong_sha256(ws):
    from dataclasses import replace

    from tracer import catalog

    return catalog.offline_gguf(replace(catalog.CATALOG["smollm2"], sha256="0" * 64))


def _trace_folder(ws) -> Path:
    gen = ws.llm.generate("Hello", max_new_tokens=2, capture="full", points=("blocks.0.attn.pattern",))
    ws._n += 1
    return gen.trace.save(ws.root / f"case-{ws._n:03d}")


def _damage_trace(damage):
    def run(ws):
        folder = _trace_folder(ws)
        damage(folder)
        return tracer.Trace.load(folder)

    return run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _hub_raises(exc_factory):
    def run(ws):
        def fake(*args, **kwargs):
            raise exc_factory()

        with mock.patch("huggingface_hub.snapshot_download", fake):
            return load(Path("some-org/some-llama"))

    return run


def gated_error():
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    request = httpx2.Request("GET", "https://huggingface.co/api/models/some-org/some-llama")
    return GatedRepoError("Access to model some-org/some-llama is restricted.",
                          response=httpx2.Response(401, request=request))


def offline_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")


# The rows of docs/failure-modes.md, in the order shown.
C, K, T, G, D, R, N, H = (errors.ConfigError, errors.CheckpointError, errors.TokenizerError,
                          errors.GenerationError, errors.DeviceError, errors.TraceError,
                          errors.NumericsError, errors.CheckpointError)
CASES: list[Case] = [
    # config.json
    Case("config", "config.json missing", C, _delete("config.json")),
    Case("config", "config.json is not JSON", C, _write("config.json", "{ not json")),
    Case("config", "config.json is a JSON list", C, _write("config.json", "[1, 2]")),
    Case("config", "config.json has a 5000-digit number", C,
         _write("config.json", '{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}")),
    Case("config", "config.json nested 100000 deep", C,
         _write("config.json", "[" * 100_000 + "]" * 100_000)),
    Case("config", "model_type is not llama", C, _with_config(model_type="mistral")),
    Case("config", "architectures is not Llama", C, _with_config(architectures=["MistralForCausalLM"])),
    Case("config", "hidden_size missing", C, _with_config(hidden_size=_DROP)),
    Case("config", "num_hidden_layers is 0", C, _with_config(num_hidden_layers=0)),
    Case("config", "vocab_size negative", C, _with_config(vocab_size=-5)),
    Case("config", "hidden_size is a string", C, _with_config(hidden_size="64")),
    Case("config", "heads do not divide hidden_size", C,
         _with_config(num_attention_heads=5, num_key_value_heads=5, head_dim=_DROP)),
    Case("config", "kv heads do not divide heads", C, _with_config(num_key_value_heads=3)),
    Case("config", "unknown rope type", C,
         _with_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})),
    Case("config", "llama3 rope without its keys", C,
         _with_config(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0})),
    # weight files
    Case("weights", "no weight files", K, no_weights),
    Case("weights", "only pickle pytorch_model.bin (never unpickled)", K, pickle_only),
    Case("weights", "index.json is not JSON", K, _write("model.safetensors.index.json", "{oops")),
    Case("weights", "index.json nested 100000 deep", K,
         _write("model.safetensors.index.json", '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")),
    Case("weights", "index.json weight_map is a list", K,
         _write("model.safetensors.index.json", '{"weight_map": ["a", "b"]}')),
    Case("weights", "index.json names a missing shard", K,
         _weight_map(_map_first("model-00099-of-00099.safetensors"))),
    Case("weights", "index.json path with '..'", K, _weight_map(_map_first("../x.safetensors"))),
    Case("weights", "index.json absolute path", K,
         _weight_map(_map_first(lambda ws: str(outside_file(ws))))),
    Case("weights", "index.json shard is not .safetensors", K,
         _weight_map(_map_first("pytorch_model.bin"))),
    Case("weights", "shard is a symlink out of the folder", K, symlink_escape),
    Case("weights", "shard truncated", K, _damage_shard(lambda d: d[: len(d) // 2])),
    Case("weights", "shard shorter than 8 bytes", K, _damage_shard(lambda d: d[:5])),
    Case("weights", "safetensors header not JSON", K,
         _damage_shard(lambda d: _header_json(d, b"{garbage" + b" " * 20))),
    Case("weights", "safetensors header length absurd (2^62)", K,
         _damage_shard(lambda d: (1 << 62).to_bytes(8, "little") + d[8:])),
    Case("weights", "safetensors header nested 100000 deep", K,
         _damage_shard(lambda d: _header_json(d, b"[" * 100_000 + b"]" * 100_000))),
    Case("weights", "tensor offsets do not fit its shape", K,
         _damage_shard(lambda d: _header_json(d, json.dumps(
             {"model.embed_tokens.weight": {"dtype": "F32", "shape": [400, 64],
                                            "data_offsets": [0, 12]}}).encode()))),
    Case("weights", "tensor has the wrong shape", K,
         _edit_tensor(lambda n, t: t[:, :32] if n == "model.layers.0.mlp.up_proj.weight" else t)),
    Case("weights", "tensor has an integer dtype", K,
         _edit_tensor(lambda n, t: t.to(torch.int32) if n == "model.norm.weight" else t)),
    Case("weights", "tensors missing", K,
         _edit_tensor(lambda n, t: None if n.startswith("model.layers.1.self_attn") else t)),
    Case("weights", "index lists a tensor its shard lacks", K,
         _weight_map(lambda wm, ws: wm.__setitem__("model.layers.0.extra.weight",
                                                   wm["model.embed_tokens.weight"]))),
    # GGUF files (llama.cpp's format)
    Case("gguf", "GGUF truncated inside its tensor data", K, _gguf_damaged("truncated")),
    Case("gguf", "GGUF header claims one more tensor than it holds", K, _gguf_damaged("extra_tensors")),
    Case("gguf", "GGUF tensor whose data lies past the end of the file", K, _gguf_damaged("past_end")),
    Case("gguf", "GGUF tensor of a type nothing can dequantize (Q1_0)", K, _gguf_damaged("undequantizable")),
    Case("gguf", "GGUF of another architecture (qwen2)", K, _gguf_damaged("qwen2")),
    Case("gguf", "GGUF without tokenizer metadata", T, _gguf_damaged("no_tokenizer")),
    Case("gguf", "GGUF whose vocabulary is 'no_vocab' (weights only)", T, _gguf_damaged("no_vocab")),
    Case("gguf", "a .gguf file that is not GGUF", K, not_a_gguf),
    Case("gguf", "two GGUF files in the folder, none named", K, two_ggufs),
    Case("gguf", "gguf_file not in the folder", K, lambda ws: load(ws.gguf().parent, gguf_file="other.gguf")),
    Case("gguf", "offline copy of 'smollm2' with a wrong sha256", K, wrong_sha256),
    # tokenizer
    Case("tokenizer", "no tokenizer.model or tokenizer.json", T, _delete("tokenizer.model")),
    Case("tokenizer", "tokenizer.model corrupt", T, _write("tokenizer.model", b"\x00\x01garbage" * 10)),
    Case("tokenizer", "tokenizer.json corrupt", T,
         _write("tokenizer.json", "{\"model\": 1}", delete=("tokenizer.model",))),
    Case("tokenizer", "tokenizer_config.json not JSON", T, _write("tokenizer_config.json", "{,")),
    Case("tokenizer", "tokenizer vocab larger than the embedding table", T, small_vocab),
    # generation
    Case("generation", "prompt + max_new_tokens > max_position_embeddings", G,
         _generate(max_new_tokens=300)),
    Case("generation", "empty prompt", G, _generate(prompt="")),
    Case("generation", "empty list of prompt ids", G, _generate(prompt=[])),
    Case("generation", "temperature 0 with sampling", G, _generate(do_sample=True, temperature=0.0)),
    Case("generation", "top_p 0", G, _generate(do_sample=True, top_p=0.0)),
    Case("generation", "top_p 1.5", G, _generate(do_sample=True, top_p=1.5)),
    Case("generation", "top_k -1", G, _generate(do_sample=True, top_k=-1)),
    Case("generation", "repetition_penalty 0", G, _generate(repetition_penalty=0.0)),
    Case("generation", "temperature nan", G, _generate(do_sample=True, temperature=float("nan"))),
    Case("generation", "max_new_tokens 0", G, _generate(max_new_tokens=0)),
    Case("generation", "float16 overflow in layer 1's MLP (non-finite logits)", N, fp16_overflow),
    # device
    Case("device", "device='cuda' without a GPU", D, no_cuda),
    Case("device", "unknown device", D, lambda ws: load(ws.base, device="tpu")),
    Case("device", "unsupported dtype", D, lambda ws: load(ws.base, dtype="int8")),
    Case("device", "7B-sized model in float32 on a GPU with 8 GB free", D, gpu_too_small),
    Case("device", "matvec='kernel' where the kernel cannot be built", D, kernel_unavailable),
    # traces
    Case("trace", "events.json edited", R,
         _damage_trace(lambda f: (f / "events.json").write_text(
             (f / "events.json").read_text().replace('"Hello"', '"Howdy"')))),
    Case("trace", "tensors.safetensors truncated", R,
         _damage_trace(lambda f: _truncate(f / "tensors.safetensors"))),
    Case("trace", "manifest.json deleted", R, _damage_trace(lambda f: (f / "manifest.json").unlink())),
    Case("trace", "manifest.json corrupt", R,
         _damage_trace(lambda f: (f / "manifest.json").write_text("{"))),
    Case("trace", "events.json deleted", R, _damage_trace(lambda f: (f / "events.json").unlink())),
    # hub
    Case("hub", "repo id neither a folder nor 'org/name'", H, lambda ws: load(Path("/nonexistent"))),
    Case("hub", "repo not cached and offline", H, _hub_raises(offline_error)),
    Case("hub", "gated repo without access", H, _hub_raises(gated_error)),
]


# ---------------------------------------------------------------------------------------------
# Recording which files are opened (tests only; the library is never patched)

# Python's own files (lazy imports inside torch) are code, not model data: not counted.
CODE_ROOTS = tuple({Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


@contextmanager
def opened_paths():
    """Every path passed to open/io.open/os.open inside the block, resolved."""
    seen: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def rec(file):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(Path(os.fsdecode(file)).resolve())

    def fake_open(file, *args, **kwargs):
        rec(file)
        return real_open(file, *args, **kwargs)

    def fake_os_open(path, *args, **kwargs):
        rec(path)
        return real_os_open(path, *args, **kwargs)

    with mock.patch.object(builtins, "open", fake_open), mock.patch.object(io, "open", fake_open), \
            mock.patch.object(os, "open", fake_os_open):
        yield seen


def assert_inside(seen: list[Path], folder: Path) -> None:
    """Fail if a path in ``seen`` lies outside ``folder`` (Python's own files excepted)."""
    folder = folder.resolve()
    outside = [p for p in seen if p != folder and folder not in p.parents
               and not any(r in p.parents for r in CODE_ROOTS)]
    assert not outside, f"opened outside the model folder: {outside}"


def run_case(case: Case, ws: Workspace) -> BaseException | None:
    """Run one case; returns what it raised (None if it did not raise)."""
    try:
        case.run(ws)
    except BaseException as exc:  # noqa: BLE001 - the caller judges what came out
        return exc
    return None


def render(rows: list[tuple[Case, str]]) -> str:
    """The markdown table for (case, normalized message) rows."""
    out = [
        "# Failure modes",
        "",
        "Every bad input below ends in one `TracerError` subclass with a message that names the",
        "file, field or value, what was expected and what to do. The CLI prints the message as one",
        "line `error: ...` and exits with status 2 (`--debug` adds the traceback).",
        "",
        "This file is generated from `tests/failure_modes.py` (the same cases `tests/test_errors.py`",
        "runs); regenerate it with `python tests/failure_modes.py`. Paths are shown as `$MODEL`",
        "(the model folder).",
        "",
        "Unexpected tensors in a checkpoint are not an error: they produce a `UserWarning` naming",
        "them and are ignored. Pickle files (`.bin`, `.pth`) are never opened.",
        "",
    ]
    area = None
    for case, message in rows:
        if case.area != area:
            area = case.area
            out += [f"## {area}", "", "| case | error | message |", "|---|---|---|"]
        msg = message.replace("|", "\\|").replace("\n", " ")
        out.append(f"| {case.name} | `{case.error.__name__}` | {msg} |")
        nxt = rows.index((case, message)) + 1
        if nxt == len(rows) or rows[nxt][0].area != area:
            out.append("")
    return "\n".join(out)


def collect(ws: Workspace) -> list[tuple[Case, str]]:
    """Run every case; raises AssertionError if one does not give its expected error."""
    rows = []
    for case in CASES:
        exc = run_case(case, ws)
        if type(exc) is not case.error:
            raise AssertionError(f"{case.area}/{case.name}: expected {case.error.__name__}, got {exc!r}")
        rows.append((case, ws.normalize(str(exc))))
    return rows


def main() -> int:
    import tempfile
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.build(Path(tmp))
        text = render(collect(ws))
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(text)
    print(f"wrote {TABLE} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
