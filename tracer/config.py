"""Stage 1 of the walkthrough: config.json -> a typed, frozen config, and the memory arithmetic.

Two hub styles exist (see shared notes): transformers 4.x writes ``rope_theta``/``rope_scaling``/
``torch_dtype`` at the top level; 5.x writes ``rope_parameters`` and ``dtype``. Both parse to the same
:class:`LlamaConfig`. generation_config.json parses to :class:`GenerationDefaults`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Bytes per element of the dtypes a checkpoint or a runtime can use ("7B x 2 bytes = 14 GB").
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
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


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the runtime needs to know about a Llama checkpoint's shape.

    Shape alphabet used across the code: B batch, T tokens, D hidden, H query heads, Hkv key/value
    heads, hd head dim, F MLP intermediate, V vocab.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
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
    torch_dtype: str = "float32"
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
        """The walkthrough's arithmetic: weights in fp32, fp16 and bf16 (bytes and GB)."""
        return [
            {
                "dtype": d,
                "bytes_per_param": dtype_bytes(d),
                "bytes": self.memory_bytes(d),
                "gb": self.memory_bytes(d) / 1e9,
            }
            for d in ("float32", "float16", "bfloat16")
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
            "rms_norm_eps": self.rms_norm_eps,
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
            "initializer_range": self.initializer_range,
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


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name ('float16', 'bfloat16', 'float32', 'float64')."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


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


def _parse_rope(raw: dict, source: str, max_pos: int) -> RopeConfig:
    # 5.x: rope_parameters holds everything; 4.x: rope_theta + rope_scaling at the top level.
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
        theta = _float_field(params, "rope_theta", f"{source} rope_parameters", 10000.0)
        scaling = params
    else:
        theta = _float_field(raw, "rope_theta", source, 10000.0)
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: 'rope_scaling' must be an object or null, got {scaling!r}")
    if theta <= 0:
        raise ConfigError(f"{source}: rope_theta must be positive, got {theta}")
    # Older configs say "type" instead of "rope_type".
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unknown rope type {rope_type!r}; this runtime supports {list(ROPE_TYPES)}"
        )
    where = f"{source} rope scaling"
    factor = _float_field(scaling, "factor", where, 1.0)
    if rope_type != "default" and factor <= 0:
        raise ConfigError(f"{where}: 'factor' must be positive for rope type {rope_type!r}")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"{where}: rope type 'llama3' needs {key!r}")
        low = _float_field(scaling, "low_freq_factor", where, 1.0)
        high = _float_field(scaling, "high_freq_factor", where, 4.0)
        if not high > low:
            raise ConfigError(f"{where}: high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        original = _int_field(scaling, "original_max_position_embeddings", where, required=True)
        return RopeConfig("llama3", theta, factor, low, high, original)
    return RopeConfig(rope_type, theta, factor)


def _parse(raw: dict[str, Any], source: str) -> LlamaConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
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
    sizes = {
        key: _int_field(raw, key, source, required=True)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
    }
    kv = _int_field(raw, "num_key_value_heads", source, required=False)
    head_dim = _int_field(raw, "head_dim", source, required=False)
    max_pos = _int_field(raw, "max_position_embeddings", source, required=False, default=2048)
    eps = _float_field(raw, "rms_norm_eps", source, 1e-6)
    if eps <= 0:
        raise ConfigError(f"{source}: rms_norm_eps must be positive, got {eps}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act is {act!r}; Llama uses 'silu' (SwiGLU)")
    dtype = raw.get("dtype", raw.get("torch_dtype")) or "float32"
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{source}: dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    eos = raw.get("eos_token_id", 2)
    if isinstance(eos, list):
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers")
        eos = tuple(eos)
    elif eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list, got {eos!r}")
    for key in ("bos_token_id", "pad_token_id"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: {key} must be an integer or null, got {v!r}")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        v = raw.get(key, False)
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {v!r}")
    return _build(sizes, kv, head_dim, max_pos, eps, raw, source, act, dtype, eos)


def _build(sizes, kv, head_dim, max_pos, eps, raw, source, act, dtype, eos) -> LlamaConfig:
    try:
        return LlamaConfig(
            **sizes,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=eps,
            rope=_parse_rope(raw, source, max_pos),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            hidden_act=act,
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=dtype,
            initializer_range=_float_field(raw, "initializer_range", source, 0.02),
        )
    except ConfigError as exc:
        # Validation inside __post_init__ does not know the file name: add it once, here.
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _validate(c: LlamaConfig) -> None:
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ):
        v = getattr(c, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    if c.head_dim is None and c.hidden_size % c.num_attention_heads:
        raise ConfigError(
            f"hidden_size ({c.hidden_size}) is not divisible by num_attention_heads "
            f"({c.num_attention_heads}); set head_dim explicitly or fix the sizes"
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


# ---------------------------------------------------------------------------------------------
# generation_config.json


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults: transformers' GenerationConfig defaults, then generation_config.json."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
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
        checks = {
            "do_sample": (bool,),
            "temperature": (int, float),
            "top_k": (int,),
            "top_p": (int, float),
            "repetition_penalty": (int, float),
            "max_new_tokens": (int,),
        }
        for key, types in checks.items():
            if raw.get(key) is None:
                continue
            value = raw[key]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ConfigError(f"{path}: field {key!r} has the wrong type: {value!r}")
            updates[key] = value
        eos = raw.get("eos_token_id")
        if isinstance(eos, int) and not isinstance(eos, bool):
            updates["eos_token_ids"] = (eos,)
        elif isinstance(eos, list) and all(isinstance(e, int) for e in eos):
            updates["eos_token_ids"] = tuple(eos)
        return replace(base, **updates)
