"""Benchmarks (decoding, memory, serving) and the GPU check, on what synthetic.py (random models, synthetic
batches) and tiny_corpus.py (a tiny corpus on disk) build."""
