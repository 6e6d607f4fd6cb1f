"""The file buffer as users run it: real processes killed with SIGKILL, restarted on the same
disk with as many workers or fewer, damaged files, a disk that fills, a stop that hands off,
while Firehose (the emulator) refuses every call."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from aggregator.protocol import encode_packed_forward, new_chunk_id
from aggregator.stores.file import CHUNKS_UP
from aggregator.stores.frames import SEGMENT_HEADER, decode
from benchmarks.docker_client import DockerLikeClient
from emulator import EmulatorThread
from tests.integration.conftest import Aggregator, StartAggregator, free_port, wait_for
from tests.integration.test_firehose import send_with_acks
from tests.integration.test_stopping import instance_config


def durable_config(endpoint: str, path: Path | None, **settings: Any) -> str:
    """Everything to one Firehose destination ``fh`` with a file buffer at ``path`` (None: in
    memory), no secondary; ``settings``: instance_config's and the buffer's."""
    on_disk = {"type": "file", "path": str(path), "free_space_reserve": 0} if path else {}
    return instance_config(endpoint, max_connection_age=None, secondary=None,
                           **{"stop_timeout": "10s", "flush_interval": "100ms", **on_disk,
                              **settings})  # fmt: skip


def delivered(emulator: EmulatorThread) -> Counter[tuple[str, int]]:
    """(client, id) of every event Firehose took, with how many times."""
    events = (orjson.loads(line) for line in emulator.lines("logs"))
    return Counter((e.get("client", ""), e["id"]) for e in events)


@pytest.fixture
def outage(emulator: EmulatorThread) -> Iterator[EmulatorThread]:
    """The emulator refusing every call (ServiceUnavailableException) until the test ends it."""
    emulator.configure(throttle_rate=1.0)
    yield emulator
    emulator.configure(throttle_rate=0.0)


@pytest.fixture
def docker_clients() -> Iterator[list[DockerLikeClient]]:
    made: list[DockerLikeClient] = []
    yield made
    for client in made:
        client.stopping.set()


def acked_events(clients: list[DockerLikeClient]) -> set[tuple[str, int]]:
    return {(c.client, i) for c in clients for i in c.sent}


@pytest.mark.parametrize("workers_after", [2, 1])
def test_acked_events_survive_kill_9_of_each_worker_then_of_everything(
    outage: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path,
    docker_clients: list[DockerLikeClient], workers_after: int,
) -> None:  # fmt: skip
    """Docker's driver with acks sends into an outage; each worker is killed in turn (the
    supervisor restarts it), then the supervisor and the workers together; a new instance on
    the same disk, with 2 workers or 1 (which adopts the other's directory), delivers every
    acked event once the outage ends."""
    path = tmp_path / "buffer"
    agg = start_aggregator(durable_config(outage.endpoint_url, path, workers=2),
                           own_process_group=True)  # fmt: skip
    docker_clients += [DockerLikeClient([agg.forward_port], f"c{i}", acks=True, interval=0.002)
                       for i in range(4)]  # fmt: skip
    for client in docker_clients:
        client.start()
    assert wait_for(lambda: len(acked_events(docker_clients)) > 400, 20)
    for pid in sorted(agg.worker_pids()):
        marks = len(acked_events(docker_clients)) + 400
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda p=pid: p not in agg.worker_pids()  # type: ignore[misc]
                        and len(agg.worker_pids()) == 2, 10)  # fmt: skip
        assert wait_for(lambda m=marks: len(acked_events(docker_clients)) > m, 20)  # type: ignore[misc]
    os.killpg(agg.proc.pid, signal.SIGKILL)
    agg.proc.wait(10)
    for client in docker_clients:
        client.stopping.set()  # nothing can ack them now: what they have is final
    acked = acked_events(docker_clients)
    assert outage.stats()["accepted_records"] == 0  # nothing left but through the disk

    again = start_aggregator(durable_config(outage.endpoint_url, path, workers=workers_after))
    outage.configure(throttle_rate=0.0)
    assert wait_for(lambda: acked <= set(delivered(outage)), 60), (
        f"{len(acked - set(delivered(outage)))} of {len(acked)} acked events never delivered"
    )
    duplicates = sum(n - 1 for n in delivered(outage).values())
    print(f"acked {len(acked)}, delivered {len(delivered(outage))}, duplicates {duplicates}")
    assert again.metric("aggregator_buffer_replayed_events_total") > 0
    assert again.metric("aggregator_buffer_corrupt_events_total") == 0
    assert again.stop() == 0
    assert sorted(p.name for p in path.iterdir()) == [f"w{i}" for i in range(workers_after)]
    assert not list(path.glob("w*/*.seg"))  # every segment delivered and deleted


def ids_in_frames(data: bytes, start: int, end: int) -> set[int]:
    """The ids of the events in the frames that lie wholly inside ``[start, end)``."""
    out = decode(data, len(SEGMENT_HEADER), final=True)
    return {orjson.loads(line)["id"] for f in out.frames if f.start >= start and f.end <= end
            for line in f.lines}  # fmt: skip


def test_damaged_segments_cost_only_their_damaged_frames(
    outage: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path
) -> None:
    """Bytes flipped in the middle of one segment and another cut short, while stopped: the
    service starts healthy, delivers every event of the intact frames, counts the corrupt
    ones, and keeps the damaged files aside."""
    path = tmp_path / "buffer"
    config = durable_config(outage.endpoint_url, path, stop_timeout="3s",
                            chunk_limit_size="4KiB", total_limit_size="512KiB")  # fmt: skip
    agg = start_aggregator(config)
    send_with_acks(agg.forward_port, "app", range(3000), per_message=20)
    assert agg.stop(timeout=20) == 0  # nothing dropped: kept on disk
    assert any("file buffers keep the rest on disk" in e["message"] for e in agg.logs())
    segments = sorted(path.glob("w0/*.seg"))
    assert len(segments) >= 4
    flipped, cut = segments[1], segments[2]
    data = bytearray(flipped.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    intact = ids_in_frames(bytes(flipped.read_bytes()), 0, middle)
    intact |= ids_in_frames(bytes(flipped.read_bytes()), middle + 64, len(data))
    flipped.write_bytes(bytes(data))
    cut_data = cut.read_bytes()
    intact |= ids_in_frames(cut_data, 0, len(cut_data) * 3 // 5)
    cut.write_bytes(cut_data[: len(cut_data) * 3 // 5])
    for other in segments[:1] + segments[3:]:
        raw = other.read_bytes()
        intact |= ids_in_frames(raw, 0, len(raw))

    again = start_aggregator(config)
    assert again.health()[0] == 200
    outage.configure(throttle_rate=0.0)
    ids = lambda: {i for _, i in delivered(outage)}  # noqa: E731
    assert wait_for(lambda: intact <= ids(), 30), f"{len(intact - ids())} intact events lost"
    corrupt = again.metric("aggregator_buffer_corrupt_events_total")
    lost = 3000 - len(ids())
    print(f"lost {lost} events to the damage, counted {corrupt:.0f} corrupt")
    assert lost > 0 and corrupt > 0
    assert again.stop() == 0
    assert sorted(p.name for p in path.glob("w0/*.damaged")) == sorted(
        p.name + ".damaged" for p in (flipped, cut)
    )
    assert not list(path.glob("w0/*.seg"))


def test_two_processes_never_share_a_buffer_directory(
    emulator: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path
) -> None:
    path = tmp_path / "buffer"
    first = start_aggregator(durable_config(emulator.endpoint_url, path))
    with pytest.raises(RuntimeError, match="in use by another process") as refused:
        start_aggregator(durable_config(emulator.endpoint_url, path))
    assert "cannot start" in str(refused.value)
    assert first.health()[0] == 200
    assert first.stop() == 0


def test_a_stop_hands_a_file_buffer_off_and_keeps_nothing(
    outage: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path
) -> None:
    """The hand-off reads the backlog back chunk by chunk as the peer acknowledges it."""
    with EmulatorThread(seed=3) as healthy:
        peer_port = free_port()
        peer = start_aggregator(durable_config(healthy.endpoint_url, tmp_path / "peer",
                                               forward_port=peer_port))  # fmt: skip
        path = tmp_path / "buffer"
        stopping = start_aggregator(durable_config(
            outage.endpoint_url, path, stop_timeout="6s", handoff=peer_port,
            chunk_limit_size="16KiB", total_limit_size="4MiB",
        ))  # fmt: skip
        send_with_acks(stopping.forward_port, "app", range(20_000))
        assert len(list(path.glob("w0/*.seg"))) > 5
        assert stopping.stop(timeout=20) == 0
        assert wait_for(lambda: len(healthy.lines("logs")) >= 20_000, 20)
        assert {i for _, i in delivered(healthy)} == set(range(20_000))
        summary = [e for e in stopping.logs()
                   if e["message"].startswith("stopped") and e.get("worker") == 0][-1]  # fmt: skip
        assert summary["handed_off"] == 20_000 and summary["kept_on_disk"] == []
        assert not list(path.glob("w0/*.seg"))
        assert peer.stop() == 0


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (needs root, as CI has)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_acks_only_what_was_written_and_loses_nothing_acked(
    outage: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path,
    docker_clients: list[DockerLikeClient],
) -> None:  # fmt: skip
    """A 4 MiB disk under a 64 MiB limit with no reserve: writes fail with ENOSPC. No crash,
    no restart; what could not be written is not acknowledged (the clients send it again).
    Killed there and started again on the full disk, it starts, and every acked event arrives
    once Firehose is back."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        config = durable_config(outage.endpoint_url, disk / "buffer", total_limit_size="64MiB",
                                chunk_limit_size="64KiB")  # fmt: skip
        agg: Aggregator = start_aggregator(config, own_process_group=True)
        docker_clients += [DockerLikeClient([agg.forward_port], f"d{i}", acks=True, interval=0,
                                            pad=400) for i in range(3)]  # fmt: skip
        for client in docker_clients:
            client.start()
        assert wait_for(lambda: agg.metric("aggregator_buffer_write_errors_total") > 0, 30)
        # Unacknowledged, the clients send again (after their 5 s wait for the ack).
        assert wait_for(lambda: sum(c.reconnects for c in docker_clients) > 0, 15)
        assert agg.proc.poll() is None
        assert agg.metric("aggregator_worker_restarts_total") == 0
        dropped = agg.metric("aggregator_dropped_events_total", reason="write_error")
        assert dropped > 0
        os.killpg(agg.proc.pid, signal.SIGKILL)
        agg.proc.wait(10)
        for client in docker_clients:
            client.stopping.set()
        acked = acked_events(docker_clients)

        again = start_aggregator(config)  # on a full disk
        assert again.health()[0] == 200
        outage.configure(throttle_rate=0.0)
        assert wait_for(lambda: acked <= set(delivered(outage)), 30), (
            f"{len(acked - set(delivered(outage)))} acked events lost"
        )
        print(f"acked {len(acked)}, refused at write {dropped:.0f}")
        assert again.stop() == 0


