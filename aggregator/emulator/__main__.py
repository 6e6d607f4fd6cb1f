"""``python -m aggregator.emulator``: the Firehose emulator as a process, for benchmarks and
end-to-end runs. Prints ``listening on http://HOST:PORT`` once it accepts connections (so a
runner can wait for that line and learn the port), then serves until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aggregator.emulator.firehose import FirehoseEmulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aggregator.emulator", description="A fake Kinesis Data Firehose."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="per-record failure odds")
    parser.add_argument("--throttle-rate", type=float, default=0.0, help="whole-call odds")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each call")
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
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    emulator = FirehoseEmulator(
        fail_rate=args.fail_rate,
        throttle_rate=args.throttle_rate,
        latency=args.latency,
        streams=args.streams,
        keep_records=args.keep_records,
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await emulator.start(args.host, args.port)
    print(f"listening on {emulator.endpoint_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
