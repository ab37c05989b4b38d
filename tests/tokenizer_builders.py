"""Tokenizer folders of the families real Llama checkpoints ship, built here (nothing is downloaded).

- Llama 2: a sentencepiece ``tokenizer.model`` (``builders.train_sentencepiece``);
- Llama 3: a byte-level BPE ``tokenizer.json`` whose post-processor adds ``<|begin_of_text|>``,
  ``"tokenizer_class": "PreTrainedTokenizerFast"`` and a Llama 3 style chat template;
- ChatML (SmolLM2-like): a byte-level BPE ``tokenizer.json`` that adds no BOS,
  ``"tokenizer_class": "GPT2Tokenizer"`` and SmolLM2's ChatML template with its default system prompt.

Each is trained with the ``tokenizers`` library on ``builders.corpus_lines`` (deterministic: one
thread, a fixed corpus) and is small (512 merges and bytes plus the special tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from builders import corpus_lines

# Llama 3's pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's template: BOS written by the template, a header per turn, <|eot_id|> after each.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf's template (tokenizer_config.json): BOS per [INST] turn, EOS after answers.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M-Instruct's template (a default system prompt when the chat has none).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _train_byte_level(pre_tokenizer, vocab_size: int, specials_first: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials_first, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    return tk


def build_llama3_tokenizer(folder: Path, vocab_size: int = 512) -> Path:
    """tokenizer.json + tokenizer_config.json in the Llama 3 layout (specials after the merges)."""
    from tokenizers import AddedToken, Regex, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk = _train_byte_level(pre, vocab_size, [])
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    bos = LLAMA3_SPECIALS[0]
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tk.token_to_id(bos))]),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        # Llama 3 ships True; transformers skips the clean-up for BPE models (decode must too).
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "chat_template": LLAMA3_TEMPLATE,
    }, indent=2))
    return folder


def build_chatml_tokenizer(folder: Path, vocab_size: int = 512) -> Path:
    """tokenizer.json + tokenizer_config.json in SmolLM2's layout (specials first, no BOS added)."""
    from tokenizers import pre_tokenizers, processors

    tk = _train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size, CHATML_SPECIALS)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": CHATML_TEMPLATE,
    }, indent=2))
    return folder


def with_config(source: Path, folder: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A copy of the tokenizer folder ``source`` with tokenizer_config.json edited."""
    shutil.copytree(source, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps({**config, **changes}, indent=2))
    return folder
