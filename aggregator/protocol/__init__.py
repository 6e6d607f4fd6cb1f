"""The Fluentd forward protocol, sans-IO: bytes in, messages and acks out; no sockets, no clocks.

The server feeds each connection's bytes to a :class:`ForwardDecoder`, pulls :class:`Message`
objects from it, and answers :func:`encode_ack` for those that carry a ``chunk``. The encoders
are the client side, for tests and the load generator.
"""

from aggregator.protocol.decoder import DEFAULT_MAX_MESSAGE_SIZE, ForwardDecoder
from aggregator.protocol.encoder import (
    EventTime,
    Time,
    decode_ack,
    encode_ack,
    encode_forward,
    encode_message,
    encode_packed_forward,
    new_chunk_id,
    pack_entries,
)
from aggregator.protocol.events import (
    PROTOCOL_ERROR_REASONS,
    Batch,
    Message,
    ProtocolError,
    ProtocolErrorReason,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "PROTOCOL_ERROR_REASONS",
    "Batch",
    "EventTime",
    "ForwardDecoder",
    "Message",
    "ProtocolError",
    "ProtocolErrorReason",
    "Time",
    "decode_ack",
    "encode_ack",
    "encode_forward",
    "encode_message",
    "encode_packed_forward",
    "new_chunk_id",
    "pack_entries",
]
