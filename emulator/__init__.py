"""The project's own Firehose emulator, for fault-injection tests and benchmarks."""

from emulator.firehose import AcceptHook, EmulatorThread, FirehoseEmulator

__all__ = ["AcceptHook", "EmulatorThread", "FirehoseEmulator"]
