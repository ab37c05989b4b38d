"""config.json read as transformers reads it: mixed 4.x/5.x styles, conflicting keys, defaults.

Each row of the matrix is a small Llama config.json (2 layers) with one mix of keys. transformers reads
it (``AutoConfig.from_pretrained``, then builds ``LlamaForCausalLM`` and runs it, as ``from_pretrained``
would) and we read it (``LlamaConfig.from_file``). No expected value is written here: the expected
values are transformers' own. A row says only what kind of outcome it is:

* ``SAME``: transformers runs it; we must read the same effective values (and the same RoPE
  frequencies), warn exactly the expected one-line warnings, and nothing else.
* ``REFUSED``: transformers raises (loading, building or running); we must raise ConfigError naming
  the field.
* ``UNSUPPORTED``: transformers runs something this runtime does not implement (yarn, int8...); we must
  raise ConfigError naming the field's value.
* ``STRICTER``: transformers only warns and computes nonsense (a zero RoPE base or factor, eps 0); we
  refuse on purpose, naming the field.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tracer
from tracer.config import ConfigWarning, LlamaConfig
from tracer.errors import ConfigError
from tracer.model import rope_inv_freq

transformers = pytest.importorskip("transformers")

SAME, REFUSED, UNSUPPORTED, STRICTER = "same", "refused", "unsupported", "stricter"
DROP = object()  # as a value in ``changes``: remove the key from the base config

BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}
L3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LIN2 = {"rope_type": "linear", "factor": 2.0}


@dataclass(frozen=True)
class Row:
    id: str
    changes: dict
    outcome: str = SAME
    field: str = ""  # for the error rows: what the ConfigError message must name
    warns: tuple[str, ...] = ()  # for SAME rows: one regex per expected ConfigWarning


ROWS = [
    # --- both styles: a non-empty rope_scaling replaces rope_parameters whole (its theta too) ----
    Row("both-agree-but-theta-only-in-params", {"rope_scaling": LIN2, "rope_parameters": {**LIN2, "rope_theta": 500.0}},
        warns=(r"rope_parameters\.rope_theta=500\.0 is ignored.*the default \(10000\.0\)",)),
    Row("both-agree-fully", {"rope_scaling": {**LIN2, "rope_theta": 500.0},
                             "rope_parameters": {**LIN2, "rope_theta": 500.0}}),
    Row("both-type-differs", {"rope_scaling": {**LIN2, "rope_theta": 9.0},
                              "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 9.0}},
        warns=(r"rope_scaling and rope_parameters disagree \(rope_type 'linear' vs 'dynamic'\).*reads rope_scaling",)),
    Row("both-factor-differs", {"rope_scaling": LIN2, "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
        warns=(r"disagree \(factor 2\.0 vs 4\.0\)",)),
    Row("both-theta-differs", {"rope_scaling": {**LIN2, "rope_theta": 100.0},
                               "rope_parameters": {**LIN2, "rope_theta": 500.0}},
        warns=(r"rope_parameters\.rope_theta=500\.0 is ignored.*rope_scaling\.rope_theta \(100\.0\)",)),
    Row("both-plus-top-level-theta", {"rope_theta": 300.0, "rope_scaling": LIN2,
                                      "rope_parameters": {**LIN2, "rope_theta": 500.0}},
        warns=(r"rope_parameters\.rope_theta=500\.0 is ignored.*from rope_theta \(300\.0\)",)),
    Row("scaling-null-beside-params", {"rope_scaling": None, "rope_parameters": {**LIN2, "rope_theta": 500.0}}),
    Row("scaling-empty-beside-params", {"rope_scaling": {}, "rope_parameters": {**LIN2, "rope_theta": 500.0}}),
    Row("scaling-false-beside-params", {"rope_scaling": False, "rope_parameters": LIN2}),
    Row("params-null-beside-scaling", {"rope_parameters": None, "rope_theta": 300.0,
                                       "rope_scaling": {"type": "linear", "factor": 2.0}}),
    Row("params-string-beside-scaling", {"rope_parameters": "linear", "rope_scaling": LIN2},
        REFUSED, "rope_parameters"),
    Row("llama3-scaling-lacks-key-params-has-it",
        {"rope_scaling": {k: v for k, v in {"rope_type": "llama3", **L3}.items() if k != "low_freq_factor"},
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, **L3}},
        REFUSED, "low_freq_factor"),
    Row("llama3-params-lacks-key-scaling-has-it",
        {"rope_scaling": {"rope_type": "llama3", **L3},
         "rope_parameters": {k: v for k, v in {"rope_type": "llama3", **L3}.items() if k != "low_freq_factor"}},
        warns=(r"disagree \(low_freq_factor 1\.0 vs absent\)",)),
    # --- top-level rope_theta beside rope_parameters: the dict's key wins, the top level fills a gap ---
    Row("top-theta-agrees-with-params", {"rope_theta": 500, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 500.0}}),
    Row("top-theta-disagrees-with-params", {"rope_theta": 300.0, "rope_parameters": {"rope_type": "default",
                                                                                    "rope_theta": 500.0}},
        warns=(r"rope_theta=300\.0 is ignored.*rope_parameters\.rope_theta \(500\.0\)",)),
    Row("top-theta-fills-params-gap", {"rope_theta": 300.0, "rope_parameters": LIN2}),
    Row("top-theta-fills-empty-params", {"rope_theta": 77.0, "rope_parameters": {}}),
    Row("top-theta-null-params-theta", {"rope_theta": None, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 50.0}},
        warns=(r"rope_theta=None is ignored",)),
    Row("top-theta-null", {"rope_theta": None}, REFUSED, "rope_theta"),
    Row("top-theta-null-beside-scaling", {"rope_theta": None, "rope_scaling": LIN2}, REFUSED, "rope_theta"),
    Row("params-theta-null", {"rope_parameters": {"rope_type": "default", "rope_theta": None}},
        REFUSED, "rope_parameters.rope_theta"),
    Row("theta-string", {"rope_theta": "1000"}, REFUSED, "rope_theta"),
    Row("theta-zero", {"rope_theta": 0.0}, STRICTER, "rope_theta"),
    Row("theta-bool", {"rope_theta": True}, STRICTER, "rope_theta"),  # transformers computes with 1
    # --- legacy 'type' beside 'rope_type' ----------------------------------------------------------
    Row("legacy-type-only", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    Row("legacy-type-in-params", {"rope_parameters": {"type": "linear", "factor": 3.0, "rope_theta": 99.0}}),
    Row("type-vs-rope_type-in-scaling", {"rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}},
        warns=(r"rope_scaling\.rope_type='linear' and rope_scaling\.type='dynamic' disagree",)),
    Row("type-vs-rope_type-in-params", {"rope_parameters": {"type": "dynamic", "rope_type": "linear",
                                                            "factor": 2.0}},
        warns=(r"rope_parameters\.rope_type='linear' and rope_parameters\.type='dynamic' disagree",)),
    Row("type-null-rope_type-linear", {"rope_scaling": {"type": None, "rope_type": "linear", "factor": 2.0}},
        warns=(r"rope_type='linear' and rope_scaling\.type=None disagree",)),
    Row("rope_type-null", {"rope_parameters": {"rope_type": None, "rope_theta": 500.0}}, REFUSED, "rope_type"),
    Row("rope_type-null-type-linear", {"rope_parameters": {"rope_type": None, "type": "linear", "factor": 2.0}},
        REFUSED, "rope_type"),
    # --- rope types and their keys ----------------------------------------------------------------
    Row("linear-missing-factor", {"rope_scaling": {"rope_type": "linear"}}, REFUSED, "factor"),
    Row("linear-factor-null", {"rope_scaling": {"rope_type": "linear", "factor": None}}, REFUSED, "factor"),
    Row("linear-factor-string", {"rope_scaling": {"rope_type": "linear", "factor": "2"}}, REFUSED, "factor"),
    Row("linear-factor-below-one", {"rope_scaling": {"rope_type": "linear", "factor": 0.5}},
        warns=(r"'factor' is 0\.5",)),
    Row("linear-factor-zero", {"rope_scaling": {"rope_type": "linear", "factor": 0}}, STRICTER, "factor"),
    Row("dynamic", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 700.0}}),
    Row("dynamic-with-unused-key", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                        "original_max_position_embeddings": 16}},
        warns=(r"rope keys \['original_max_position_embeddings'\] are ignored for rope type 'dynamic'",)),
    Row("default-with-factor", {"rope_scaling": {"rope_type": "default", "factor": 2.0}},
        warns=(r"rope keys \['factor'\] are ignored for rope type 'default'",)),
    Row("llama3-full", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, **L3}}),
    Row("llama3-v4-style", {"rope_theta": 500.0, "rope_scaling": {"rope_type": "llama3", **L3}}),
    Row("llama3-missing-original-max", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
        warns=(r"no original_max_position_embeddings; transformers uses max_position_embeddings \(64\)",)),
    Row("llama3-top-level-original-max-overrides", {"rope_parameters": {"rope_type": "llama3", **L3},
                                                   "original_max_position_embeddings": 32},
        warns=(r"top-level original_max_position_embeddings=32 overrides "
               r"rope_parameters\.original_max_position_embeddings=16",)),
    Row("llama3-top-level-original-max-fills-gap",
        {"rope_scaling": {k: v for k, v in {"rope_type": "llama3", **L3}.items()
                          if k != "original_max_position_embeddings"},
         "original_max_position_embeddings": 32}),
    Row("llama3-original-max-float", {"rope_parameters": {"rope_type": "llama3", **L3,
                                                          "original_max_position_embeddings": 16.0}}),
    Row("llama3-high-below-low", {"rope_parameters": {"rope_type": "llama3", **L3, "low_freq_factor": 4.0,
                                                      "high_freq_factor": 1.0}},
        warns=(r"high_freq_factor \(1\.0\) should exceed low_freq_factor \(4\.0\)",)),
    Row("llama3-missing-factor", {"rope_parameters": {"rope_type": "llama3", "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0}}, REFUSED, "factor"),
    Row("llama3-low-null", {"rope_parameters": {"rope_type": "llama3", **L3, "low_freq_factor": None}},
        REFUSED, "low_freq_factor"),
    Row("llama3-original-max-null", {"rope_parameters": {"rope_type": "llama3", **L3,
                                                         "original_max_position_embeddings": None}},
        REFUSED, "original_max_position_embeddings"),
    Row("llama3-top-level-original-max-null", {"rope_parameters": {"rope_type": "llama3", **L3},
                                              "original_max_position_embeddings": None},
        REFUSED, "original_max_position_embeddings"),
    Row("yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}},
        UNSUPPORTED, "'yarn'"),
    Row("longrope", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                      "long_factor": [1.0] * 4, "original_max_position_embeddings": 32}},
        UNSUPPORTED, "'longrope'"),
    Row("proportional", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 100.0,
                                             "partial_rotary_factor": 0.5}}, UNSUPPORTED, "'proportional'"),
    Row("unknown-rope-type", {"rope_scaling": {"rope_type": "foo", "factor": 2.0}}, REFUSED, "'foo'"),
    Row("rope-type-wrong-case", {"rope_scaling": {"rope_type": "Linear", "factor": 2.0}}, REFUSED, "'Linear'"),
    Row("partial-rotary-default", {"partial_rotary_factor": 0.5},
        warns=(r"partial_rotary_factor=0\.5 is ignored",)),
    Row("partial-rotary-linear", {"partial_rotary_factor": 0.5, "rope_scaling": LIN2},
        REFUSED, "partial_rotary_factor"),
    Row("partial-rotary-one-linear", {"partial_rotary_factor": 1.0, "rope_scaling": LIN2}),
    Row("partial-rotary-null-in-dynamic", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                               "partial_rotary_factor": None}},
        REFUSED, "partial_rotary_factor"),
    Row("partial-rotary-null-in-default", {"rope_parameters": {"rope_type": "default",
                                                               "partial_rotary_factor": None}}),
    # --- dtype beside torch_dtype: dtype wins unless null ---------------------------------------------
    Row("dtype-vs-torch_dtype", {"dtype": "bfloat16", "torch_dtype": "float16"},
        warns=(r"dtype='bfloat16' and torch_dtype='float16' disagree; transformers reads dtype",)),
    Row("dtype-agrees-with-torch_dtype", {"dtype": "bfloat16", "torch_dtype": "bfloat16"}),
    Row("dtype-null-torch_dtype", {"dtype": None, "torch_dtype": "float16"}),
    Row("torch_dtype-only", {"torch_dtype": "bfloat16"}),
    Row("dtype-float64", {"dtype": "float64"}),
    Row("dtype-torch-prefix", {"dtype": "torch.float16"}, REFUSED, "dtype"),
    Row("dtype-unknown", {"dtype": "float99"}, REFUSED, "dtype"),
    Row("torch_dtype-auto", {"torch_dtype": "auto"}, REFUSED, "torch_dtype"),
    Row("dtype-int8", {"dtype": "int8"}, UNSUPPORTED, "'int8'"),
    # --- shapes -------------------------------------------------------------------------------------
    Row("head_dim-null", {"head_dim": None}),
    Row("head_dim-explicit-consistent", {"head_dim": 8}),
    Row("head_dim-explicit-inconsistent", {"head_dim": 16}),
    Row("head_dim-set-hidden-not-divisible", {"hidden_size": 30, "head_dim": 16}, REFUSED, "hidden_size"),
    Row("head_dim-odd", {"head_dim": 5}, REFUSED, "head_dim"),
    Row("kv-heads-null", {"num_key_value_heads": None}),
    Row("kv-heads-absent", {"num_key_value_heads": DROP}),
    Row("kv-heads-not-dividing", {"num_key_value_heads": 3}, REFUSED, "num_key_value_heads"),
    # --- other fields: defaults and strict types --------------------------------------------------
    Row("defaults", {k: DROP for k in ("max_position_embeddings", "rms_norm_eps", "num_key_value_heads",
                                       "bos_token_id", "eos_token_id", "tie_word_embeddings")}),
    Row("eos-list-bos-null-tied", {"eos_token_id": [2, 3], "bos_token_id": None, "tie_word_embeddings": True}),
    Row("rms_norm_eps-null", {"rms_norm_eps": None}, REFUSED, "rms_norm_eps"),
    Row("rms_norm_eps-integer", {"rms_norm_eps": 1}, REFUSED, "rms_norm_eps"),
    Row("rms_norm_eps-zero", {"rms_norm_eps": 0.0}, STRICTER, "rms_norm_eps"),
    Row("max_position_embeddings-null", {"max_position_embeddings": None}, REFUSED, "max_position_embeddings"),
    Row("tie_word_embeddings-null", {"tie_word_embeddings": None}, REFUSED, "tie_word_embeddings"),
    Row("initializer_range-integer", {"initializer_range": 0}, REFUSED, "initializer_range"),
    Row("initializer_range-out-of-interval", {"initializer_range": 2.0}, REFUSED, "initializer_range"),
    Row("use_cache-string", {"use_cache": "yes"}, REFUSED, "use_cache"),
    Row("attention_dropout-bool", {"attention_dropout": True}, REFUSED, "attention_dropout"),
    Row("pretraining_tp-null", {"pretraining_tp": None}),
]


def write_config(folder: Path, changes: dict) -> Path:
    raw = dict(BASE)
    for key, value in changes.items():
        if value is DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder / "config.json"


def transformers_runs(folder: Path):
    """transformers' reading: the config after building and running the model (the rotary embedding
    completes rope_parameters then), and the model. Raises whatever transformers raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(folder)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]))
    return config, model


