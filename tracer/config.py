"""Stage 1 of the walkthrough: config.json -> a typed, frozen config, and the memory arithmetic.

Two hub styles exist (see shared notes): transformers 4.x writes ``rope_theta``/``rope_scaling``/
``torch_dtype`` at the top level; 5.x writes ``rope_parameters`` and ``dtype``. Both parse to the same
:class:`LlamaConfig`. A file that mixes them is read as transformers 5.x reads it (a non-empty
``rope_scaling`` replaces ``rope_parameters``; ``dtype`` beats ``torch_dtype``), with a one-line
:class:`ConfigWarning` where the two disagree. generation_config.json parses to :class:`GenerationDefaults`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import dtypes
from .errors import ConfigError
from .knobs import KNOBS, Knobs

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_LLAMA_ARCHS = ("LlamaForCausalLM", "LlamaModel")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (``rope_type`` plus the keys that type needs)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only
    # Per-frequency divisors (head_dim / 2 of them), as a GGUF stores Llama 3.1's scaling: llama.cpp
    # writes the ``rope_freqs`` tensor instead of the llama3 keys, and divides each frequency by it.
    freq_factors: tuple[float, ...] | None = None


def _size(default: Any = MISSING) -> Any:
    """A dimension or a count: a positive integer, read from config.json under its own name
    (required there when it has no default). ``_parse_scalars`` and ``_validate`` take the list of
    sizes from these fields."""
    return field(default=default, metadata={"size": True})


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the runtime needs to know about a Llama checkpoint's shape.

    Shape alphabet used across the code: B batch, T tokens, D hidden, H query heads, Hkv key/value
    heads, hd head dim, F MLP intermediate, V vocab.
    """

    vocab_size: int = _size()
    hidden_size: int = _size()
    intermediate_size: int = _size()
    num_hidden_layers: int = _size()
    num_attention_heads: int = _size()
    num_key_value_heads: int | None = _size(None)  # None: one per query head (MHA)
    head_dim: int | None = _size(None)  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = _size(2048)
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_theta: float | None = None  # convenience input; folded into ``rope`` by __post_init__
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = dtypes.FLOAT32.name
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        # Fill derived defaults so that every consumer sees concrete numbers.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.rope_theta is not None:
            object.__setattr__(self, "rope", replace(self.rope, theta=float(self.rope_theta)))
            object.__setattr__(self, "rope_theta", None)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        _validate(self)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # Derived values, named once.
    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 = MHA, H = MQA, else GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (Llama 3 lists several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def attention_kind(self) -> str:
        """'MHA', 'GQA' or 'MQA' — the lesson of num_key_value_heads."""
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    def param_counts(self) -> dict[str, int]:
        """Parameter count per component (embedding, per-layer parts, final norm, lm_head)."""
        D, F, V = self.hidden_size, self.intermediate_size, self.vocab_size
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        attn = D * q_out + 2 * D * kv_out + q_out * D
        if self.attention_bias:
            attn += q_out + 2 * kv_out + D
        mlp = 3 * D * F + ((2 * F + D) if self.mlp_bias else 0)
        norms = 2 * D
        return {
            "embed_tokens": V * D,
            "layers": self.num_hidden_layers * (attn + mlp + norms),
            "attention_per_layer": attn,
            "mlp_per_layer": mlp,
            "norm": D,
            "lm_head": 0 if self.tie_word_embeddings else V * D,
        }

    @property
    def num_parameters(self) -> int:
        """Total parameters (a tied lm_head is counted once)."""
        c = self.param_counts()
        return c["embed_tokens"] + c["layers"] + c["norm"] + c["lm_head"]

    def memory_bytes(self, dtype: str) -> int:
        """Bytes the weights take in ``dtype``: parameters x bytes per element."""
        return self.num_parameters * dtype_bytes(dtype)

    def kv_cache_bytes(self, tokens: int, dtype: str, batch: int = 1) -> int:
        """Bytes of a KV cache for ``tokens`` positions: 2 (K and V) x layers x Hkv x hd x tokens."""
        per_token = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
        return batch * tokens * per_token * dtype_bytes(dtype)

    def memory_table(self) -> list[dict[str, Any]]:
        """The walkthrough's arithmetic: the weights in each runtime dtype (bytes and GB)."""
        return [
            {
                "dtype": d,
                "bytes_per_param": dtype_bytes(d),
                "bytes": self.memory_bytes(d),
                "gb": self.memory_bytes(d) / 1e9,
            }
            for d in dtypes.RUNTIME
        ]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Parse a hub config dict (4.x or 5.x style); errors name ``source`` and the field."""
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> LlamaConfig:
        """Read and parse a config.json file."""
        return cls.from_dict(read_json(path, ConfigError), str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 4.x style dict (what most hub repos ship as config.json)."""
        rope = self.rope
        if rope.freq_factors is not None:
            raise ConfigError(
                "this config's rope has per-frequency factors (a GGUF's rope_freqs tensor), which "
                "config.json cannot express; keep the GGUF file as the checkpoint"
            )
        scaling: dict[str, Any] | None = None
        if rope.rope_type != "default":
            scaling = {"rope_type": rope.rope_type, "factor": rope.factor}
            if rope.rope_type == "llama3":
                scaling.update(
                    low_freq_factor=rope.low_freq_factor,
                    high_freq_factor=rope.high_freq_factor,
                    original_max_position_embeddings=rope.original_max_position_embeddings,
                )
        eos = self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": float(self.rms_norm_eps),
            "rope_theta": rope.theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "initializer_range": float(self.initializer_range),
            "pretraining_tp": 1,
            "use_cache": True,
        }

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for trace events and notebooks."""
        d = asdict(self)
        d.pop("rope_theta")
        d["attention_kind"] = self.attention_kind
        d["n_rep"] = self.n_rep
        d["num_parameters"] = self.num_parameters
        return d


# Fields of LlamaConfig by kind, read off the dataclass: the sizes (positive integers) and the flags
# (booleans), each parsed and checked by one loop.
_SIZES: tuple[Field, ...] = tuple(f for f in fields(LlamaConfig) if f.metadata.get("size"))
_FLAGS: tuple[Field, ...] = tuple(f for f in fields(LlamaConfig) if f.type == "bool")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element ("7B x 2 bytes = 14 GB") of a dtype, by name or as a torch dtype."""
    name = dtypes.name_of(dtype)
    if name not in dtypes.BY_NAME:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(dtypes.BY_NAME)}")
    return dtypes.BY_NAME[name].bytes


