"""``python -m benchmarks abuse``: the service under hostile input, with honest senders beside.

First, alone: 1,000 messages with unique 1 MiB tags, asking for acks (refused by
``tag_length_limit``: the worker's RSS must not grow by more than LONG_TAG_GROWTH_LIMIT).
Then all at once, for ``--duration`` seconds, against one running service:

- malformed frames (``--frames``): events that cannot be encoded (NaN times, records that are
  not maps, nesting past JSON's limit) in bulk, and now and then bytes that are not msgpack;
- amplification: an 8 KiB gzip bomb of 2.8 M empty events, a payload of 200,000 empty gzip
  members, a never-finished array of a million empty maps, an HTTP msgpack array of 8 M maps;
- slowloris: forward connections and HTTP bodies that trickle a byte a second;
- acks nobody reads, and idle connections;
- honest senders: acked Forward messages with ids, to a Firehose emulator.

It reports crashes (worker restarts, watchdog kills), each worker's peak RSS against the
documented bound (the buffers' limits, the idle worker, its open connections, one message being
decoded), the counted input errors, and whether the honest senders lost anything. Exit status 1
when a worker died, an honest event was lost, or a worker went past the bound.
"""

from __future__ import annotations

import gzip
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import orjson

from aggregator.protocol import encode_forward, encode_message, new_chunk_id
from benchmarks.report import MIB
from benchmarks.service import Service, firehose_route, sources
from emulator import EmulatorThread

STREAM = "honest"
BUFFER_LIMIT = 64 * MIB
"""total_limit_size of each of the two destinations."""
PER_CONNECTION = 50 * 1024
"""What an open, idle connection costs a worker (``python -m benchmarks connections``)."""
MESSAGE_DECODE = 15 * MIB
"""At most one message decoded at a time: message_entries_limit (100,000) x ~150 B."""
LONG_TAGS = 1000
LONG_TAG_GROWTH_LIMIT = 100 * MIB
"""How much 1,000 messages with 1 MiB tags may grow a worker's RSS (they once left 120 MiB)."""


def config(endpoint: str, workers: int) -> str:
    forward = 'message_timeout = "5s"\nmax_connections = 2000\n'
    return (
        f'[server]\nworkers = {workers}\nworker_watchdog_timeout = "10s"\n\n'
        + sources(forward_extra=forward).replace(
            'type = "http"', 'type = "http"\nbody_timeout = "5s"'
        )
        + '\n[[routes]]\nmatch = "junk junk.**"\ndestination = "discard"\n\n'
        + firehose_route(endpoint, STREAM, 'buffer = { total_limit_size = "64MiB" }\n')
        + '\n[destinations.discard]\ntype = "null"\nbuffer = { total_limit_size = "64MiB" }\n'
    )


def _deep(levels: int) -> dict[str, object]:
    record: dict[str, object] = {}
    for _ in range(levels):
        record = {"d": record}
    return record


BAD_EVENTS = [
    encode_message("junk", float("nan"), {"a": 1}),
    msgpack.packb(["junk", 1700000000, "not a map"]),
    encode_message("junk", 1700000000, _deep(300)),
    encode_message("junk", 1e300, {"a": 1}),
]
NOT_MSGPACK = b"\xc1\xc1\xc1\xc1"


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def _connect(port: int) -> socket.socket:
    # Long: on two cores the worker under attack can take seconds to get to a connection.
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def malformed(port: int, frames: int, tally: Tally, stop: threading.Event) -> None:
    """Bad events in writes of 1,000 frames; one write in ten ends in bytes that are not
    msgpack, which closes that connection."""
    batch = b"".join(BAD_EVENTS[i % len(BAD_EVENTS)] for i in range(1000))
    sent, writes = 0, 0
    sock = _connect(port)
    while sent < frames and not stop.is_set():
        writes += 1
        closing = writes % 10 == 0
        try:
            sock.sendall(batch + (NOT_MSGPACK if closing else b""))
        except OSError:
            closing = True
        sent += 1000 + closing
        if closing:
            sock.close()
            sock = _connect(port)
    sock.close()
    tally.add("malformed frames sent", sent)


