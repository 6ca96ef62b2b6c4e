"""Benchmarks (decoding, memory, serving) and the GPU check."""