def read_json(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """Read a JSON object from ``path``; any problem becomes ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read: corrupt or hostile file") from None
    except ValueError:  # json's only other error: an integer of more than 4300 digits
        raise error(f"{path}: a number in the JSON is too long to read: corrupt or hostile file") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# Parsing and validation
#
# The oracle is transformers 5.x reading the same file (``AutoConfig.from_pretrained``, then building
# ``LlamaForCausalLM``). Where config.json says a thing twice, we take the value transformers takes and
# warn (:class:`ConfigWarning`); where transformers refuses the file, or would run something this
# runtime does not implement, we raise ConfigError naming the field. tests/test_config_precedence.py
# checks every rule below against transformers itself.

_DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
# The keys each rope type needs, as transformers' _validate_<type>_rope_parameters lists them: a missing
# one is a KeyError there. (llama3's original_max_position_embeddings is filled in before that check.)
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Keys every rope type accepts; anything else in the dict is ignored (transformers logs "Unrecognized keys").
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
# Fields this runtime does not use, but which transformers' strict LlamaConfig type-checks: a wrong type
# makes transformers refuse the file, so it is refused here too rather than silently ignored.
_UNUSED_TYPED_FIELDS = {
    "use_cache": (bool,),
    "pretraining_tp": (int, type(None)),
    "attention_dropout": (int, float, type(None)),
}
_ABSENT = object()  # marks "key not in the dict" where null is a value of its own


class ConfigWarning(UserWarning):
    """config.json is readable, but gives one setting two different values (4.x and 5.x keys) or holds
    something transformers ignores or only warns about; the one-line message says what is read."""


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def _int_field(raw: dict, key: str, source: str, *, required: bool, default: int | None = None):
    value = raw.get(key, default)
    if value is None:
        if required:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be positive, got {value}")
    return value


def _float_field(raw: dict, key: str, source: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    # abs() first: math.isfinite(10**400) overflows converting the int; comparing does not.
    if wrong_type or abs(value) > sys.float_info.max or not math.isfinite(value):
        raise ConfigError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _strict_float(raw: dict, key: str, source: str, default: float) -> float:
    """A field transformers types as ``float``: its strict dataclass refuses null and integers (``0``)."""
    value = raw.get(key, default)
    if not isinstance(value, float):
        raise ConfigError(
            f"{source}: field {key!r} must be a floating-point number (transformers refuses {value!r}; "
            f"write e.g. {float(default)!r})"
        )
    return _float_field(raw, key, source, default)


def _number(params: dict, key: str, where: str) -> float:
    """A rope key that must hold a number: null and strings make transformers' rope maths fail."""
    if params[key] is None:
        raise ConfigError(f"{where}: {key!r} is null; transformers cannot compute with it: set a number")
    return _float_field(params, key, where, 0.0)


# --- RoPE: which dict, which keys ------------------------------------------------------------


def _pick_rope_dict(raw: dict, source: str) -> tuple[str, dict, dict]:
    """(name, dict transformers reads, the other dict) for the rope settings.

    transformers 5.x (convert_rope_params_to_dict) does ``rope_parameters = rope_scaling or
    rope_parameters``: a non-empty 4.x ``rope_scaling`` replaces the 5.x ``rope_parameters`` whole,
    rope_theta included; a null or empty ``rope_scaling`` is ignored.
    """
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    scaling = raw.get("rope_scaling")
    if scaling and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be an object or null, got {scaling!r}")
    if scaling:
        return "rope_scaling", scaling, params or {}
    return "rope_parameters", params or {}, {}


def _standardize_rope(raw: dict, chosen: dict, max_pos: int) -> dict:
    """The rope dict as transformers completes it before computing frequencies."""
    rope = dict(chosen)
    # convert_rope_params_to_dict: a key inside the dict wins; the top-level 4.x key only fills a gap.
    # setdefault keeps an explicit null, which transformers then cannot compute with.
    rope.setdefault("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    if raw.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    # standardize_rope_params: 'rope_type' wins over the older 'type'.
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] == "llama3":
        # standardize_rope_params runs again when the rotary embedding is built, and then a top-level
        # original_max_position_embeddings (its Phi-3 rule) overrides the dict's; else max_pos fills a gap.
        if "original_max_position_embeddings" in raw:
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", max_pos)
    return rope


def _theta_sources(raw: dict, name: str, chosen: dict, other: dict) -> tuple[str, list[tuple[str, Any]]]:
    """Where rope_theta is read from, and the (label, value) pairs that are present but not read.

    The read dict's key comes first, then the top-level key, then the default; the dict transformers
    ignores (rope_parameters beside a non-empty rope_scaling) is never read.
    """
    readable = [(f"{name}.rope_theta", chosen), ("rope_theta", raw)]
    present = [(label, d["rope_theta"]) for label, d in readable if "rope_theta" in d]
    used = present[0][0] if present else "the default"
    ignored = present[1:]
    if "rope_theta" in other:
        ignored.append(("rope_parameters.rope_theta", other["rope_theta"]))
    return used, ignored


def _parse_rope(raw: dict, source: str, max_pos: int, notes: list[str]) -> RopeConfig:
    """The RopeConfig transformers would compute with; what it says twice or ignores goes to ``notes``."""
    name, chosen, other = _pick_rope_dict(raw, source)
    rope = _standardize_rope(raw, chosen, max_pos)
    theta_label, theta_ignored = _theta_sources(raw, name, chosen, other)
    config = _rope_config(rope, source, name, theta_label, other)
    for label, value in theta_ignored:
        if value != rope["rope_theta"]:
            notes.append(f"{label}={value!r} is ignored; transformers reads rope_theta from {theta_label} "
                         f"({rope['rope_theta']!r}), and so does this runtime")
    notes += _rope_conflicts(raw, name, chosen, other)
    notes += _rope_oddities(raw, chosen, rope, config)
    return config


def _rope_type(rope: dict, source: str, name: str) -> str:
    rope_type = rope["rope_type"]
    if rope_type is None:
        raise ConfigError(
            f"{source}: {name}.rope_type is null; transformers cannot build a rotary embedding from it: "
            f"set one of {list(ROPE_TYPES)} or remove the key"
        )
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unknown rope type {rope_type!r}; this runtime supports {list(ROPE_TYPES)}"
        )
    return rope_type


