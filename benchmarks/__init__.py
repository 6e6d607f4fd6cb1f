"""Benchmarks of the aggregator: ``python -m benchmarks run`` measures it under load against
the project's Firehose emulator, ``python -m benchmarks size`` turns the figures into a Fargate
task count. See benchmarks/README.md."""