OUTAGE_SECONDS = 120.0
WORKER_OVERHEAD = 110 * 1024 * 1024
"""The README's fixed allowance per worker ("Performance and sizing")."""


class PackedSender(threading.Thread):
    """Fluent Bit's or out_forward's shape: PackedForward messages of 1,000 events (~360 bytes
    of JSON each) with acks, the next one once the last is acknowledged."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        record = {"container_id": "a" * 64, "container_name": "/ecs-app-1",
                  "source": "stdout", "log": "x" * 200}  # fmt: skip
        self.entries = [[1700000000, record]] * 1000

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(0.5)
            unpacker = msgpack.Unpacker(raw=False)
            while not self.stopping.is_set():
                chunk = new_chunk_id()
                sock.sendall(encode_packed_forward("app.web", self.entries, chunk=chunk))
                while not self.stopping.is_set() and not list(unpacker):
                    with contextlib.suppress(TimeoutError):
                        unpacker.feed(sock.recv(4096))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.timeout(OUTAGE_SECONDS + 120)
def test_a_long_outage_of_refusals_keeps_workers_within_their_memory_bound(
    outage: EmulatorThread, start_aggregator: StartAggregator, tmp_path: Path
) -> None:
    """Two minutes of Firehose refusing every call (ServiceUnavailableException), with the
    default 256 MiB limit filled and the senders held back: a memory buffer's worker stays
    within total_limit_size + the README's overhead, a file buffer's within the overhead and
    its window of chunks (the 256 MiB are on disk). Before a fix, failed attempts' request
    bodies piled up as garbage: 1.2 GB."""
    limit = 256 * 1024 * 1024
    retries = {"retry_wait": "200ms", "retry_max_interval": "1s"}
    memory = start_aggregator(durable_config(outage.endpoint_url, None, **retries))
    on_disk = start_aggregator(durable_config(outage.endpoint_url, tmp_path / "buffer",
                                              **retries))  # fmt: skip
    window = 2 * 4 + 1  # WINDOW_PER_THREAD x flush_thread_count, and the open chunk
    kept_up = CHUNKS_UP + 1  # the open chunk's lines and the next sealed ones, in memory
    runs = {"memory": (memory, limit + WORKER_OVERHEAD),
            "file": (on_disk, WORKER_OVERHEAD + (window * 2 + kept_up) * 1024**2)}  # fmt: skip
    senders = [PackedSender(agg.forward_port) for agg, _ in runs.values() for _ in range(4)]
    for sender in senders:
        sender.start()
    peaks = dict.fromkeys(runs, 0)
    try:
        full = lambda agg: agg.metric("aggregator_buffer_fill_ratio") >= 0.99  # noqa: E731
        assert wait_for(lambda: full(memory) and full(on_disk), 60)
        ends = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < ends:
            for name, (agg, _) in runs.items():
                [worker] = agg.worker_pids()
                peaks[name] = max(peaks[name], rss(worker))
            time.sleep(1)
    finally:
        for sender in senders:
            sender.stopping.set()
    mib = {name: (peaks[name] >> 20, bound >> 20) for name, (_, bound) in runs.items()}
    print(f"peak RSS and bound, MiB: {mib}")
    assert all(peaks[name] <= bound for name, (_, bound) in runs.items()), mib
    assert outage.stats()["accepted_records"] == 0
