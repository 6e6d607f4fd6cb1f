"""The server side of the Fluentd forward protocol, sans-IO: bytes in, :class:`Message` out.

The four modes of the Forward Protocol Specification v1, told apart by the type of the second
element as Fluentd's in_forward does::

    Message                  [tag, time, record, option?]
    Forward                  [tag, [[time, record], ...], option?]
    PackedForward            [tag, bin|str of concatenated msgpack entries, option?]
    CompressedPackedForward  PackedForward whose payload is gzip, with option compressed="gzip"

A top-level ``nil`` is a client heartbeat (in_forward ignores it), so it is skipped. The
HELO/PING/PONG handshake and in_forward's JSON mode are not handled here.
"""

from __future__ import annotations

import itertools
import zlib
from collections import deque
from typing import Any, NoReturn

import msgpack

from aggregator.protocol.events import EVENT_TIME_EXT_TYPE, Batch, Message, ProtocolError

DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
"""The default limit on one message; a larger one closes the connection. (Fluentd's in_forward
has no limit unless ``chunk_size_limit`` is set; 32 MiB is the size of its in_http bodies.)"""
DEFAULT_MAX_ENTRIES = 100_000
"""The default limit on the entries of one message, and on the items of any array or map in
it. Bytes alone do not bound memory: `[0,{}]` is 3 bytes and about 150 decoded, so 32 MiB of
them would be 1.6 GB. Containers are refused at their header; a PackedForward stream is
decoded up to the limit, so one message costs at most about 150 B x this while it is read
(15 MB). Real clients send far fewer: Fluent Bit's chunks are about 2 MB, out_forward's 8 MB
of 200-500 B events are 16,000-40,000, Docker's driver sends one event per message."""
DEFAULT_BATCH_ENTRIES = 256
INITIAL_BUFFER_SIZE = 16 * 1024
"""The unpacker's buffer at first. It grows to hold a big read or message and never shrinks,
so an unpacker that outgrew it is let go once it holds no partial message."""

_GZIP_WBITS = 31  # zlib's spelling of "gzip header and trailer, not raw deflate or zlib"
_PLAIN_COMPRESSED = (None, "text")  # out_forward sends compressed="text" when not compressing
_NEED_DATA: Any = object()
_NIL = b"\xc0"


SPARE_UNPACKERS = 16
"""Idle unpackers kept for the decoders of this process to share. An msgpack Unpacker costs
about 40 KiB however small its buffer (its parsing stack is part of it): a decoder holds one
only while it has bytes to decode or a message partly received, so a thousand idle connections
do not hold a thousand (nor 40 MiB), and one busy loop turns with a few."""
_spares: dict[tuple[int, int], list[Any]] = {}


class _NoUnpacker:
    """Stands for the unpacker while a decoder holds none: there is nothing to decode."""

    def __next__(self) -> Any:
        raise StopIteration

    def tell(self) -> int:
        return 0


_IDLE = _NoUnpacker()


def _take_unpacker(max_size: int, max_items: int) -> Any:
    try:  # one pop: decoders in other threads (a client's) may share the spares
        return _spares[(max_size, max_items)].pop()
    except (KeyError, IndexError):
        return _new_unpacker(max_size, max_items)


def _give_unpacker(unpacker: Any, max_size: int, max_items: int) -> None:
    """Keep an unpacker that holds no partial message (its next byte starts one) for reuse."""
    spares = _spares.setdefault((max_size, max_items), [])
    if len(spares) < SPARE_UNPACKERS:
        spares.append(unpacker)


def _new_unpacker(max_size: int, max_items: int = DEFAULT_MAX_ENTRIES) -> Any:
    # surrogateescape: no string ever fails to decode (records pass through as sent), and a
    # PackedForward payload sent as str can be turned back into its exact bytes.
    return msgpack.Unpacker(
        raw=False,
        unicode_errors="surrogateescape",
        strict_map_key=False,
        # Ext values (EventTime) stay as slice(code, data): see events.event_seconds.
        ext_hook=slice,
        max_buffer_size=max_size,
        max_array_len=max_items,
        max_map_len=max_items,
        # The buffer starts at read_size (msgpack's default: 1 MiB) and grows as needed; most
        # connections (a Docker host's driver) send small messages and never need much.
        read_size=min(max_size, INITIAL_BUFFER_SIZE),
    )


