"""tracer.dtypes: the dtypes declared once, and what takes its names from there (the config's
check and memory table, tracer.load's dtype, the CLI's --dtype, the benchmarks)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tracer import api, config, dtypes
from tracer.cli import build_parser
from tracer.config import LlamaConfig
from tracer.errors import ConfigError, DeviceError

TRACER = Path(__file__).resolve().parents[1] / "tracer"
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("d", dtypes.ALL, ids=lambda d: d.name)
def test_each_dtype_is_torchs_of_that_name_and_size(d):
    t = d.as_torch()
    assert isinstance(t, torch.dtype) and t.itemsize == d.bytes and dtypes.name_of(t) == d.name
    assert config.dtype_bytes(d.name) == config.dtype_bytes(t) == d.bytes
    assert LlamaConfig(**SIZES, torch_dtype=d.name).memory_bytes(d.name) == d.bytes * LlamaConfig(**SIZES).num_parameters


def test_the_runtime_dtypes_are_what_load_and_the_cli_take():
    assert dtypes.RUNTIME[0] == dtypes.FLOAT32.name  # the reference first
    assert set(dtypes.RUNTIME) == {d.name for d in dtypes.ALL if d.computes}
    assert list(api.DTYPES) == list(dtypes.RUNTIME)
    assert all(api.DTYPES[n] == dtypes.torch_dtype(n) for n in dtypes.RUNTIME)
    cfg = LlamaConfig(**SIZES)
    for name in dtypes.RUNTIME:
        assert api.pick_dtype(name, cfg, torch.device("cpu")) == dtypes.torch_dtype(name)
    counted_only = [d.name for d in dtypes.ALL if not d.computes]
    assert counted_only  # float64: a config may name it; nothing computes in it
    for name in counted_only:
        with pytest.raises(DeviceError, match=", ".join(repr(n) for n in (dtypes.AUTO, *dtypes.RUNTIME[:-1]))):
            api.pick_dtype(name, cfg, torch.device("cpu"))
    parser = build_parser()
    assert parser.parse_args(["info"]).dtype == dtypes.AUTO
    for name in (dtypes.AUTO, *dtypes.RUNTIME):
        assert parser.parse_args(["info", "--dtype", name]).dtype == name
    for name in counted_only:
        with pytest.raises(SystemExit):  # argparse: not one of the choices
            parser.parse_args(["info", "--dtype", name])
    assert [row["dtype"] for row in cfg.memory_table()] == list(dtypes.RUNTIME)


def test_the_benchmarks_take_the_same_table():
    from benchmarks import speed

    assert speed.DTYPES is api.DTYPES


def test_a_config_names_any_declared_dtype_and_nothing_else(tmp_path):
    raw = {"model_type": "llama", **SIZES}
    for d in dtypes.ALL:
        assert LlamaConfig.from_dict({**raw, "torch_dtype": d.name}).torch_dtype == d.name
    assert LlamaConfig.from_dict(raw).torch_dtype == dtypes.FLOAT32.name  # transformers' default
    with pytest.raises(ConfigError, match=str(sorted(dtypes.BY_NAME)).replace("[", r"\[")):
        LlamaConfig.from_dict({**raw, "torch_dtype": "int8"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**raw, "dtype": "torch.bfloat16"}))
    with pytest.raises(ConfigError, match="write 'bfloat16'"):
        LlamaConfig.from_file(path)


@pytest.mark.parametrize("module", ["dtypes.py", "config.py", "knobs.py"])
def test_the_bottom_layer_modules_import_no_torch(module):
    """config.json's arithmetic needs no torch: these modules import it nowhere at run time (a
    ``TYPE_CHECKING`` block and a function's own import aside)."""
    tree = ast.parse((TRACER / module).read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in top_level if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] in ("torch", "numpy")}, names
