"""llama-tracer: watch a Llama language model work, stage by stage.

    import tracer
    llm = tracer.load()                      # the small Llama shipped in the package
    gen = llm.generate("It is a truth universally", max_new_tokens=20, do_sample=True, seed=0)
    gen.text, gen.trace.stages               # the continuation, and every recorded stage
    chat = tracer.load("smollm2")            # a real chat model, offline (tracer.catalog)
    chat.generate("What is the capital of France?", chat=True).text

The modules read like the walkthrough: config -> resolution -> checkpoint (with one reader per
weight format: safetensors_file, gguf_file) -> model -> tokenizer -> generate -> sampling, with
``trace`` as the thread through them and ``viz`` on top.
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
