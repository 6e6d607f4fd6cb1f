"""What the cheapest possible Python server spends on a load, next to Fluent Bit and the
aggregator under the same load (``python -m benchmarks floor``).

A CPU target against Fluent Bit is only reachable if Python on uvloop can meet it at all. The
floor servers here read every write as it arrives, as Fluent Bit does, and do less with it than
any real server could, each level adding one step no forward server can skip:

- ``read``: uvloop reads every byte, counts and drops it (a Python callback per read, an add);
- ``decode``: msgpack finds every message and decodes it (no server can find where a message
  ends, or ack it, without this), PackedForward's entries included, and acks a message that
  asks;
- ``format``: and one orjson call per message turns its records into JSON (no time, no tag, no
  split into lines: less than a Firehose record needs).

None of them buffers, batches, signs or sends anything, so whatever they cost is a lower bound
for a Python server on these libraries that reads each write at once. (Reading a slow
connection less often moves the bound itself: see the forward input's ``trickle_read_delay``.)
The floor servers run on the same load generator as ``benchmarks run``; Fluent Bit and the
aggregator run through it too, in the same invocation, so the ratios compare runs on the same
machine minutes apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import msgpack
import orjson

from benchmarks import eventloop, procfs
from benchmarks.config import RunConfig
from benchmarks.loadgen import LoadGenerator, LoadSpec
from benchmarks.runner import load_spec, run_benchmark

LEVELS = ("read", "decode", "format")
SETTLE_POLL = 0.25
"""Seconds between two looks at a floor server's CPU time after the load: it is done with the
load once its CPU time stops moving."""
SETTLE_TIMEOUT = 60.0
START_TIMEOUT = 15.0


# --- the floor server (a process of its own: python -m benchmarks.floor LEVEL) -------------


class _Counts:
    events = 0
    bytes = 0


class _FloorProtocol(asyncio.Protocol):
    def __init__(self, level: str, counts: _Counts) -> None:
        self._level = level
        self._counts = counts
        self._unpacker = msgpack.Unpacker()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._level == "read":
            self._counts.bytes += len(data)
            return
        self._unpacker.feed(data)
        for message in self._unpacker:
            second, option = message[1], message[-1]
            if type(second) is bytes:  # PackedForward: the entries are msgpack in a bin
                entries = msgpack.Unpacker()
                entries.feed(second)
                records = [entry[1] for entry in entries]
            elif type(second) is list:  # Forward
                records = [entry[1] for entry in second]
            else:  # Message: [tag, time, record, option?]
                records = [message[2]]
            if self._level == "format":
                orjson.dumps(records)
            self._counts.events += len(records)
            if type(option) is dict and "chunk" in option and self._transport is not None:
                self._transport.write(msgpack.packb({"ack": option["chunk"]}))


async def _serve(level: str) -> None:
    counts = _Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _FloorProtocol(level, counts), "127.0.0.1", 0, backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    await stop.wait()
    server.close()
    print(json.dumps({"events": counts.events, "bytes": counts.bytes}), flush=True)


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One subject's run: CPU seconds per million events sent, and whether it took them all."""

    name: str
    seconds_per_million: float
    problem: str | None = None


