"""Benchmarks (GPU and memory); never run by CI."""
