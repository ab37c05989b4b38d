"""Benchmarks for llama-tracer (``python -m benchmarks.speed``); may import transformers."""
