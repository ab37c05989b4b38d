"""Developer tools that live beside the runtime, not in its wheel (``python -m tools.train_tiny``).

Run from a clone of the repository. Nothing under ``tracer/`` imports from here.
"""