def _rope_theta(rope: dict, source: str, label: str) -> float:
    if rope["rope_theta"] is None:
        raise ConfigError(f"{source}: {label} is null; transformers cannot compute rotary frequencies "
                          "from it: set a number (10000.0 is the usual base) or remove the key")
    theta = _float_field(rope, "rope_theta", f"{source} {label}", _DEFAULT_ROPE_THETA)
    if theta <= 0:  # transformers runs it: infinite or negative-base frequencies
        raise ConfigError(f"{source}: {label} must be positive, got {theta}")
    return theta


def _rope_config(rope: dict, source: str, name: str, theta_label: str, other: dict) -> RopeConfig:
    """Validate the standardized dict (what transformers refuses, we refuse) and build a RopeConfig."""
    rope_type = _rope_type(rope, source, name)
    theta = _rope_theta(rope, source, theta_label)
    where = f"{source} rope scaling"
    for key in _ROPE_REQUIRED[rope_type]:
        if key not in rope:
            hint = ""
            if key in other:  # the key is there, in the dict transformers does not read
                hint = (f" (rope_parameters has it, but transformers ignores rope_parameters when "
                        f"rope_scaling is set: add {key!r} to rope_scaling)")
            raise ConfigError(f"{where}: rope type {rope_type!r} needs {key!r}{hint}")
    _check_partial_rotary(rope, rope_type, where)
    if rope_type == "default":
        return RopeConfig("default", theta)  # transformers ignores factor & co. for 'default'
    factor = _number(rope, "factor", where)
    if factor <= 0:  # transformers only warns, then divides by it: inf or negative frequencies
        raise ConfigError(f"{where}: 'factor' must be positive for rope type {rope_type!r}")
    if rope_type != "llama3":
        return RopeConfig(rope_type, theta, factor)
    low = _number(rope, "low_freq_factor", where)
    high = _number(rope, "high_freq_factor", where)
    original = _original_max_positions(rope, where)
    return RopeConfig("llama3", theta, factor, low, high, original)


