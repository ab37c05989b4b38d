"""Where each stage lives in transformers: the walkthrough's functions, stage by stage.

The walkthrough follows ``run.py`` through transformers' source (``from_pretrained``, the
``text-generation`` pipeline, ``generate``). This table names, for each stage of a trace
(:data:`tracer.trace.STAGES`), the transformers functions that do the same work, so a learner can
read both side by side. It is plain text: module paths, qualified names and one-line notes. The
tracer never imports transformers (it is only the tests' oracle); a notebook or a test that has it
installed resolves a reference itself, e.g.
``functools.reduce(getattr, ref.qualname.split("."), importlib.import_module(ref.module))``.

Checked against transformers :data:`TRANSFORMERS_VERSION`. The walkthrough was written for 4.x,
whose loader was rewritten in 5.0; where the names changed, the note gives the 4.x name too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .trace import (
    ConfigEvent,
    DecodeStepEvent,
    DetokenizeEvent,
    LoadShardEvent,
    PrefillEvent,
    ResolveEvent,
    SampleEvent,
    TokenizeEvent,
)

TRANSFORMERS_VERSION = "5.24"


@dataclass(frozen=True)
class TransformersRef:
    """One transformers function or class: ``module`` (importable path), ``qualname`` (dotted
    inside the module, e.g. ``"LlamaModel.forward"``) and a one-line ``note`` on what it does."""

    module: str
    qualname: str
    note: str

    @property
    def name(self) -> str:
        """The full dotted name, ``module.qualname``."""
        return f"{self.module}.{self.qualname}"


_HUB = "transformers.utils.hub"
_TOKENIZER = "transformers.tokenization_utils_base"
_LLAMA = "transformers.models.llama.modeling_llama"
_PROCESSORS = "transformers.generation.logits_process"
_LM_HEAD = TransformersRef(_LLAMA, "LlamaForCausalLM.forward",
                           "LlamaModel.forward, then lm_head: the last hidden states -> logits")

# Stage name (each event class's ``stage``) -> the transformers code that does that stage's work.
IN_TRANSFORMERS: dict[str, tuple[TransformersRef, ...]] = {
    ConfigEvent.stage: (
        TransformersRef("transformers.models.auto.configuration_auto", "AutoConfig.from_pretrained",
                        "reads config.json (or a GGUF's metadata) into a LlamaConfig"),
    ),
    ResolveEvent.stage: (
        TransformersRef(_HUB, "cached_file",
                        "finds one file (model.safetensors, the index...) in a folder or the hub cache"),
        TransformersRef(_HUB, "get_checkpoint_shard_files",
                        "reads model.safetensors.index.json and fetches every shard it lists"),
    ),
    LoadShardEvent.stage: (
        TransformersRef("transformers.modeling_utils", "PreTrainedModel._load_pretrained_model",
                        "opens the checkpoint files and fills the model built on the meta device"),
        TransformersRef("transformers.core_model_loading", "convert_and_load_state_dict_in_model",
                        "renames and converts each tensor, then places it (4.x: _load_state_dict_into_meta_model)"),
        TransformersRef("transformers.core_model_loading", "set_param_for_module",
                        "puts one tensor into its module on its device (4.x: set_module_tensor_to_device)"),
        TransformersRef("transformers.modeling_gguf_pytorch_utils", "load_gguf_checkpoint",
                        "a GGUF file: reads its metadata and dequantizes its tensors to torch"),
    ),
    TokenizeEvent.stage: (
        TransformersRef(_TOKENIZER, "PreTrainedTokenizerBase.__call__",
                        "tokenizer(text): text -> input_ids, with BOS where the tokenizer adds one"),
        TransformersRef(_TOKENIZER, "PreTrainedTokenizerBase.apply_chat_template",
                        "renders messages through the checkpoint's jinja chat template, then tokenizes"),
    ),
    PrefillEvent.stage: (
        TransformersRef(_LLAMA, "LlamaModel.forward",
                        "the whole prompt at once: embeddings, decoder layers, final norm; fills the KV cache"),
        _LM_HEAD,
    ),
    DecodeStepEvent.stage: (
        TransformersRef(_LLAMA, "LlamaModel.forward",
                        "the same forward for one new token, reading earlier keys/values from the cache"),
        _LM_HEAD,
    ),
    SampleEvent.stage: (
        TransformersRef("transformers.generation.utils", "GenerationMixin._sample",
                        "the decode loop: forward, logits processors, softmax, torch.multinomial or argmax"),
        TransformersRef(_PROCESSORS, "RepetitionPenaltyLogitsProcessor",
                        "divides (or multiplies, if negative) the score of every id already seen"),
        TransformersRef(_PROCESSORS, "TemperatureLogitsWarper", "divides every score by the temperature"),
        TransformersRef(_PROCESSORS, "TopKLogitsWarper", "keeps the k highest scores, the rest -inf"),
        TransformersRef(_PROCESSORS, "TopPLogitsWarper",
                        "keeps the smallest set of tokens whose probability reaches top_p"),
    ),
    DetokenizeEvent.stage: (
        TransformersRef(_TOKENIZER, "PreTrainedTokenizerBase.decode",
                        "ids -> text (the pipeline drops special tokens and cuts the prompt off)"),
    ),
}
