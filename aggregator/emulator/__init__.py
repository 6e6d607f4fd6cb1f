"""The project's own Firehose emulator, for fault-injection tests and benchmarks."""

from aggregator.emulator.firehose import EmulatorThread, FirehoseEmulator

__all__ = ["EmulatorThread", "FirehoseEmulator"]
