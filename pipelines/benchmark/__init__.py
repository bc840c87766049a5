"""Benchmark commands: ``python -m pipelines.benchmark {layer,loader,models,train} ...``; each prints figures measured
side by side in one run."""
