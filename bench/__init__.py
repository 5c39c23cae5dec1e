"""Benchmarks and the demo; each prints a table and writes its numbers under bench/out/."""
