"""Benchmarks: each config in conf/benchmark/ names a builder here that returns a mansu.data.Benchmark."""