def _original_max_positions(rope: dict, where: str) -> int:
    value = rope["original_max_position_embeddings"]
    if value is None:
        raise ConfigError(f"{where}: 'original_max_position_embeddings' is null; transformers cannot "
                          "compute llama3 frequencies with it: set the pre-training context length")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # transformers computes with 8192.0 exactly as with 8192
    return _int_field({"original_max_position_embeddings": value}, "original_max_position_embeddings",
                      where, required=True)


def _check_partial_rotary(rope: dict, rope_type: str, where: str) -> None:
    """partial_rotary_factor < 1 rotates part of each head: transformers' Llama ignores the key for
    'default', and for the other types runs only 1.0 (null fails, < 1 gives frequencies for part of a
    head that it then cannot apply); this runtime always rotates whole heads."""
    partial = rope.get("partial_rotary_factor", 1.0)
    if rope_type == "default" or partial == 1.0:
        return
    raise ConfigError(
        f"{where}: partial_rotary_factor={partial!r} with rope type {rope_type!r}: transformers' "
        "Llama cannot apply it and this runtime rotates whole heads; remove it"
    )


# --- RoPE: saying what was read --------------------------------------------------------------


def _effective_type(params: dict) -> Any:
    return params.get("rope_type", params.get("type", "default"))


def _rope_conflicts(raw: dict, name: str, chosen: dict, other: dict) -> list[str]:
    """One line per setting given twice with different values, naming the one transformers reads."""
    notes = _rope_dicts_disagree(chosen, other) if other else []
    rope_type, old_type = chosen.get("rope_type", _ABSENT), chosen.get("type", _ABSENT)
    if rope_type not in (_ABSENT, None) and old_type is not _ABSENT and rope_type != old_type:
        notes.append(f"{name}.rope_type={rope_type!r} and {name}.type={old_type!r} disagree; "
                     f"transformers reads rope_type ({rope_type!r}), and so does this runtime")
    key = "original_max_position_embeddings"
    if _effective_type(chosen) == "llama3" and key in raw and key in chosen and chosen[key] != raw[key]:
        notes.append(f"top-level {key}={raw[key]!r} overrides {name}.{key}={chosen[key]!r} (transformers "
                     "gives the top-level key priority when it builds the rotary embedding), and so does "
                     "this runtime")
    return notes