def amplification(forward: int, http: int, tally: Tally, stop: threading.Event) -> None:
    bomb = gzip.compress(b"\x92\x00\x80" * (8 * 1024 * 1024 // 3), mtime=0)
    members = gzip.compress(b"", mtime=0) * 200_000
    inputs = {
        "gzip bomb (8 KiB -> 2.8 M events)": msgpack.packb(
            ["junk", bomb, {"compressed": "gzip"}], use_bin_type=True),
        "200,000 empty gzip members": msgpack.packb(
            ["junk", members, {"compressed": "gzip"}], use_bin_type=True),
        "never-finished array of 1 M maps": b"\xdd\x00\x0f\x42\x40" + b"\x80" * (1 << 20),
    }  # fmt: skip
    for name, data in inputs.items():
        for _ in range(3):
            if stop.is_set():
                return
            with _connect(forward) as sock:
                try:
                    sock.sendall(data)
                except TimeoutError:  # the worker is busy with the flood: not read in time
                    tally.add(f"{name}: not taken in time (busy)")
                    continue
                tally.add(name)
    body = b"\xdd" + (8 << 20).to_bytes(4, "big") + b"\x80" * (8 << 20)
    for _ in range(3):
        req = urllib.request.Request(f"http://127.0.0.1:{http}/junk", data=body)
        req.add_header("Content-Type", "application/msgpack")
        try:
            urllib.request.urlopen(req, timeout=30).close()
            tally.add("HTTP msgpack array of 8 M maps: accepted!")
        except urllib.error.HTTPError as err:
            tally.add(f"HTTP msgpack array of 8 M maps: {err.code}")


def slowloris(
    forward: int, http: int, tally: Tally, stop: threading.Event, ready: threading.Event
) -> None:
    """Connections that send a byte a second and never finish."""
    message = encode_message("junk", 1700000000, {"a": "x" * 100})
    socks = [_connect(forward) for _ in range(200)]
    bodies = []
    for _ in range(50):
        s = _connect(http)
        s.sendall(b"POST /junk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n")  # fmt: skip
        bodies.append(s)
    ready.set()
    closed = set()
    second = 0
    while not stop.is_set() and second < len(message) - 1:
        for i, s in enumerate([*socks, *bodies]):
            if i in closed:
                continue
            try:
                s.sendall(message[second : second + 1] if i < len(socks) else b" ")
            except OSError:
                closed.add(i)
        second += 1
        stop.wait(1.0)
    tally.add("slowloris connections closed by the server", len(closed))
    tally.add("slowloris connections", len(socks) + len(bodies))
    for s in [*socks, *bodies]:
        s.close()


def long_tags(port: int, count: int, tally: Tally) -> None:
    """Messages with unique 1 MiB tags, asking for acks (none must come)."""
    sock = _connect(port)
    pad = "x" * (MIB - 8)
    for i in range(count):
        sock.sendall(encode_message(f"{i:08d}{pad}", 1700000000, {"i": i}, chunk=f"t{i}"))
    tally.add("messages with 1 MiB tags sent", count)
    sock.settimeout(1.0)
    acks = 0
    unpacker = msgpack.Unpacker(raw=False)
    try:
        while data := sock.recv(4096):
            unpacker.feed(data)
            acks += sum(1 for _ in unpacker)
    except TimeoutError:
        pass
    tally.add("messages with 1 MiB tags acked", acks)
    sock.close()


def unread_acks(port: int, tally: Tally, stop: threading.Event) -> None:
    sock = _connect(port)
    sock.setblocking(False)
    batch = b"".join(
        encode_message("junk", 1700000000, {"i": i}, chunk=f"c{i}") for i in range(500)
    )
    sent = 0
    while not stop.is_set():
        try:
            sent += sock.send(batch)
        except BlockingIOError:
            stop.wait(0.2)
        except OSError:
            break
    tally.add("unread-ack bytes written before the server stopped reading", sent)
    sock.close()


def idle(port: int, tally: Tally, stop: threading.Event, ready: threading.Event) -> None:
    socks = [_connect(port) for _ in range(300)]
    tally.add("idle connections", len(socks))
    ready.set()
    stop.wait()
    for s in socks:
        s.close()


def _recorded(name: str, attack: Callable[[], None], tally: Tally) -> None:
    """Run an attack; a harness thread that fails says so in the report."""
    try:
        attack()
    except Exception as exc:
        tally.add(f"{name}: the harness's thread failed ({type(exc).__name__}: {exc})"[:58])


@dataclass
class Honest:
    sent: list[int] = field(default_factory=list)
    failed: int = 0


def honest(port: int, result: Honest, stop: threading.Event, start: int) -> None:
    """Acked Forward messages of 100 events with ids, one at a time."""
    unpacker = msgpack.Unpacker(raw=False)
    sock = _connect(port)
    next_id = start
    while not stop.is_set():
        chunk = new_chunk_id()
        ids = range(next_id, next_id + 100)
        sock.sendall(encode_forward("valid", [[1700000000, {"id": i}] for i in ids], chunk=chunk))
        acked = False
        while not acked:
            data = sock.recv(4096)
            if not data:
                break
            unpacker.feed(data)
            acked = any(reply.get("ack") == chunk for reply in unpacker)
        if acked:
            result.sent += ids
            next_id += 100
        else:
            result.failed += 1
            sock = _connect(port)
        stop.wait(0.01)
    sock.close()


@dataclass(frozen=True)
class AbuseResult:
    tally: dict[str, int]
    input_errors: dict[str, float]
    restarts: float
    watchdog_kills: float
    peak_rss: dict[int, int]
    baseline_rss: int
    honest_sent: int
    honest_delivered: int
    honest_lost: int
    honest_duplicated: int
    long_tag_growth: int
    """The largest growth of a worker's RSS across the long-tag messages."""

    @property
    def exit_status(self) -> int:
        failed = self.restarts or self.watchdog_kills or self.honest_lost
        too_big = self.long_tag_growth > LONG_TAG_GROWTH_LIMIT
        return 1 if failed or too_big or not self.within_bound else 0

    @property
    def within_bound(self) -> bool:
        held = self.tally.get("idle connections", 0) + self.tally.get("slowloris connections", 0)
        allowed = 2 * BUFFER_LIMIT + self.baseline_rss + held * PER_CONNECTION + MESSAGE_DECODE
        return all(rss <= allowed for rss in self.peak_rss.values())

    def render(self) -> str:
        rows = ["attacks"]
        rows += [f"  {name:<58} {n:>12,}" for name, n in sorted(self.tally.items())]
        rows.append("input errors counted (aggregator_input_errors_total)")
        rows += [f"  {reason:<58} {int(n):>12,}" for reason, n in sorted(self.input_errors.items())]
        held = self.tally.get("idle connections", 0) + self.tally.get("slowloris connections", 0)
        allowed = 2 * BUFFER_LIMIT + self.baseline_rss + held * PER_CONNECTION + MESSAGE_DECODE
        peaks = ", ".join(f"{rss / MIB:,.0f}" for rss in self.peak_rss.values())
        rows += [
            f"messages with 1 MiB tags: worker RSS +{self.long_tag_growth / MIB:.0f} MiB "
            f"(at most {LONG_TAG_GROWTH_LIMIT / MIB:.0f})",
            f"workers: {int(self.restarts)} restarts, {int(self.watchdog_kills)} watchdog kills",
            f"peak RSS per worker: {peaks} MiB; the documented bound: buffers 2 x "
            f"{BUFFER_LIMIT / MIB:.0f} + idle worker {self.baseline_rss / MIB:.0f} + {held} open "
            f"connections x 50 KiB + one message's decode 15 = {allowed / MIB:.0f} MiB",
            f"honest senders: {self.honest_sent:,} acked, {self.honest_delivered:,} delivered, "
            f"{self.honest_lost:,} lost, {self.honest_duplicated:,} duplicated",
        ]
        return "\n".join(rows)


def run(frames: int, duration: float, workers: int, tags: int = LONG_TAGS) -> AbuseResult:
    with EmulatorThread() as firehose, tempfile.TemporaryDirectory(prefix="bench-abuse-") as d:
        service = Service.start(config(firehose.endpoint_url, workers), workers, Path(d))
        tally, stop, results = Tally(), threading.Event(), [Honest(), Honest()]
        peak: dict[int, int] = {}
        try:
            fwd, http = service.forward_port, service.http_port
            before = service.worker_memory("VmRSS")
            _recorded("long tags", lambda: long_tags(fwd, tags, tally), tally)
            after = service.worker_memory("VmRSS")
            growth = max((after[pid] - before.get(pid, after[pid]) for pid in after), default=0)
            baseline = max(after.values())
            # The connections that just sit there first: on two cores, once the flood runs,
            # the harness itself gets little time to open them.
            held = [threading.Event(), threading.Event()]
            attacks: dict[str, Callable[[], None]] = {
                "slowloris": lambda: slowloris(fwd, http, tally, stop, held[0]),
                "idle": lambda: idle(fwd, tally, stop, held[1]),
                "malformed": lambda: malformed(fwd, frames, tally, stop),
                "amplification": lambda: amplification(fwd, http, tally, stop),
                "unread acks": lambda: unread_acks(fwd, tally, stop),
                "honest 1": lambda: honest(fwd, results[0], stop, 0),
                "honest 2": lambda: honest(fwd, results[1], stop, 1 << 40),
            }
            threads = []
            for name, attack in attacks.items():
                threads.append(threading.Thread(target=_recorded, args=(name, attack, tally),
                                                daemon=True))  # fmt: skip
                threads[-1].start()
                if name == "idle":
                    for event in held:
                        event.wait(60)
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                for pid, hwm in service.worker_memory("VmHWM").items():
                    peak[pid] = max(peak.get(pid, 0), hwm)
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(60)
            sent = [i for r in results for i in r.sent]
            wait_until = time.monotonic() + 60
            while len(firehose.lines(STREAM)) < len(sent) and time.monotonic() < wait_until:
                time.sleep(0.2)
            metrics = service.metrics_by_label("aggregator_input_errors_total", "reason")
            totals = service.metrics()
        finally:
            stop.set()
            service.stop()
        got = Counter(orjson.loads(line)["id"] for line in firehose.lines(STREAM))
    return AbuseResult(
        dict(tally.counts), metrics,
        totals.get("aggregator_worker_restarts_total", 0.0),
        totals.get("aggregator_worker_watchdog_kills_total", 0.0),
        peak, baseline, len(sent), sum(got.values()),
        len(set(sent) - set(got)), sum(n - 1 for n in got.values() if n > 1), growth,
    )  # fmt: skip

