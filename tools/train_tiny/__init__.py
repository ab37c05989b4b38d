"""Training recipe for the embedded default model (``python -m tools.train_tiny``).

corpus (registry downloads) -> tokenizer (sentencepiece BPE, Llama 2 settings) -> train (our own
``tracer.model``) -> export (hub-style folder) -> card (MODEL_CARD.md, plot, samples).
"""