def _rope_dicts_disagree(scaling: dict, params: dict) -> list[str]:
    """Both styles present: rope_scaling is read, rope_parameters ignored; say so when they differ."""
    diffs = []
    if _effective_type(scaling) != _effective_type(params):
        diffs.append(f"rope_type {_effective_type(scaling)!r} vs {_effective_type(params)!r}")
    for key in sorted((scaling.keys() | params.keys()) - {"rope_type", "type", "rope_theta"}):
        a, b = scaling.get(key, _ABSENT), params.get(key, _ABSENT)
        if a != b:
            diffs.append(f"{key} {_show(a)} vs {_show(b)}")
    if not diffs:
        return []
    return [f"rope_scaling and rope_parameters disagree ({'; '.join(diffs)}); transformers reads "
            "rope_scaling and ignores rope_parameters, and so does this runtime"]


def _rope_oddities(raw: dict, chosen: dict, rope: dict, config: RopeConfig) -> list[str]:
    """What transformers runs with only a logged warning (or ignores), said here as a line each."""
    notes = []
    known = set(_ROPE_COMMON_KEYS) | set(_ROPE_REQUIRED[config.rope_type])
    unused = sorted(set(chosen) - known)
    if unused:
        notes.append(f"rope keys {unused} are ignored for rope type {config.rope_type!r} "
                     "(transformers ignores them too)")
    if rope.get("partial_rotary_factor", 1.0) not in (None, 1.0):  # only 'default' gets this far
        notes.append(f"partial_rotary_factor={rope['partial_rotary_factor']!r} is ignored: transformers' "
                     "Llama rotates whole heads for rope type 'default', and so does this runtime")
    if config.rope_type != "default" and config.factor < 1:
        notes.append(f"rope 'factor' is {config.factor} (< 1 compresses positions instead of stretching "
                     "them); transformers warns and runs it, and so does this runtime")
    if config.rope_type != "llama3":
        return notes
    if config.high_freq_factor <= config.low_freq_factor:
        notes.append(f"llama3 high_freq_factor ({config.high_freq_factor}) should exceed low_freq_factor "
                     f"({config.low_freq_factor}); transformers warns and runs it, and so does this runtime")
    key = "original_max_position_embeddings"
    if key not in chosen and key not in raw:
        notes.append(f"llama3 rope has no {key}; transformers uses max_position_embeddings "
                     f"({config.original_max_position_embeddings}), and so does this runtime")
    return notes


# --- the rest of config.json -----------------------------------------------------------------