def their_values(config) -> dict:
    rope = config.rope_parameters
    values = {"rope_type": rope["rope_type"], "theta": float(rope["rope_theta"])}
    if rope["rope_type"] != "default":
        values["factor"] = float(rope["factor"])
    if rope["rope_type"] == "llama3":
        values.update(low=float(rope["low_freq_factor"]), high=float(rope["high_freq_factor"]),
                      original=int(rope["original_max_position_embeddings"]))
    eos = config.eos_token_id
    return values | {
        "dtype": str(config.dtype).replace("torch.", "") if config.dtype is not None else "float32",
        "head_dim": config.head_dim, "kv_heads": config.num_key_value_heads, "eps": config.rms_norm_eps,
        "max_positions": config.max_position_embeddings, "tie": config.tie_word_embeddings,
        "bos": config.bos_token_id, "eos": tuple(eos) if isinstance(eos, list) else eos,
    }


def our_values(cfg: LlamaConfig) -> dict:
    rope = cfg.rope
    values = {"rope_type": rope.rope_type, "theta": rope.theta}
    if rope.rope_type != "default":
        values["factor"] = rope.factor
    if rope.rope_type == "llama3":
        values.update(low=rope.low_freq_factor, high=rope.high_freq_factor,
                      original=rope.original_max_position_embeddings)
    return values | {
        "dtype": cfg.torch_dtype, "head_dim": cfg.head_dim, "kv_heads": cfg.num_key_value_heads,
        "eps": cfg.rms_norm_eps, "max_positions": cfg.max_position_embeddings,
        "tie": cfg.tie_word_embeddings, "bos": cfg.bos_token_id, "eos": cfg.eos_token_id,
    }


