"""Benchmarks; `python -m bench.throughput` compares the plain PyTorch loop, the engine and the Ray Train path."""