def _parse_dtype(raw: dict, source: str, notes: list[str]) -> str:
    """transformers reads ``dtype`` and falls back to the 4.x ``torch_dtype`` only when ``dtype`` is
    absent or null (PreTrainedConfig.__post_init__), then looks the name up as ``torch.<name>``."""
    dtype, torch_dtype = raw.get("dtype"), raw.get("torch_dtype")
    key, value = ("dtype", dtype) if dtype is not None else ("torch_dtype", torch_dtype)
    if value is None:
        return dtypes.FLOAT32.name
    if isinstance(value, str) and value.startswith("torch.") and value[6:] in dtypes.BY_NAME:
        raise ConfigError(f"{source}: {key} {value!r} is not a dtype name transformers can read "
                          f"(it looks the name up in torch and fails); write {value[6:]!r}")
    if not isinstance(value, str) or value not in dtypes.BY_NAME:
        raise ConfigError(f"{source}: {key} {value!r} is not one of {sorted(dtypes.BY_NAME)}, the dtypes this "
                          "runtime computes in")
    if torch_dtype is not None and torch_dtype != value:
        notes.append(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; transformers reads dtype "
                     f"({dtype!r}), and so does this runtime")
    return value


def _parse_eos(raw: dict, source: str):
    eos = raw.get("eos_token_id", 2)
    if isinstance(eos, list):
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers")
        return tuple(eos)
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list, got {eos!r}")
    return eos


def _check_identity(raw: dict, source: str) -> None:
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise ConfigError(
            f"{source}: model_type is {model_type!r}, but this runtime only runs 'llama' models "
            "(Llama 1/2/3 and their fine-tunes)"
        )
    archs = raw.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not any(a in _LLAMA_ARCHS for a in archs):
            raise ConfigError(
                f"{source}: architectures is {archs!r}; expected 'LlamaForCausalLM'"
            )