def measure_floor(level: str, spec: LoadSpec) -> Figure:
    """Run the load against a floor server of ``level``; its CPU per million events sent."""
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", level],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline() or "{}").get("port")
        if port is None:
            raise RuntimeError(f"the {level} floor server did not start")
        load = LoadGenerator(dataclasses.replace(spec, port=port))
        try:
            load.connect()
            before = sum(procfs.cpu_seconds(server.pid))
            load.start()
            sent = load.wait(spec.duration + 60)
        finally:
            load.close()
        used = _settled_cpu(server.pid) - before
        server.send_signal(signal.SIGTERM)
        tail, _ = server.communicate(timeout=START_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    problem = None
    counted = json.loads(tail.strip().splitlines()[-1])
    if level == "read":  # it decodes nothing: it counts bytes, not events
        if counted["bytes"] != sent.bytes:
            problem = f"read {counted['bytes']:,} of {sent.bytes:,} bytes"
    elif counted["events"] != sent.events:
        problem = f"read {counted['events']:,} of {sent.events:,} events"
    if sent.errors:
        problem = "; ".join(sent.errors)
    return Figure(f"floor: {level}", used / max(sent.events, 1) * 1e6, problem)


def _settled_cpu(pid: int) -> float:
    """The process's CPU time once it stops moving (it has read everything sent)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = sum(procfs.cpu_seconds(pid))
    while time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        now = sum(procfs.cpu_seconds(pid))
        if now == last:
            return now
        last = now
    return last


def measure_subject(config: RunConfig) -> Figure:
    """A run of ``benchmarks run`` (the aggregator or Fluent Bit); its table is not printed."""
    result = run_benchmark(config, out=io.StringIO()).to_json()
    name = config.subject
    problem = "; ".join(result["problems"]) or None
    return Figure(name, result["cpu"]["seconds_per_million_events"] or 0.0, problem)


def measure(config: RunConfig, levels: tuple[str, ...], pairs: int) -> list[list[Figure]]:
    """``pairs`` rounds of Fluent Bit, the aggregator and each floor level, in that order and
    then reversed, so that a drift of the machine's speed weighs on all alike."""
    peer = dataclasses.replace(config, subject="fluent-bit", buffer="memory", json_path=None)
    spec = load_spec(config, port=0)
    steps: list[Callable[[], Figure]] = [
        partial(measure_subject, peer),
        partial(measure_subject, config),
        *(partial(measure_floor, level, spec) for level in levels),
    ]
    rounds = []
    for n in range(pairs):
        order = steps if n % 2 == 0 else steps[::-1]
        figures = [step() for step in order]
        rounds.append(_in_order(figures, levels))
        print(render([rounds[-1]], title=f"round {n + 1}"), flush=True)
    return rounds


def _in_order(figures: list[Figure], levels: tuple[str, ...]) -> list[Figure]:
    names = ["fluent-bit", "aggregator", *(f"floor: {level}" for level in levels)]
    return sorted(figures, key=lambda figure: names.index(figure.name))


def render(rounds: list[list[Figure]], title: str) -> str:
    """CPU-s per million events of each subject (Fluent Bit's first), and its ratio to Fluent
    Bit's in the same round: medians over the rounds when there are several."""
    lines = [title, "-" * 78]
    peers = [r[0] for r in rounds]
    for n, column in enumerate(zip(*rounds, strict=True)):
        value = statistics.median(figure.seconds_per_million for figure in column)
        text = f"{column[0].name:<16} {value:8.2f} CPU-s per million events"
        ratios = [figure.seconds_per_million / peer.seconds_per_million
                  for figure, peer in zip(column, peers, strict=True)
                  if peer.seconds_per_million]  # fmt: skip
        if n and ratios:
            text += f"  {statistics.median(ratios):5.2f}x of Fluent Bit's"
            if len(ratios) > 1:
                text += f" ({', '.join(f'{r:.2f}' for r in ratios)})"
        problems = "; ".join(f.problem for f in column if f.problem)
        lines.append(f"{text}  {problems}".rstrip())
    return "\n".join(lines)


def run(config: RunConfig, levels: tuple[str, ...], pairs: int) -> int:
    if config.ack and "read" in levels:
        print("floor: read is left out: it acks nothing, and acked senders would wait for it")
        levels = tuple(level for level in levels if level != "read")
    rounds = measure(config, levels, pairs)
    print(render(rounds, title=f"median of {pairs} rounds" if pairs > 1 else "result"))
    return 1 if any(figure.problem for r in rounds for figure in r) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(_serve(sys.argv[1]))
