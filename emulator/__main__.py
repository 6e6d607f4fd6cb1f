"""``python -m emulator``: the Firehose emulator as a process, for benchmarks and
end-to-end runs. Prints ``listening on http://HOST:PORT`` once it accepts connections (so a
runner can wait for that line and learn the port), then serves until SIGTERM or SIGINT.

:func:`build_parser`, :func:`emulator_options` and :func:`serve` are public so that a program
that extends the emulator (the benchmark's sink) keeps the same options and start-up line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from emulator.firehose import FirehoseEmulator


def add_fault_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, latency: str = "--latency"
) -> None:
    """The fault options (``latency`` names the latency option, e.g. ``--sink-latency`` where
    the emulator is one part among others)."""
    parser.add_argument("--fail-rate", type=float, default=0.0, help="per-record failure odds")
    parser.add_argument("--throttle-rate", type=float, default=0.0, help="whole-call odds")
    parser.add_argument(latency, type=float, default=0.0, help="seconds added to each call")
    parser.add_argument(
        "--lose-records",
        type=int,
        default=0,
        metavar="N",
        help="answer the next N records as successful, then discard them (a sink losing data)",
    )


def build_parser(
    prog: str = "python -m emulator", description: str = "A fake Kinesis Data Firehose."
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    add_fault_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="for reproducible faults")
    parser.add_argument(
        "--stream",
        action="append",
        dest="streams",
        help="a known delivery stream (repeatable); unset: any name is accepted",
    )
    parser.add_argument(
        "--keep-records",
        action="store_true",
        help="keep accepted data in memory (GET /_emulator/records/STREAM); "
        "off by default so that long benchmarks only count",
    )
    return parser


def emulator_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`FirehoseEmulator` keyword arguments that :func:`build_parser`'s options set."""
    return {
        "fail_rate": args.fail_rate,
        "throttle_rate": args.throttle_rate,
        "latency": args.latency,
        "lose_records": args.lose_records,
        "streams": args.streams,
        "keep_records": args.keep_records,
        "seed": args.seed,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


async def serve(emulator: FirehoseEmulator, host: str, port: int) -> None:
    """Run ``emulator`` until SIGTERM or SIGINT, announcing its address on stdout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await emulator.start(host, port)
    print(f"listening on {emulator.endpoint_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        emulator = FirehoseEmulator(**emulator_options(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(emulator, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
