"""The stdout sink writes whole lines in pieces a pipe takes atomically."""

from __future__ import annotations

import asyncio
import os
import select

from aggregator.sinks.stdout import StdoutSink, atomic_pieces


def test_pieces_keep_lines_whole_and_within_the_limit() -> None:
    lines = [b"x" * n + b"\n" for n in (10, 3000, 2000, 5000, 1, 4095)]
    pieces = list(atomic_pieces(lines, limit=4096))
    assert b"".join(pieces) == b"".join(lines)
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= 4096 or piece.count(b"\n") == 1  # only a lone long line is over


def test_writes_every_line_to_the_descriptor() -> None:
    read_fd, write_fd = os.pipe()
    lines = [f'{{"i":{i}}}\n'.encode() for i in range(1000)]
    try:
        asyncio.run(StdoutSink(write_fd).write(lines))
        os.close(write_fd)
        out = b""
        while chunk := os.read(read_fd, select.PIPE_BUF):
            out += chunk
    finally:
        os.close(read_fd)
    assert out == b"".join(lines)