def read_ours(path: Path, expected_warnings: tuple[str, ...]) -> LlamaConfig:
    """Our reading; it must warn exactly the expected ConfigWarnings (each one line), or none."""
    if not expected_warnings:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            return LlamaConfig.from_file(path)
    with pytest.warns(ConfigWarning) as record:
        cfg = LlamaConfig.from_file(path)
    messages = [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]
    assert len(messages) == len(expected_warnings), messages
    for pattern in expected_warnings:
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)
    assert all("\n" not in m and m.startswith(str(path)) for m in messages)
    return cfg


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_config_is_read_as_transformers_reads_it(row, tmp_path):
    path = write_config(tmp_path, row.changes)
    if row.outcome == REFUSED:
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises is a refusal
            transformers_runs(tmp_path)
    else:
        their_config, their_model = transformers_runs(tmp_path)
    if row.outcome != SAME:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            with pytest.raises(ConfigError) as info:
                LlamaConfig.from_file(path)
        message = str(info.value)
        assert row.field in message and message.startswith(str(path)) and "\n" not in message
        return
    ours = read_ours(path, row.warns)
    assert our_values(ours) == their_values(their_config)
    # The frequencies themselves, so that every RoPE key is checked where it is used.
    torch.testing.assert_close(rope_inv_freq(ours), their_model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


def test_matrix_rows_are_unique_and_cover_each_outcome():
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert {r.outcome for r in ROWS} == {SAME, REFUSED, UNSUPPORTED, STRICTER}
    assert all(r.field for r in ROWS if r.outcome != SAME)


# ---------------------------------------------------------------------------------------------
# End to end: a mixed-style checkpoint gives transformers' logits, and the mix matters.

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# (id, keys written over the base config, the same file read the other way, the warning expected).
# The base checkpoint's config.json has rope_parameters {linear, factor 2.0, rope_theta 500.0}.
E2E = [
    ("rope_scaling-beside-rope_parameters",
     {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {},
     r"disagree \(factor 4\.0 vs 2\.0\)"),
    ("top-level-rope_theta-fills-rope_parameters",
     {"rope_theta": 50.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, None),
    ("top-level-original-max-overrides-llama3",
     {"rope_parameters": LLAMA3, "original_max_position_embeddings": 128}, {"rope_parameters": LLAMA3},
     r"top-level original_max_position_embeddings=128 overrides"),
]


def _hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _variant(base: Path, folder: Path, changes: dict) -> Path:
    import builders

    shutil.copytree(base, folder)
    builders.edit_config(folder, **changes)
    return folder


@pytest.mark.parametrize("case", E2E, ids=[c[0] for c in E2E])
def test_mixed_style_checkpoint_gives_transformers_logits(case, make_checkpoint, tmp_path):
    _, mixed, other_reading, warning = case
    base, _ = make_checkpoint(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0)
    folder = _variant(base, tmp_path / "mixed", mixed)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ConfigWarning)
        ours = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    ids = ours.tokenizer.encode("The people of the world came back to the little state " * 3)
    expected = _hf_logits(folder, ids)
    torch.testing.assert_close(ours.logits(ids), expected, atol=1e-4, rtol=0)
    # The other reading of the same keys gives other logits: a wrong precedence cannot pass.
    wrong = _hf_logits(_variant(base, tmp_path / "other", other_reading), ids)
    assert (wrong - expected).abs().max() > 1e-2
    said = [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]
    assert any(re.search(warning, m) for m in said) if warning else not said, said