def _check_types(raw: dict, source: str) -> None:
    """The flags and ids transformers' strict LlamaConfig type-checks (a wrong type: it refuses)."""
    for key in ("bos_token_id", "pad_token_id"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: {key} must be an integer or null, got {v!r}")
    for flag in _FLAGS:
        v = raw.get(flag.name, flag.default)
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: {flag.name} must be true or false, got {v!r}")
    for key, types in _UNUSED_TYPED_FIELDS.items():
        v = raw.get(key)
        if key in raw and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise ConfigError(f"{source}: field {key!r} has the wrong type ({v!r}); transformers refuses it")


def _parse_scalars(raw: dict, source: str) -> dict[str, Any]:
    """Sizes, norms and the activation, with transformers' defaults for absent keys."""
    key = "max_position_embeddings"  # the one optional size whose null transformers refuses
    if key in raw and raw[key] is None:
        default = next(f.default for f in _SIZES if f.name == key)
        raise ConfigError(f"{source}: field {key!r} is null; transformers requires an integer (remove the "
                          f"key for the default {default})")
    fields: dict[str, Any] = {
        f.name: _int_field(raw, f.name, source, required=f.default is MISSING,
                           default=None if f.default is MISSING else f.default)
        for f in _SIZES
    }
    eps = fields["rms_norm_eps"] = _strict_float(raw, "rms_norm_eps", source, 1e-6)
    if eps <= 0:  # transformers runs it; a zero or negative eps divides by zero on a zero row
        raise ConfigError(f"{source}: rms_norm_eps must be positive, got {eps}")
    act = fields["hidden_act"] = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act is {act!r}; Llama uses 'silu' (SwiGLU)")
    init = fields["initializer_range"] = _strict_float(raw, "initializer_range", source, 0.02)
    if not 0.0 <= init <= 1.0:  # transformers' interval(min=0.0, max=1.0)
        raise ConfigError(f"{source}: initializer_range must lie in [0, 1], got {init}")
    return fields


def _parse(raw: dict[str, Any], source: str) -> LlamaConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    _check_identity(raw, source)
    fields = _parse_scalars(raw, source)
    _check_types(raw, source)
    notes: list[str] = []
    try:
        config = LlamaConfig(
            **fields,
            rope=_parse_rope(raw, source, fields["max_position_embeddings"], notes),
            **{flag.name: raw.get(flag.name, flag.default) for flag in _FLAGS},
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=_parse_eos(raw, source),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=_parse_dtype(raw, source, notes),
        )
    except ConfigError as exc:
        # Validation inside __post_init__ does not know the file name: add it once, here.
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    # Said only once the file is known to be usable, so that a refused file gives one error, no warnings.
    for note in notes:
        warnings.warn(f"{source}: {note}", ConfigWarning, stacklevel=3)
    return config


def _validate(c: LlamaConfig) -> None:
    for size in _SIZES:
        v = getattr(c, size.name)
        if v is None and size.default is None:
            continue  # head_dim: derived once the sizes are known good
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{size.name} must be a positive integer, got {v!r}")
    if c.hidden_size % c.num_attention_heads:
        if c.head_dim is None:
            raise ConfigError(
                f"hidden_size ({c.hidden_size}) is not divisible by num_attention_heads "
                f"({c.num_attention_heads}); set head_dim explicitly or fix the sizes"
            )
        # transformers' LlamaConfig.validate_architecture refuses this even when head_dim is given.
        raise ConfigError(
            f"hidden_size ({c.hidden_size}) is not divisible by num_attention_heads "
            f"({c.num_attention_heads}); transformers refuses this even with head_dim "
            f"({c.head_dim}) set: fix the sizes"
        )
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(
            f"num_attention_heads ({c.num_attention_heads}) is not divisible by "
            f"num_key_value_heads ({c.num_key_value_heads}): each KV head must serve a whole "
            "group of query heads"
        )
    hd = c.head_dim if c.head_dim is not None else c.hidden_size // c.num_attention_heads
    if hd % 2:
        raise ConfigError(f"head_dim ({hd}) must be even: RoPE rotates pairs of dimensions")
    if c.rope.rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope type {c.rope.rope_type!r}; supported: {list(ROPE_TYPES)}")
    factors = c.rope.freq_factors
    if factors is not None and (len(factors) != hd // 2 or not all(math.isfinite(f) and f > 0 for f in factors)):
        raise ConfigError(f"rope freq_factors must be {hd // 2} positive numbers (one per frequency), "
                          f"got {len(factors)}")


# ---------------------------------------------------------------------------------------------
# generation_config.json


@dataclass(frozen=True)
class GenerationDefaults(Knobs):
    """Sampling defaults: transformers' GenerationConfig defaults (the knobs of ``tracer/knobs.py``),
    then generation_config.json; with the length and end tokens it gives."""

    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "transformers defaults"

    @classmethod
    def from_file(cls, path: str | Path | None, eos_token_ids: tuple[int, ...]) -> GenerationDefaults:
        """Read generation_config.json if it exists; fields it lacks keep transformers' defaults."""
        base = cls(eos_token_ids=eos_token_ids)
        if path is None or not Path(path).is_file():
            return base
        raw = read_json(path, ConfigError)
        updates: dict[str, Any] = {"source": str(path)}
        # A knob or max_new_tokens of the wrong type makes transformers refuse the file: so here.
        checks = {k.name: k.accepts for k in KNOBS}
        checks["max_new_tokens"] = lambda v: isinstance(v, int) and not isinstance(v, bool)
        for key, accepts in checks.items():
            if raw.get(key) is None:
                continue
            value = raw[key]
            if not accepts(value):
                raise ConfigError(f"{path}: field {key!r} has the wrong type: {value!r}")
            updates[key] = value
        eos = raw.get("eos_token_id")
        if isinstance(eos, int) and not isinstance(eos, bool):
            updates["eos_token_ids"] = (eos,)
        elif isinstance(eos, list) and all(isinstance(e, int) for e in eos):
            updates["eos_token_ids"] = tuple(eos)
        return replace(base, **updates)
