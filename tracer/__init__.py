"""llama-tracer: watch a Llama language model work, stage by stage.

    import tracer
    llm = tracer.load()                      # the small Llama shipped in the package
    gen = llm.generate("It is a truth universally", max_new_tokens=20, do_sample=True, seed=0)
    gen.text, gen.trace.stages               # the continuation, and every recorded stage
    chat = tracer.load("smollm2")            # a real chat model, offline (tracer.catalog)
    chat.generate("What is the capital of France?", chat=True).text

A newcomer's reading order, the walkthrough's: config -> resolution -> checkpoint (one reader per
weight format: safetensors_file, gguf_file) -> model -> tokenizer -> generate (with sampling and
recorders) -> trace -> api -> viz on top. The speed machinery (fast, matvec, attend, kernels) is a
side wing beside the model, which does not know about it. Each concept is declared once: hook points
in ``hooks``, sampling knobs in ``knobs``, dtypes in ``dtypes``, the sampling chain in ``sampling``.
"""

from . import catalog, errors, hooks, sampling
from .api import Generation, Llama, embedded_path, load
from .errors import TracerError
from .trace import STAGES, Trace

__all__ = [
    "Generation",
    "Llama",
    "STAGES",
    "Trace",
    "TracerError",
    "catalog",
    "embedded_path",
    "errors",
    "hooks",
    "load",
    "sampling",
]
__version__ = "0.1.0"
