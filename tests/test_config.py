"""tracer.config: both hub styles, derived values, the memory arithmetic, generation defaults."""

from __future__ import annotations

import json
import warnings
from dataclasses import MISSING, fields

import pytest

from tracer.config import ConfigWarning, GenerationDefaults, LlamaConfig

LLAMA2_7B = {  # Llama-2-7b-chat-hf's config.json (transformers 4.x style)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "vocab_size": 32000, "torch_dtype": "float16", "tie_word_embeddings": False,
    "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}
LLAMA32_1B_V5 = {  # Llama-3.2-1B shapes, transformers 5.x style
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": True, "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
    "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000,
}


def test_llama2_7b_memory_arithmetic():
    cfg = LlamaConfig.from_dict(LLAMA2_7B)
    assert cfg.num_parameters == 6_738_415_616  # the "7B"
    assert cfg.memory_bytes("float16") == 2 * cfg.num_parameters  # ~13.5 GB
    assert round(cfg.memory_bytes("float16") / 1e9, 1) == 13.5
    assert round(cfg.memory_bytes("float32") / 1e9, 1) == 27.0
    assert cfg.rope.theta == 10000.0 and cfg.rope.rope_type == "default"  # absent rope_theta
    assert cfg.attention_kind == "MHA" and cfg.head_dim == 128
    assert [r["dtype"] for r in cfg.memory_table()] == ["float32", "float16", "bfloat16"]
    assert cfg.kv_cache_bytes(4096, "float16") == 2 * 32 * 32 * 128 * 4096 * 2  # 2 GiB


def test_v5_style_llama3():
    cfg = LlamaConfig.from_dict(LLAMA32_1B_V5)
    assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 500000.0
    assert cfg.rope.original_max_position_embeddings == 8192
    assert cfg.torch_dtype == "bfloat16" and cfg.tie_word_embeddings
    assert cfg.attention_kind == "GQA" and cfg.n_rep == 4
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert 1.2e9 < cfg.num_parameters < 1.3e9  # tied lm_head counted once


def test_to_hf_dict_round_trips():
    cfg = LlamaConfig.from_dict(LLAMA32_1B_V5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # our own writer never says a thing twice
        assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_older_rope_scaling_key_type_is_accepted():
    cfg = LlamaConfig.from_dict({**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope.rope_type == "linear" and cfg.rope.factor == 2.0


def test_generation_defaults_layering(tmp_path):
    assert GenerationDefaults.from_file(None, (2,)) == GenerationDefaults(eos_token_ids=(2,))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2, "max_length": 4096}))
    d = GenerationDefaults.from_file(tmp_path / "generation_config.json", (2,))
    assert (d.do_sample, d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (True, 0.6, 0.9, 50, 1.0)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_missing_size_names_the_field(key):
    from tracer.errors import ConfigError

    raw = {k: v for k, v in LLAMA2_7B.items() if k != key}
    with pytest.raises(ConfigError, match=key):
        LlamaConfig.from_dict(raw)


# --- the config's fields, parsed and checked from the dataclass's own list ---------------------------

_SIZES = [f for f in fields(LlamaConfig) if f.metadata.get("size")]
_FLAGS = [f for f in fields(LlamaConfig) if f.type == "bool"]


def test_the_sizes_and_flags_are_read_off_the_dataclass():
    from tracer import config

    assert config._SIZES == tuple(_SIZES) and config._FLAGS == tuple(_FLAGS)
    assert {f.name for f in _SIZES} >= {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "max_position_embeddings"}
    assert {f.name for f in _FLAGS} == {"tie_word_embeddings", "attention_bias", "mlp_bias"}


@pytest.mark.parametrize("size", _SIZES, ids=lambda f: f.name)
@pytest.mark.parametrize("value", [0, -2, True, 2.5])
def test_every_size_must_be_a_positive_integer_in_code_and_in_config_json(size, value):
    from tracer.errors import ConfigError

    with pytest.raises(ConfigError, match=size.name):
        LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4), size.name: value})
    with pytest.raises(ConfigError, match=size.name):
        LlamaConfig.from_dict({**LLAMA2_7B, size.name: value})


@pytest.mark.parametrize("size", _SIZES, ids=lambda f: f.name)
def test_a_size_without_a_default_is_required_in_config_json(size):
    from tracer.errors import ConfigError

    raw = {k: v for k, v in LLAMA2_7B.items() if k != size.name}
    if size.default is MISSING:
        with pytest.raises(ConfigError, match=f"required field '{size.name}'"):
            LlamaConfig.from_dict(raw)
    elif size.default is None:  # derived from the other sizes, as for an explicit null
        assert LlamaConfig.from_dict(raw) == LlamaConfig.from_dict({**raw, size.name: None})
    else:
        assert getattr(LlamaConfig.from_dict(raw), size.name) == size.default


@pytest.mark.parametrize("flag", _FLAGS, ids=lambda f: f.name)
def test_every_flag_is_read_and_type_checked(flag):
    from tracer.errors import ConfigError

    assert getattr(LlamaConfig.from_dict({**LLAMA2_7B, flag.name: True}), flag.name) is True
    assert getattr(LlamaConfig.from_dict({k: v for k, v in LLAMA2_7B.items() if k != flag.name}),
                   flag.name) is flag.default
    with pytest.raises(ConfigError, match=flag.name):
        LlamaConfig.from_dict({**LLAMA2_7B, flag.name: 1})