def _is_size_limit(exc: ValueError) -> bool:
    # msgpack reports a container or string header longer than its limits this way; such a
    # header promises more bytes than the size limit allows, so it is the size, not the format.
    return "exceeds max_" in str(exc)


class ForwardDecoder:
    """Decodes one connection's byte stream into messages.

    Feed bytes with :meth:`receive_data`, then call :meth:`next_message` until it returns
    ``None``. A caller may stop pulling while messages are still buffered (backpressure) and
    resume later. After a :class:`ProtocolError` the decoder is dead: every call raises again.
    """

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_message_size < 1 or max_entries < 1:
            raise ValueError("max_message_size and max_entries must be positive")
        self._max = max_message_size
        self._max_entries = max_entries
        self._unpacker: Any = _IDLE  # until bytes come: see _take_unpacker
        self._next = _IDLE.__next__
        self._fed = self._start = 0
        self._grown = False
        self._lookahead: Message | None = None  # decoded by next_batch, for the next batch
        # next_batch found nothing more to decode and no bytes have come since: the next call
        # returns None at once (each call would otherwise raise StopIteration in msgpack).
        self._drained = False
        # Bytes received but not yet given to the unpacker, which holds at most the limit.
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0  # their total, kept as they come and go (asked every read)
        self._error: ProtocolError | None = None

    def _take_unpacker(self) -> None:
        """An unpacker to decode with, from the spares (see :data:`SPARE_UNPACKERS`)."""
        self._unpacker = _take_unpacker(self._max, self._max_entries)
        self._next = self._unpacker.__next__
        # Offsets in the unpacker's stream: the end of the bytes fed so far, and where the next
        # message starts. Not unpacker.tell() itself: that also moves through a message that is
        # only partly received.
        offset: int = self._unpacker.tell()
        self._fed = self._start = offset
        self._grown = False  # whether the unpacker has held more than its initial buffer

    def _release_unpacker(self) -> None:
        """Everything received is decoded: give the unpacker back to the spares, unless it grew
        (a big read's buffer is let go with it)."""
        if self._unpacker is not _IDLE and not self._grown:
            _give_unpacker(self._unpacker, self._max, self._max_entries)
        self._unpacker = _IDLE
        self._next = _IDLE.__next__
        self._fed = self._start = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet returned as a message (non-zero at EOF: a cut message)."""
        return self._fed - self._start + self._backlog_bytes

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            self._check_alive()
        if not data:
            return
        self._drained = False
        if self._unpacker is _IDLE:
            self._take_unpacker()
        if not self._backlog and self._fed - self._start + len(data) <= self._max:
            self._feed(data)  # the common case: it all fits
        else:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            self._feed_backlog()

    def next_message(self) -> Message | None:
        raw = self.next_raw()
        if raw is None:
            return None
        try:
            return parse_message(raw[0], raw[1], self._max, self._max_entries)
        except ProtocolError as exc:
            self._error = exc
            raise

    def next_raw(self) -> tuple[Any, int] | None:
        """The next complete top-level object and its size on the wire, not yet read as a
        message (the handshake's PING is not one); None when more bytes are needed."""
        if self._error is not None:
            self._check_alive()
        try:
            while True:
                try:
                    obj = self._next()
                except StopIteration:
                    if not self._backlog:
                        self._emptied()
                        return None
                    if self._fed - self._start >= self._max:
                        # The message being decoded alone fills the limit and is not done.
                        too_large = f"over {self._max} bytes"
                        raise ProtocolError("message_too_large", too_large) from None
                    self._feed_backlog()
                    continue
                end = self._unpacker.tell()
                nbytes = end - self._start
                self._start = end
                if obj is not None:  # nil is a heartbeat
                    return obj, nbytes
        except Exception as exc:
            self._error = self._protocol_error(exc)
            raise self._error from exc

    def _protocol_error(self, exc: Exception) -> ProtocolError:
        """What msgpack (or this decoder's own limits) raised, as the protocol error it means."""
        if isinstance(exc, ProtocolError):
            return exc
        if isinstance(exc, msgpack.BufferFull):
            return ProtocolError("message_too_large", f"over {self._max} bytes")
        if isinstance(exc, ValueError) and _is_size_limit(exc):  # limits, FormatError...
            return ProtocolError("message_too_large", str(exc))
        if isinstance(exc, ValueError | TypeError):  # TypeError: an unhashable map key
            return ProtocolError("not_msgpack", _describe(exc))
        raise exc  # a bug, not input: let it be seen

    def next_batch(self, max_entries: int = DEFAULT_BATCH_ENTRIES) -> Batch | None:
        """The next message merged with the complete messages right after it that have the same
        tag, up to about ``max_entries`` entries; None when more bytes are needed. Bad input
        after the first message ends the batch; the error is raised by the next call."""
        if self._error is not None:
            self._check_alive()
        if self._drained and self._lookahead is None:
            return None  # nothing has arrived since the last call found the unpacker empty
        batch: Batch | None = None
        if (first := self._lookahead) is not None:
            self._lookahead = None
            batch = _batch_of(first)
        max_size, entries_limit = self._max, self._max_entries
        next_obj, tell = self._next, self._unpacker.tell
        chunk: Any = None  # an inline message's chunk id (when it has options: size 4)
        # This loop runs once per message (Docker's driver sends one event per message, often
        # one message per read), so the common case is inline: a Message-mode event without
        # options or with only a chunk id to acknowledge, already in the unpacker. Anything else
        # (no complete message, an error, another shape) takes next_raw() and parse_message().
        while batch is None or len(batch.entries) < max_entries:
            try:
                obj = next_obj()
            except StopIteration:
                if self._backlog:  # more bytes wait for room in the unpacker
                    obj = _NEED_DATA
                else:
                    self._emptied()
                    break
            except Exception as exc:
                self._error = self._protocol_error(exc)
                if batch is None:
                    raise self._error from exc
                break  # the next call raises it
            if obj is not _NEED_DATA:
                end = tell()
                nbytes = end - self._start
                self._start = end
                if obj is None:  # a heartbeat
                    continue
                if (
                    type(obj) is list
                    # no options, or options with a chunk id (a client that asks for acks)
                    and (
                        (size := len(obj)) == 3
                        or (
                            size == 4
                            and type(options := obj[3]) is dict
                            and type(chunk := options.get("chunk")) is str
                        )
                    )
                    # an EventTime (as decoded: see events.event_seconds), or a number
                    and (
                        (
                            (t := obj[1]).__class__ is slice
                            and t.start == EVENT_TIME_EXT_TYPE
                            and len(t.stop) == 8
                        )
                        or t.__class__ is float
                        or t.__class__ is int
                    )
                ):
                    tag = obj[0]
                    inline = True
                    if batch is not None and tag == batch.tag:
                        batch.entries.append([t, obj[2]])
                        batch.nbytes += nbytes
                        if size == 4:
                            batch.chunks.append(chunk)
                    elif batch is None and type(tag) is str and tag and tag.isascii():
                        batch = Batch(tag, [[t, obj[2]]], [chunk] if size == 4 else [], nbytes)
                    else:
                        inline = False  # another tag, or one to check: the general path
                    if inline:
                        if end == self._fed and not self._backlog:
                            # Every byte received is decoded (one message per read, as
                            # Docker's driver writes): no need to ask msgpack, whose "no
                            # more" is an exception (StopIteration) costing a few hundred ns.
                            self._emptied()
                            break
                        continue
            try:
                if obj is _NEED_DATA:
                    raw = self.next_raw()
                    next_obj, tell = self._next, self._unpacker.tell
                    if raw is None:
                        break
                    obj, nbytes = raw
                message = parse_message(obj, nbytes, max_size, entries_limit)
            except ProtocolError as exc:
                self._error = exc
                if batch is None:
                    raise
                break  # the next call raises it
            if batch is None:
                batch = _batch_of(message)
            elif message.tag == batch.tag:
                batch.entries += message.entries
                batch.nbytes += message.nbytes
                if message.chunk is not None:
                    batch.chunks.append(message.chunk)
            else:
                self._lookahead = message
                break
        return batch

    def _emptied(self) -> None:
        """Everything received is decoded: next_batch has nothing to do until more arrives, and
        the unpacker can go back to the spares."""
        self._drained = True
        if self._start == self._fed:  # no message partly received
            self._release_unpacker()

    def _feed(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:  # unreachable: callers keep within the limit; a backstop
            self._fail(ProtocolError("message_too_large", f"over {self._max} bytes buffered"))
        self._fed += len(data)
        if self._fed - self._start > INITIAL_BUFFER_SIZE:
            self._grown = True

    def _feed_backlog(self) -> None:
        """Move received bytes into the unpacker as far as the limit allows. The limit is on one
        message, not on a read: complete messages ahead of a big one are decoded first."""
        while self._backlog:
            room = self._max - (self._fed - self._start)
            if room <= 0:
                return
            data = self._backlog[0]
            if len(data) <= room:
                self._backlog.popleft()
                self._backlog_bytes -= len(data)
                self._feed(data)
            else:
                self._backlog[0] = data[room:]
                self._backlog_bytes -= room
                self._feed(data[:room])

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ProtocolError(self._error.reason, f"decoder failed earlier: {self._error.detail}")

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._error = exc
        raise exc


def _batch_of(message: Message) -> Batch:
    chunks = [] if message.chunk is None else [message.chunk]
    return Batch(message.tag, message.entries, chunks, message.nbytes)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def parse_message(
    obj: Any,
    nbytes: int,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Message:
    """Turn one decoded top-level msgpack object into a :class:`Message` (any mode). The
    common case, Message mode without options, is also decoded inline by next_batch."""
    if type(obj) is not list or not 2 <= len(obj) <= 4:
        raise ProtocolError("bad_shape", f"expected an array of 2 to 4 items, got {_kind(obj)}")
    tag = _parse_tag(obj[0])
    second = obj[1]
    kind = type(second)
    if kind is list:
        _check_length(obj, 2, 3, "Forward")
        return Message(tag, second, _parse_chunk(_option(obj, 2)), nbytes)
    if kind is bytes or kind is str:
        _check_length(obj, 2, 3, "PackedForward")
        option = _option(obj, 2)
        entries = _unpack_entries(_payload_bytes(second, option, max_size), max_entries)
        return Message(tag, entries, _parse_chunk(option), nbytes)
    if kind is slice:  # an ext value, as decoded: only an EventTime of 8 bytes is a time
        if second.start != EVENT_TIME_EXT_TYPE:
            no_mode = f"second element is ext type {second.start}: no such mode"
            raise ProtocolError("bad_shape", no_mode)
        if len(second.stop) != 8:
            raise ProtocolError("bad_shape", f"EventTime must be 8 bytes, got {len(second.stop)}")
    # bool is an int subclass, hence the exact type tests
    if kind is int or kind is float or kind is slice:
        _check_length(obj, 3, 4, "Message")
        return Message(tag, [[second, obj[2]]], _parse_chunk(_option(obj, 3)), nbytes)
    raise ProtocolError("bad_shape", f"second element is {_kind(second)}: no such mode")


def _kind(obj: object) -> str:
    if type(obj) is list:
        return f"an array of {len(obj)}"
    return type(obj).__name__


def _check_length(obj: list[Any], low: int, high: int, mode: str) -> None:
    if not low <= len(obj) <= high:
        raise ProtocolError("bad_shape", f"{mode} mode takes {low} or {high} items, not {len(obj)}")


def _parse_tag(tag: object) -> str:
    if type(tag) is str:
        if not tag:
            raise ProtocolError("bad_tag", "empty tag")
        if tag.isascii():
            return tag
        # Invalid UTF-8 arrived as lone surrogates; a tag is routed on and written out, so
        # it gets the visible replacement character instead.
        return tag.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if type(tag) is bytes:  # a bin tag: Ruby makes no str/bin difference, so in_forward takes it
        if not tag:
            raise ProtocolError("bad_tag", "empty tag")
        return tag.decode("utf-8", "replace")
    raise ProtocolError("bad_tag", f"tag is {_kind(tag)}, not a string")


def _option(obj: list[Any], index: int) -> dict[Any, Any] | None:
    if len(obj) <= index:
        return None
    option = obj[index]
    if option is None or type(option) is dict:
        return option
    raise ProtocolError("bad_shape", f"option is {_kind(option)}, not a map")


def _parse_chunk(option: dict[Any, Any] | None) -> str | None:
    if option is None:
        return None
    chunk = option.get("chunk")
    if chunk is None or type(chunk) is str:
        return chunk
    if type(chunk) is bytes:
        # surrogateescape so that encode_ack gives the client back exactly the bytes it sent
        return chunk.decode("utf-8", "surrogateescape")
    raise ProtocolError("bad_shape", f"chunk option is {_kind(chunk)}, not a string")


def _payload_bytes(payload: bytes | str, option: dict[Any, Any] | None, max_size: int) -> bytes:
    raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
    compressed = None if option is None else option.get("compressed")
    if compressed in _PLAIN_COMPRESSED:
        return raw
    if compressed == "gzip":
        return gunzip(raw, max_size)
    raise ProtocolError("bad_compression", f"unknown compressed={compressed!r}")


_GZIP_FIRST_FEED = 64
_GZIP_MAX_FEED = 64 * 1024


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress one or more concatenated gzip members, refusing output beyond ``limit``.

    Fluentd compresses each buffer chunk append separately, so a payload is often several
    members; the cap stops a small payload from expanding without bound (a gzip bomb).

    Time stays linear in the payload: zlib copies out what follows the end of a member
    (``unused_data``), so each member is fed a window that starts small and doubles, never
    the whole rest of the payload (which made a payload of many tiny members quadratic).
    """
    parts: list[bytes] = []
    total = 0
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        member = zlib.decompressobj(wbits=_GZIP_WBITS)
        feed = _GZIP_FIRST_FEED
        while not member.eof:
            if pos >= len(data):
                raise ProtocolError("bad_compression", "gzip: truncated member")
            window = view[pos : pos + feed]
            try:
                # one byte over the remaining room is enough to know the limit is exceeded
                out = member.decompress(window, limit - total + 1)
            except zlib.error as exc:
                raise ProtocolError("bad_compression", f"gzip: {exc}") from exc
            total += len(out)
            if total > limit:
                raise ProtocolError("message_too_large", f"gzip inflates past {limit} bytes")
            if out:
                parts.append(out)
            pos += len(window) - len(member.unused_data)
            feed = min(feed * 2, _GZIP_MAX_FEED)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _unpack_entries(payload: bytes, max_entries: int = DEFAULT_MAX_ENTRIES) -> list[list[Any]]:
    """Decode a PackedForward payload: a stream of msgpack ``[time, record]`` entries, at most
    ``max_entries`` of them."""
    if not payload:
        return []
    # A fresh unpacker sized to this payload: a per-connection one would keep its largest
    # buffer (up to the size limit) alive for the connection's whole life.
    unpacker = _new_unpacker(len(payload) + len(_NIL), max_entries)
    unpacker.feed(payload)
    try:
        # islice keeps the loop in C and stops one past the limit, before building the rest.
        entries: list[list[Any]] = list(itertools.islice(unpacker, max_entries + 1))
        if len(entries) > max_entries:
            raise ProtocolError(
                "message_too_large", f"PackedForward payload has over {max_entries} entries"
            )
        # tell() cannot show a cut last entry: it also counts the bytes of a partial object.
        # A nil appended after a clean end decodes as itself; after a partial object it is
        # swallowed into that object (a nil is one byte, so it can never be the partial one).
        unpacker.feed(_NIL)
        clean_end = next(unpacker, _NEED_DATA) is None
    except ValueError as exc:
        if _is_size_limit(exc):
            raise ProtocolError("message_too_large", f"PackedForward entries: {exc}") from exc
        raise ProtocolError("bad_shape", f"PackedForward entries: {_describe(exc)}") from exc
    except TypeError as exc:
        raise ProtocolError("bad_shape", f"PackedForward entries: {_describe(exc)}") from exc
    if not clean_end:
        raise ProtocolError("bad_shape", "PackedForward entries: the last entry is cut short")
    return entries
