"""The file sink: whole lines, rotation by size, files complete once renamed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aggregator.config.model import FileDestination
from aggregator.sinks.file import FileSink


def sink(path: Path, **kw: object) -> FileSink:
    return FileSink(FileDestination.model_validate({"type": "file", "path": str(path), **kw}))


def test_rotates_by_size_and_renames_complete_files(tmp_path: Path) -> None:
    async def main() -> None:
        s = sink(tmp_path, rotate_size=100)
        await s.start()
        for i in range(11):
            await s.write([b'{"i":%d,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n' % i])
        assert list(tmp_path.glob("*.part"))  # the one being written
        await s.close()

    asyncio.run(main())
    assert not list(tmp_path.glob("*.part"))
    files = sorted(tmp_path.glob("events.*.w0.*.ndjson"))
    assert len(files) > 1
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert [int(line.split(b",")[0].split(b":")[1]) for line in lines] == list(range(11))


def test_files_left_open_by_a_dead_process_are_completed(tmp_path: Path) -> None:
    left = tmp_path / "events.20240101T000000.w0.00001.ndjson.part"
    left.write_bytes(b'{"a":1}\n')
    other = tmp_path / "events.20240101T000000.w1.00001.ndjson.part"  # another worker's
    other.write_bytes(b'{"b":1}\n')

    async def main() -> None:
        s = sink(tmp_path)
        await s.start()
        await s.close()

    asyncio.run(main())
    assert (tmp_path / "events.20240101T000000.w0.00001.ndjson").read_bytes() == b'{"a":1}\n'
    assert other.exists()


def test_a_restarted_worker_never_overwrites_its_predecessors_files(tmp_path: Path) -> None:
    async def run_once(line: bytes, close: bool) -> None:
        s = sink(tmp_path)
        s._started = "20240101T000000"  # both within the same second
        await s.start()
        await s.write([line])
        if close:
            await s.close()

    asyncio.run(run_once(b'{"first":1}\n', close=False))  # killed: its file stays .part
    asyncio.run(run_once(b'{"second":1}\n', close=True))
    contents = sorted(f.read_bytes() for f in tmp_path.glob("*.ndjson"))
    assert contents == [b'{"first":1}\n', b'{"second":1}\n']
    assert not list(tmp_path.glob("*.part"))
