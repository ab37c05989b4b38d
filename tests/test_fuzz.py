"""Fuzzing the three parsers that read untrusted files: config.json, the shard index, safetensors.

Whatever the input, only a clean result or a ``TracerError`` may come out, and no file outside the
model folder is ever opened (opens are recorded by wrapping ``open``/``io.open``/``os.open`` here,
in the test only). Examples are derandomized so that CI sees the same inputs every run.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from failure_modes import assert_inside, opened_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import checkpoint, resolution, safetensors_file
from tracer.config import LlamaConfig
from tracer.errors import TracerError
from tracer.model import LlamaModel

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
N_CONFIG, N_INDEX, N_BYTES = 3000, 1500, 1500

TINY = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)


_MODEL: list[LlamaModel] = []


def load_into_model(folder: Path) -> None:
    """resolve + load_weights into a tiny model (one, reused); warnings (unexpected tensors) are fine."""
    resolved = resolution.resolve(folder)
    if not _MODEL:
        _MODEL.append(LlamaModel(TINY, device="meta").allocate("cpu"))
    model = _MODEL[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in checkpoint.load_weights(model, resolved):
            pass


# ---------------------------------------------------------------------------------------------
# config.json


@functools.cache
def _base_configs() -> list[dict]:
    v4 = TINY.to_hf_dict()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8}
    v5["dtype"] = "bfloat16"
    return [v4, v5]


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**63, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 1e-320]),
    st.text(max_size=12), st.sampled_from(["llama", "default", "llama3", "linear", "dynamic", "yarn",
                                           "silu", "float16", "torch.bfloat16", "LlamaForCausalLM"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "x"]), scalars,
                                   max_size=3))
rope_keys = st.sampled_from(["rope_type", "type", "rope_theta", "factor", "low_freq_factor",
                             "high_freq_factor", "original_max_position_embeddings"])
rope_dicts = st.dictionaries(rope_keys, values, max_size=7)
config_keys = st.sampled_from(sorted(set(_base_configs()[0]) | set(_base_configs()[1]) | {"type"}))
mutation = st.one_of(
    st.tuples(st.just("drop"), config_keys),
    st.tuples(st.just("set"), config_keys, values),
    st.tuples(st.just("rope"), st.sampled_from(["rope_parameters", "rope_scaling"]), rope_dicts),
)


@settings(max_examples=N_CONFIG, **FUZZ)
@given(base=st.sampled_from([0, 1]), mutations=st.lists(mutation, min_size=1, max_size=5))
def test_fuzz_config(base, mutations):
    raw = copy.deepcopy(_base_configs()[base])
    for m in mutations:
        if m[0] == "drop":
            raw.pop(m[1], None)
        else:
            raw[m[1]] = m[2]
    try:
        cfg = LlamaConfig.from_dict(raw)
    except TracerError:
        return
    # A config that parses must be usable: its derived values make sense.
    assert cfg.head_dim > 0 and cfg.head_dim % 2 == 0
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_parameters > 0
    assert cfg.rope.theta > 0


# ---------------------------------------------------------------------------------------------
# model.safetensors.index.json


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory) -> Path:
    """A tiny checkpoint in three shards (our writer), plus a valid shard outside its folder."""
    root = tmp_path_factory.mktemp("fuzz-index")
    torch.manual_seed(0)
    model = LlamaModel(TINY)
    folder = root / "model"
    checkpoint.save_pretrained(model, folder, dtype=torch.float32, max_shard_bytes=1500)
    assert (folder / resolution.INDEX_FILE).is_file()
    shutil.copy(sorted(folder.glob("*.safetensors"))[0], root / "OUTSIDE.safetensors")
    (folder / "escape.safetensors").symlink_to(root / "OUTSIDE.safetensors")
    return folder


def _shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


file_names = st.one_of(
    st.sampled_from(["../OUTSIDE.safetensors", "/etc/passwd", "..", ".", "", "escape.safetensors",
                     "sub/x.safetensors", "..\\OUTSIDE.safetensors", "./model.safetensors",
                     "model.safetensors", "missing.safetensors", "config.json", "/", "~/.bashrc",
                     "model-00001-of-00003.safetensors/../../OUTSIDE.safetensors"]),
    st.sampled_from(["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]),
    st.text(max_size=20), scalars,
)
tensor_names = st.one_of(st.sampled_from(sorted(checkpoint.checkpoint_layout(TINY))), st.text(max_size=12))


@settings(max_examples=N_INDEX, **FUZZ)
@given(
    keep=st.booleans(),
    edits=st.dictionaries(tensor_names, file_names, max_size=6),
    top=st.one_of(st.none(), values),
)
def test_fuzz_index(sharded_tiny, keep, edits, top):
    index = sharded_tiny / resolution.INDEX_FILE
    original = index.read_text()
    raw = json.loads(original)
    try:
        if top is not None and not keep:
            doc = top if not isinstance(top, dict) else {"weight_map": top}
        else:
            wm = raw["weight_map"] if keep else {}
            wm.update(edits)
            doc = {**raw, "weight_map": wm}
        index.write_text(json.dumps(doc))
        with opened_paths() as seen:
            try:
                load_into_model(sharded_tiny)
            except TracerError:
                pass
        assert_inside(seen, sharded_tiny)
    finally:
        index.write_text(original)


# ---------------------------------------------------------------------------------------------
# safetensors bytes


@pytest.fixture(scope="module")
def single_tiny(tmp_path_factory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("fuzz-bytes") / "model"
    torch.manual_seed(0)
    checkpoint.save_pretrained(LlamaModel(TINY), folder, dtype=torch.float16)
    return folder, (folder / resolution.SINGLE_FILE).read_bytes()


byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 2, 7, 8, 100, 2**31, 2**63, 2**64 - 1])),
)


def mutate(data: bytes, edits, header_len: int) -> bytes:
    """Apply byte edits; positions favour the header (8 + JSON), where parsing happens."""
    b = bytearray(data)
    for e in edits:
        if e[0] == "length":
            b[:8] = e[1].to_bytes(8, "little")
            continue
        span = 8 + header_len + 64 if e[1] % 4 else max(len(b), 1)
        pos = e[1] % max(min(span, len(b)), 1)
        if e[0] == "flip" and b:
            b[pos] ^= 1 << e[2]
        elif e[0] == "set" and b:
            b[pos] = e[2]
        elif e[0] == "truncate":
            del b[pos:]
        elif e[0] == "insert":
            b[pos:pos] = e[2]
        elif e[0] == "delete":
            del b[pos:pos + e[2]]
    return bytes(b)


@settings(max_examples=N_BYTES, **FUZZ)
@given(edits=st.lists(byte_edit, min_size=1, max_size=4))
def test_fuzz_safetensors_bytes(single_tiny, edits):
    folder, data = single_tiny
    shard = folder / resolution.SINGLE_FILE
    shard.write_bytes(mutate(data, edits, int.from_bytes(data[:8], "little")))
    try:
        with opened_paths() as seen:
            try:
                safetensors_file.read_header(shard)
            except TracerError:
                pass
            try:
                load_into_model(folder)
            except TracerError:
                pass
        assert_inside(seen, folder)
    finally:
        shard.write_bytes(data)


def test_recorder_sees_opens_outside():
    """The open recorder itself works: an open outside the folder is caught."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        (Path(b) / "x").write_text("x")
        with opened_paths() as seen:
            Path(b, "x").read_text()
        with pytest.raises(AssertionError, match="outside"):
            assert_inside(seen, Path(a))
