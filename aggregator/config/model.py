"""The configuration schema: every key a user can write, its default and its meaning.

Names follow Fluentd's where Fluentd has the concept (``chunk_limit_size``, ``flush_interval``,
``overflow_action``, ``retry_wait``...), so that a Fluentd user recognises them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from aggregator.config.cpus import available_cpus
from aggregator.config.units import parse_duration, parse_rate, parse_size
from aggregator.protocol.decoder import DEFAULT_MAX_ENTRIES
from aggregator.ruby import compile_ruby, compile_slashed

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; written as a number of seconds or a string such as "500ms", "1s", "2m"."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; written as a number of bytes or a string such as "64KiB", "1MiB", "2GiB"."""

Rate = Annotated[int, BeforeValidator(parse_rate)]
"""Bytes per second; written as a number or a string such as "5MiB/s"."""


def _blank_is_none(value: object) -> object:
    return None if value == "" else value


BlankIsUnset = Annotated[str | None, BeforeValidator(_blank_is_none)]
SourceLabel = Annotated[
    str | None,
    Field(
        description="Route this source's events through the routes of this label only "
        "(Fluentd's @label, e.g. \"@mainstream\"); unset: through the routes without a label."
    ),
]
"""A source's ``label``, the same for every kind of source."""
"""An optional string where "" means unset: what "${VAR:-}" expands to when VAR is not set."""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"handoff: expected host:port, got {text!r}")
    return host.strip("[]"), int(port)

FIREHOSE_MAX_RECORD_BYTES = 1_000 * 1024
"""Firehose refuses a record larger than 1,000 KiB (before base64)."""


class Strict(BaseModel):
    """Every config table: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sources ---------------------------------------------------------------------------------


class ForwardUser(Strict):
    username: str = Field(min_length=1)
    password: str = Field(description="Write it as \"${VAR}\" to take it from the environment.")


class ForwardClient(Strict):
    """Who may connect (Fluentd's <client>): by host or network, with its own key and users."""

    host: str | None = Field(None, description="Address or name (resolved at start).")
    network: str | None = Field(None, description="An address or CIDR network.")
    shared_key: str | None = Field(None, description="Its own shared key (default: the one).")
    users: list[str] = Field(default_factory=list, description="Usernames it may use.")

    @model_validator(mode="after")
    def _host_or_network(self) -> ForwardClient:
        if (self.host is None) == (self.network is None):
            raise ValueError("a client needs exactly one of host and network")
        if self.network is not None:
            ipaddress.ip_network(self.network, strict=False)  # ValueError names the problem
        return self


class ForwardSecurity(Strict):
    """Fluentd's <security>: clients authenticate with the HELO/PING/PONG handshake before
    sending events (out_forward's <security>, Fluent Bit's Shared_Key)."""

    self_hostname: str = Field(min_length=1, description="Our name in the handshake.")
    shared_key: str = Field(
        min_length=1, description="Shared key; write it as \"${FORWARD_SHARED_KEY}\"."
    )
    user_auth: bool = Field(False, description="Also require a username and password.")
    allow_anonymous_source: bool = Field(
        True, description="Accept clients not listed in clients."
    )
    users: list[ForwardUser] = Field(default_factory=list)
    clients: list[ForwardClient] = Field(default_factory=list)
    handshake_timeout: Duration = Field(
        10.0, gt=0, description="A client must complete the handshake within this long."
    )

    @model_validator(mode="after")
    def _complete(self) -> ForwardSecurity:
        if self.user_auth and not self.users:
            raise ValueError("user_auth needs users")
        if not self.allow_anonymous_source and not self.clients:
            raise ValueError("allow_anonymous_source = false needs clients")
        return self


class ForwardTls(Strict):
    """TLS on the forward port (out_forward's transport tls, Fluent Bit's tls on)."""

    cert_path: str | None = Field(None, description="Certificate chain, PEM file.")
    private_key_path: str | None = Field(None, description="Private key, PEM file.")
    cert_pem: str | None = Field(
        None, description="The certificate chain itself, e.g. \"${TLS_CERT_PEM}\" (a secret)."
    )
    private_key_pem: str | None = Field(None, description="The private key itself, likewise.")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field("TLSv1.2")
    ca_path: str | None = Field(None, description="CA bundle that client certificates chain to.")
    client_cert_auth: bool = Field(False, description="Require a client certificate.")

    @model_validator(mode="after")
    def _one_source_of_keys(self) -> ForwardTls:
        files = self.cert_path is not None and self.private_key_path is not None
        pems = bool(self.cert_pem) and bool(self.private_key_pem)
        if files == pems:
            raise ValueError(
                "give cert_path and private_key_path, or cert_pem and private_key_pem"
            )
        if self.client_cert_auth and self.ca_path is None:
            raise ValueError("client_cert_auth needs ca_path")
        return self


class ForwardSource(Strict):
    """Fluentd forward protocol over TCP, with UDP heartbeats on the same port (as in_forward)."""

    type: Literal["forward"]
    name: str = Field("forward", description="Label for metrics and logs.")
    label: SourceLabel = None
    bind: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(24224, ge=0, le=65535, description="TCP (and UDP heartbeat) port; 0 = any.")
    message_length_limit: Size = Field(
        32 * 1024 * 1024,
        description="Largest forward message accepted (Fluentd's in_forward has no limit unless "
        "chunk_size_limit is set). A larger one closes the connection and counts "
        "aggregator_input_errors_total{reason=message_too_large}.",
    )
    message_entries_limit: int = Field(
        DEFAULT_MAX_ENTRIES,
        ge=1,
        description="Most events in one forward message, and items in any array or map inside "
        "it (bytes alone do not bound memory: 32 MiB of 3-byte events decode to 1.6 GB). A "
        "message costs up to about 150 B per entry while it is read. Over it: the connection "
        "is closed, aggregator_input_errors_total{reason=message_too_large}.",
    )
    heartbeat: bool = Field(True, description="Answer UDP heartbeats on the same port.")
    security: ForwardSecurity | None = Field(
        None, description="Require Fluentd's handshake (shared key, users) before events."
    )
    tls: ForwardTls | None = Field(None, description="Speak TLS on the forward port.")
    keepalive_idle: Duration = Field(
        60.0,
        ge=0,
        description="TCP keepalive: idle seconds before the first probe (0 = off). Keep it well "
        "under a Network Load Balancer's 350 s idle timeout: Docker's driver sends nothing on an "
        "idle connection, and one the NLB has forgotten loses the next lines.",
    )
    keepalive_interval: Duration = Field(10.0, gt=0, description="TCP keepalive: probe interval.")
    keepalive_probes: int = Field(
        6, ge=1, le=127, description="TCP keepalive: unanswered probes before giving up."
    )
    message_timeout: Duration = Field(
        60.0,
        gt=0,
        description="A message must be complete this long after its first byte arrived, or the "
        "connection is reset and counted (aggregator_input_errors_total{reason=message_timeout})"
        ": a sender trickling bytes (slowloris) cannot hold a connection and its buffer forever.",
    )
    trickle_read_delay: Duration = Field(
        0.05,
        ge=0,
        le=1,
        description="On a connection without acks that sends under 256 KiB/s (Docker's driver "
        "writes every line on its own), wait this long after each read before the next, so "
        "that one read takes many lines: 50ms takes about 40% off the CPU per event in that "
        "shape, for at most that much added latency. Connections with acks, faster ones, a "
        "message in progress and closing connections are read at once. 0: every write is "
        "read at once.",
    )
    idle_timeout: Duration | None = Field(
        3600.0,
        gt=0,
        description="Close a connection silent this long, at that safe moment (a client "
        "without acks sends its next line again on a new connection, one with acks gets FIN "
        "after its last ack). Unset: never. Idle connections hold a descriptor and ~3 KiB.",
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        description="Open connections per worker; one more is closed at once, logged and counted "
        "(aggregator_connections_refused_total). Each open connection costs about 3-30 KiB.",
    )
    max_connection_age: Duration | None = Field(
        None,
        gt=0,
        description="Close a connection this long after it opened, at its next safe moment, so "
        "that clients reconnect and a scaled-out service shares their load (unset: never).",
    )
    max_connection_age_jitter: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Each connection's age limit is shortened by a random fraction up to this, "
        "so that connections opened together do not all reconnect together.",
    )


class HttpSource(Strict):
    """Fluentd in_http-compatible HTTP input, plus /api/health, /api/flush and /metrics."""

    type: Literal["http"]
    name: str = Field("http", description="Label for metrics and logs.")
    label: SourceLabel = None
    bind: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8888, ge=0, le=65535, description="TCP port; 0 = any.")
    body_size_limit: Size = Field(32 * 1024 * 1024, description="Largest request body accepted.")
    control_token: BlankIsUnset = Field(
        None,
        description="Bearer token that POST /api/flush and GET /metrics require (write it as "
        "\"${CONTROL_TOKEN}\" to take it from the environment). Unset: /api/flush answers only "
        "clients on this host (loopback) and /metrics is open.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose browsers may post events (\"*\": any), as in_http's. A "
        "request that carries another Origin header gets 403: log clients send none, browsers "
        "always do, so a web page cannot make its visitors post to the aggregator.",
    )
    body_timeout: Duration = Field(
        30.0,
        gt=0,
        description="A request's body must arrive within this long, or the answer is 408 "
        "(a Content-Length that is never sent must not hold the request forever).",
    )
    keepalive_timeout: Duration = Field(
        10.0,
        gt=0,
        description="A connection is closed when no request head has arrived this long after "
        "it opened or after its last answer (in_http's keepalive_timeout, default 10 s). It "
        "also bounds a request head that trickles in (slowloris).",
    )
    body_entries_limit: int = Field(
        DEFAULT_MAX_ENTRIES,
        ge=1,
        description="Most events in one request, and items in any msgpack array or map in it "
        "(checked before they are decoded): over it, 400.",
    )


Source = Annotated[ForwardSource | HttpSource, Field(discriminator="type")]


# --- routes ----------------------------------------------------------------------------------


class Route(Strict):
    """Events whose tag matches ``match`` go to ``destination``; the first matching route wins."""

    match: str = Field(
        description="Fluentd tag patterns separated by spaces: '*' one tag part, '**' zero or "
        "more parts, '{a,b}' alternatives."
    )
    destination: str = Field(description="Name of a [destinations.NAME] table.")
    label: str | None = Field(
        None,
        description="Only for sources with this label (Fluentd's <label>); unset: for sources "
        "without one. Routes are tried in order within their label.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> Route:
        from aggregator.routing import compile_match  # the one place that knows tag patterns

        compile_match(self.match)
        return self


# --- filters ---------------------------------------------------------------------------------


class FilterBase(Strict):
    match: str = Field(description="Fluentd tag patterns, as a route's: the events it filters.")
    label: str | None = Field(
        None, description="Only in this label (Fluentd's <filter> inside <label>)."
    )
    name: str | None = Field(None, description="For metrics and logs (default: type_N).")

    @model_validator(mode="after")
    def _patterns_compile(self) -> FilterBase:
        from aggregator.routing import compile_match

        compile_match(self.match)
        return self


class RecordTransformer(FilterBase):
    """Fluentd's record_transformer (without enable_ruby): fields set from placeholders."""

    type: Literal["record_transformer"]
    record: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields to set: values may hold ${tag}, ${tag_parts[N]}, ${tag_prefix[N]}, "
        "${tag_suffix[N]}, ${hostname}, ${time}, ${record[\"key\"]}.",
    )
    remove_keys: list[str] = Field(default_factory=list)
    keep_keys: list[str] = Field(default_factory=list, description="With renew_record.")
    renew_record: bool = False
    renew_time_key: str | None = None
    auto_typecast: bool = Field(
        True, description="A value that is one placeholder keeps its type (a number, a map)."
    )

    @model_validator(mode="after")
    def _keep_needs_renew(self) -> RecordTransformer:
        if self.keep_keys and not self.renew_record:
            raise ValueError("keep_keys needs renew_record = true")
        return self


def _ruby_regex(text: str) -> str:
    compile_ruby(text)  # an error naming the pattern when Python cannot do what it asks
    return text


RubyRegexText = Annotated[str, AfterValidator(_ruby_regex)]
"""A Ruby regexp, ``/pattern/flags`` or bare, that compiles here."""


class GrepRule(Strict):
    key: str = Field(description="A field, or a record accessor ($.a.b).")
    pattern: RubyRegexText = Field(description="A Ruby regexp, /pattern/flags or bare.")


class GrepGroup(Strict):
    regexp: list[GrepRule] = Field(default_factory=list)
    exclude: list[GrepRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> GrepGroup:
        if self.regexp and self.exclude:
            raise ValueError("an and/or group holds regexp or exclude rules, not both")
        return self


class Grep(FilterBase):
    """Fluentd's grep: keep events whose fields match (regexp), drop those that do (exclude)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["grep"]
    regexp: list[GrepRule] = Field(default_factory=list, description="All must match.")
    exclude: list[GrepRule] = Field(default_factory=list, description="None may match.")
    and_: list[GrepGroup] = Field(default_factory=list, alias="and")
    or_: list[GrepGroup] = Field(default_factory=list, alias="or")


class ParseSettings(Strict):
    """Fluentd's <parse>: json, or regexp with named groups."""

    type: Literal["json", "regexp"] = "json"
    expression: RubyRegexText | None = Field(
        None, description="regexp: a Ruby regexp with named groups."
    )
    time_key: str | None = Field(
        "time", description="The field that becomes the event's time (and leaves the record)."
    )
    keep_time_key: bool = False
    time_format: str | None = Field(None, description="strptime format of time_key's value.")
    time_type: Literal["float", "unixtime", "string"] | None = None

    @model_validator(mode="after")
    def _expression(self) -> ParseSettings:
        if self.type == "regexp" and not self.expression:
            raise ValueError("parse type regexp needs expression")
        if self.expression and not compile_ruby(self.expression).groupindex:
            raise ValueError("parse expression needs at least one named group, (?<name>...)")
        return self


class Parser(FilterBase):
    """Fluentd's parser filter: one field's text parsed into the record."""

    type: Literal["parser"]
    key_name: str
    parse: ParseSettings = Field(default_factory=ParseSettings)
    reserve_data: bool = False
    reserve_time: bool = False
    remove_key_name_field: bool = False
    inject_key_prefix: str | None = None
    hash_value_field: str | None = None
    emit_invalid_record_to_error: bool = Field(
        True, description="A record that does not parse is dropped and counted (Fluentd's @ERROR)."
    )


class Concat(FilterBase):
    """fluent-plugin-concat: lines split by the sender joined back into one event."""

    type: Literal["concat"]
    key: str = Field(description="The field holding the line's text.")
    separator: str = "\n"
    use_partial_metadata: bool = Field(
        False, description="Docker 19.03+'s partial_message, partial_id, partial_ordinal, "
        "partial_last.",
    )
    keep_partial_metadata: bool = False
    partial_key: str | None = None
    partial_value: str | None = None
    keep_partial_key: bool = False
    n_lines: int | None = Field(None, ge=1)
    multiline_start_regexp: str | None = None
    multiline_end_regexp: str | None = None
    continuous_line_regexp: str | None = None
    stream_identity_key: str | None = None
    flush_interval: Duration = Field(
        60.0, ge=0, description="An incomplete line is let go this long after its last part "
        "(0: held until the stop): it goes on as it is, counted.",
    )
    timeout_label: str | None = Field(
        None, description="Where a line let go goes (default: on, as any event)."
    )
    use_first_timestamp: bool = False
    buffer_limit_size: Size = Field(500 * 1024, gt=0)
    buffer_overflow_method: Literal["ignore", "truncate", "drop", "new"] = "ignore"

    @model_validator(mode="after")
    def _one_mode(self) -> Concat:
        modes = [self.n_lines is not None, self.partial_key is not None,
                 self.use_partial_metadata,
                 bool(self.multiline_start_regexp or self.multiline_end_regexp)]  # fmt: skip
        if sum(modes) != 1:
            raise ValueError("concat needs exactly one of n_lines, partial_key, "
                             "use_partial_metadata, multiline_start_regexp/multiline_end_regexp")
        if self.partial_key is not None and self.partial_value is None:
            raise ValueError("partial_value is required with partial_key")
        for regexp in (self.multiline_start_regexp, self.multiline_end_regexp,
                       self.continuous_line_regexp):  # fmt: skip
            if regexp is not None:
                compile_slashed(regexp)
        return self


class DockerPartials(FilterBase):
    """Rejoin the lines Docker's log driver splits at 16 KiB (its partial metadata): concat on
    "log" with use_partial_metadata, nothing between the parts."""

    type: Literal["docker_partials"]
    key: str = "log"
    flush_interval: Duration = Field(5.0, ge=0)

    def as_concat(self) -> Concat:
        return Concat(type="concat", match=self.match, label=self.label, name=self.name,
                      key=self.key, separator="", use_partial_metadata=True,
                      flush_interval=self.flush_interval)  # fmt: skip


Filter = Annotated[
    RecordTransformer | Grep | Parser | Concat | DockerPartials, Field(discriminator="type")
]


# --- destinations ----------------------------------------------------------------------------


class Inject(Strict):
    """Fields added to every record before it is written, like Fluentd's <inject>."""

    tag_key: str | None = Field(None, description="Key that receives the event's tag.")
    time_key: str | None = Field(None, description="Key that receives the event's time.")
    time_format: Literal["iso8601", "epoch", "epoch_ms"] = Field(
        "iso8601",
        description="iso8601: '2024-01-31T12:00:00.123Z' (UTC, milliseconds); epoch: seconds as a "
        "float; epoch_ms: integer milliseconds.",
    )


class BufferSettings(Strict):
    """One buffer per destination: chunks, limits, flushing and retries (Fluentd's <buffer>)."""

    type: Literal["memory", "file"] = Field(
        "memory",
        description="memory: events wait in the worker's memory (lost if it dies). file: every "
        "event is written to a file under path before it is acknowledged, survives a worker "
        "crash or restart, and a Firehose outage longer than memory (Fluentd's @type file).",
    )
    path: BlankIsUnset = Field(
        None,
        description="type = file: a directory of this destination's own (created if missing); "
        "each worker writes in its own subdirectory w<index>, which it locks. Not read by a "
        "memory buffer (so that one config can choose the type from the environment).",
    )
    fsync: Literal["periodic", "always", "off"] = Field(
        "periodic",
        description="type = file: when written data is forced to the disk itself. Every event "
        "is written to the kernel before its ack, which a process crash cannot lose; fsync adds "
        "a host crash: periodic = every fsync_interval (the last interval may be lost), always "
        "= before every ack (slower), off = when the kernel chooses.",
    )
    fsync_interval: Duration = Field(1.0, gt=0, description="fsync = periodic: how often.")
    free_space_reserve: Size = Field(
        100 * 1024 * 1024,
        ge=0,
        description="type = file: when the filesystem has less free space than this, the "
        "buffer counts as full (overflow_action applies) until it has again.",
    )
    chunk_limit_size: Size = Field(
        1024 * 1024, gt=0, description="A chunk is flushed at this size."
    )
    chunk_limit_records: int = Field(
        100_000, gt=0, description="A chunk is flushed at this many events."
    )
    flush_interval: Duration = Field(1.0, gt=0, description="A chunk is flushed at this age.")
    total_limit_size: Size = Field(
        256 * 1024 * 1024,
        gt=0,
        description="What the buffer may hold (open, queued and in-flight chunks). memory: the "
        "events' JSON plus about 56 bytes of bookkeeping per event; file: bytes on disk "
        "(Fluentd's meaning for file buffers).",
    )
    flush_thread_count: int = Field(
        4, ge=1, le=256, description="Chunks being delivered at the same time."
    )
    overflow_action: Literal["block", "drop_oldest_chunk", "throw_exception"] = Field(
        "block",
        description="When total_limit_size is reached: block = stop reading from the senders "
        "(TCP backpressure) until there is room; drop_oldest_chunk = discard the oldest queued "
        "chunk (counted); throw_exception = refuse new events (no ack, HTTP 503).",
    )
    retry_wait: Duration = Field(1.0, gt=0, description="First retry delay (before jitter).")
    retry_max_interval: Duration = Field(30.0, gt=0, description="Longest retry delay.")
    retry_timeout: Duration = Field(
        3600.0, gt=0, description="Give a chunk up after retrying this long."
    )
    retry_max_times: int | None = Field(
        None, ge=0, description="Give a chunk up after this many retries (unset: no count limit)."
    )

    @model_validator(mode="after")
    def _limits_consistent(self) -> BufferSettings:
        if self.total_limit_size < self.chunk_limit_size:
            raise ValueError("total_limit_size must be at least chunk_limit_size")
        if self.type == "file" and not self.path:
            raise ValueError('type = "file" needs path (a directory)')
        return self


class DestinationBase(Strict):
    inject: Inject = Field(default_factory=Inject, description="Fields added to each record.")
    buffer: BufferSettings = Field(default_factory=BufferSettings, description="Buffering.")
    secondary: str | None = Field(
        None,
        description="Destination that receives events this one cannot deliver (retries "
        "exhausted, refused by the service, shutdown deadline); typically a file destination.",
    )


class AssumeRole(Strict):
    """The Kinesis plugin's <assume_role_credentials>: STS AssumeRole."""

    role_arn: str = Field(min_length=20, description="arn:aws:iam::ACCOUNT:role/NAME")
    role_session_name: str = Field("aggregator", min_length=2, max_length=64)
    external_id: BlankIsUnset = Field(None, description="As the role's trust policy asks.")
    duration_seconds: int | None = Field(None, ge=900, le=43200)
    policy: BlankIsUnset = Field(None, description="A session policy, JSON.")
    sts_endpoint_url: BlankIsUnset = Field(
        None, description="A regional or VPC STS endpoint (default: the region's)."
    )
    sts_http_proxy: BlankIsUnset = Field(None, description="A proxy for the STS calls only.")


class FirehoseDestination(DestinationBase):
    """Kinesis Data Firehose PutRecordBatch."""

    type: Literal["firehose"]
    delivery_stream: str = Field(min_length=1, description="Delivery stream name.")
    region: BlankIsUnset = Field(
        None, description="AWS region; unset: the standard chain (AWS_REGION...)."
    )
    endpoint_url: BlankIsUnset = Field(
        None,
        description="Custom endpoint (an emulator, a VPC endpoint); empty: the SDKs' "
        "AWS_ENDPOINT_URL_FIREHOSE or AWS_ENDPOINT_URL if set, else AWS's default.",
    )
    aggregate: bool = Field(
        False,
        description="Pack many newline-delimited events into one Firehose record (up to "
        "record_max_size): right for S3-bound streams. Off: one event per record, as "
        "OpenSearch-bound streams need.",
    )
    record_max_size: Size = Field(
        FIREHOSE_MAX_RECORD_BYTES,
        gt=0,
        le=FIREHOSE_MAX_RECORD_BYTES,
        description="Largest Firehose record built (Firehose's limit is 1,000 KiB).",
    )
    request_timeout: Duration = Field(
        60.0,
        gt=0,
        description="One PutRecordBatch call, at most (botocore's own read timeout). A call "
        "given up on may still have been accepted, and its records are then sent again: "
        "delivery is at least once, so keep this well above the service's slowest answers.",
    )
    data_key: str | None = Field(
        None,
        description="Send only this field's value as the record (e.g. the raw `log` line), as "
        "the Kinesis plugin's data_key; an event without it is not sent (dropped, or to the "
        "secondary, counted with reason data_key_missing).",
    )
    compression: Literal["gzip", "zlib"] | None = Field(
        None, description="Compress each record (then a newline), as the Kinesis plugin does."
    )
    chomp_record: bool = Field(
        False, description="No newline at the end of the JSON inside a compressed record."
    )
    http_proxy: BlankIsUnset = Field(
        None,
        description="http://[user:password@]host:port for the calls to Firehose (and STS); "
        "unset: HTTPS_PROXY (HTTP_PROXY for an http endpoint) and NO_PROXY, as the SDKs read them.",
    )
    assume_role: AssumeRole | None = Field(
        None, description="Deliver with a role assumed from the standard chain's credentials "
        "(another account's stream), refreshed before they expire."
    )  # fmt: skip

    @model_validator(mode="after")
    def _compression_is_per_record(self) -> FirehoseDestination:
        if self.aggregate and (self.compression or self.chomp_record):
            raise ValueError("compression and chomp_record are per record: aggregate = false")
        return self


class FileDestination(DestinationBase):
    """Newline-delimited JSON files in a directory, rotated by size."""

    type: Literal["file"]
    path: str = Field(description="Directory (created if missing).")
    prefix: str = Field("events", description="File names: PREFIX.<start time>.<n>.ndjson.")
    rotate_size: Size = Field(
        64 * 1024 * 1024, gt=0, description="A file is closed (renamed) at this size."
    )


class StdoutDestination(DestinationBase):
    """One JSON line per event on standard output."""

    type: Literal["stdout"]


class NullDestination(DestinationBase):
    """Discards events, counting them as delivered."""

    type: Literal["null"]


class ForwardPeer(Strict):
    """One server of a forward destination (out_forward's <server>)."""

    host: str = Field(min_length=1)
    port: int = Field(24224, ge=1, le=65535)
    name: str | None = Field(None, description="For logs (default: host:port).")
    shared_key: str | None = Field(None, description="This server's, over security.shared_key.")
    username: str = Field("", description="For a server with user_auth.")
    password: str = ""
    standby: bool = Field(False, description="Used only while no other server is up.")
    weight: int = Field(60, ge=0, description="Share of the chunks, among the servers up.")


class ForwardClientSecurity(Strict):
    """The client's side of Fluentd's <security> handshake (out_forward's <security>)."""

    self_hostname: str = Field(min_length=1, description="Our name in the handshake.")
    shared_key: str = Field(min_length=1)
    username: str = Field("", description="For servers with user_auth (a server's own wins).")
    password: str = ""


class ForwardClientTls(Strict):
    """TLS to the servers (out_forward's transport tls)."""

    ca_path: str | None = Field(
        None, description="CA bundle (or the server's own certificate) to trust; unset: the "
        "system's CAs."
    )  # fmt: skip
    ca_pem: str | None = Field(None, description="The same as PEM text, e.g. from a secret.")
    verify_hostname: bool = Field(True, description="The certificate must name the server.")
    insecure: bool = Field(False, description="Encrypt, but verify nothing (tls_insecure_mode).")
    server_hostname: str | None = Field(
        None, description="The name the certificate must have (default: the server's host)."
    )
    cert_path: str | None = Field(None, description="A client certificate, for mutual TLS.")
    private_key_path: str | None = None
    cert_pem: str | None = None
    private_key_pem: str | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _pairs(self) -> ForwardClientTls:
        if (self.cert_path is None) != (self.private_key_path is None):
            raise ValueError("cert_path and private_key_path go together")
        if bool(self.cert_pem) != bool(self.private_key_pem):
            raise ValueError("cert_pem and private_key_pem go together")
        if self.cert_path is not None and self.cert_pem:
            raise ValueError("a client certificate from files or from PEM text, not both")
        return self


class ForwardDestination(DestinationBase):
    """Another Fluentd-compatible server, over the forward protocol (Fluentd's out_forward)."""

    type: Literal["forward"]
    servers: list[ForwardPeer] = Field(min_length=1)
    require_ack_response: bool = Field(
        False, description="A chunk is delivered once the server acknowledges it (else: once "
        "written to the connection)."
    )  # fmt: skip
    ack_response_timeout: Duration = Field(190.0, gt=0, description="No ack by then: resent.")
    compress: Literal["text", "gzip"] = Field("text", description="gzip: CompressedPackedForward.")
    security: ForwardClientSecurity | None = None
    tls: ForwardClientTls | None = None
    connect_timeout: Duration = Field(10.0, gt=0, description="Connecting, TLS and handshake.")
    send_timeout: Duration = Field(60.0, gt=0, description="Writing one chunk.")
    recover_wait: Duration = Field(
        10.0, ge=0, description="A server that failed is tried again after this long."
    )
    keepalive: bool = Field(
        False, description="Keep connections open for the next chunks (else one per chunk, "
        "as out_forward's default)."
    )  # fmt: skip


Destination = Annotated[
    FirehoseDestination | FileDestination | StdoutDestination | NullDestination
    | ForwardDestination,
    Field(discriminator="type"),
]


# --- server ----------------------------------------------------------------------------------


class Server(Strict):
    """Process-wide settings."""

    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    stop_timeout: Duration = Field(
        30.0,
        ge=2,
        le=3600,
        description="The platform's kill timer: how long after SIGTERM the process is killed "
        "(ECS stopTimeout: 30 s by default, at most 120 s; set the same value here, e.g. "
        "stop_timeout = \"${STOP_TIMEOUT:-30}\"). The stop plans to be over a margin before "
        "it: connections closed, buffers flushed, the rest handed off or sent to the secondary.",
    )
    drain_timeout: Duration = Field(
        5.0,
        ge=0,
        description="On stop (and for a max_connection_age close): the longest wait for a "
        "connection's safe moment to close (a message in progress, a buffer that blocks); then "
        "it is reset.",
    )
    drain_quiet_period: Duration = Field(
        0.5,
        ge=0,
        description="On stop: a connection silent this long is closed at once; a busy one is "
        "closed right after its next read.",
    )
    handoff: BlankIsUnset = Field(
        None,
        description="host:port of a forward-protocol server that takes what the stop cannot "
        "deliver in time (on ECS: the service's own NLB name, which reaches the tasks still "
        "running). Events count as handed off once acknowledged. Unset: straight to the "
        "secondary.",
    )
    handoff_security: ForwardClientSecurity | None = Field(
        None,
        description="The handshake for the hand-off. Unset: that of the forward source on the "
        "hand-off's port (else the first with one): its shared key, its first user when it has "
        "user_auth.",
    )
    handoff_tls: ForwardClientTls | None = Field(
        None,
        description="TLS for the hand-off. Unset: when that forward source speaks TLS, TLS "
        "trusting exactly its certificate (no host name check: the load balancer's name need "
        "not be in it).",
    )
    workers: int = Field(
        default_factory=available_cpus,
        ge=1,
        le=256,
        description="Worker processes (default: the CPUs this process may use: the affinity mask, "
        "lowered to the cgroup CPU quota rounded up; on Fargate, the task's vCPUs). "
        "`aggregator run --workers N` overrides it.",
    )
    worker_watchdog_timeout: Duration = Field(
        30.0,
        ge=2,
        description="A worker whose event loop has not turned for this long (it beats every "
        "second) is killed and restarted, logged and counted "
        "(aggregator_worker_watchdog_kills_total).",
    )
    buffer_high_water: float = Field(
        0.9,
        gt=0,
        le=1,
        description="GET /api/health answers 503 when any worker's buffer for any destination "
        "is fuller than this fraction of its total_limit_size.",
    )

    @property
    def handoff_address(self) -> tuple[str, int] | None:
        return None if self.handoff is None else _host_port(self.handoff)

    @model_validator(mode="after")
    def _handoff_is_host_port(self) -> Server:
        if self.handoff is not None:
            _host_port(self.handoff)
        return self


# --- limits ----------------------------------------------------------------------------------


class TenantFrom(Strict):
    """How a tag names its tenant: a part of it, or a regular expression's group."""

    part: int | None = Field(
        0, description="The tag part (0: the first; -1: the last) that names the tenant."
    )
    regex: str | None = Field(
        None,
        description="Instead of part: a regular expression searched in the tag; its group "
        "named tenant, else its first group, else the whole match names the tenant. A tag it "
        "does not match belongs to the tenant \"other\".",
    )

    @model_validator(mode="after")
    def _one_way(self) -> TenantFrom:
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r}: {exc}") from None
            object.__setattr__(self, "part", None)
        elif self.part is None:
            raise ValueError("tenant_from needs part or regex")
        return self


class TenantLimits(Strict):
    """Limits of one tenant; in [limits] for every tenant, in [limits.overrides.NAME] for one
    (a key left out there keeps the value of [limits])."""

    rate: Rate | None = Field(
        None,
        gt=0,
        description="Bytes of events (as delivered: JSON lines) per second a tenant may send, "
        "for the whole service: each worker allows rate / (instances x workers). Unset: none.",
    )
    burst: Size | None = Field(
        None,
        gt=0,
        description="What a tenant may send at once above its rate (a token bucket's size), "
        "shared likewise; unset: one second of rate.",
    )
    buffer_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The most of any destination's buffer (total_limit_size) one tenant's "
        "events may hold, e.g. 0.5; unset: all of it.",
    )
    tag_length_limit: Size | None = Field(
        None, ge=1, description="Longer tags are refused and counted (default 1KiB)."
    )
    max_event_size: Size | None = Field(
        None,
        ge=64,
        description="An event whose JSON line is longer is cut (its longest string shortened) "
        "or refused, as max_event_size_action says; counted either way. Unset: no limit.",
    )
    max_event_size_action: Literal["truncate", "refuse"] | None = Field(
        None, description="truncate (default) or refuse."
    )


class Limits(TenantLimits):
    """Per-tenant limits (Loki's ideas): one service's flood cannot fill every buffer."""

    tenant_from: TenantFrom = Field(default_factory=TenantFrom)
    instances: int = Field(
        1,
        ge=1,
        description="Aggregator processes (ECS tasks) that share rate and burst: each of their "
        "workers allows rate / (instances x workers), as Loki's global strategy divides by "
        "distributors. Set it from the deployment, e.g. \"${TASKS:-2}\".",
    )
    overrides: dict[str, TenantLimits] = Field(
        default_factory=dict, description="Limits of named tenants, by tenant name."
    )

    def of(self, tenant: str) -> TenantLimits:
        """The limits that hold for ``tenant``: its override's keys over these."""
        override = self.overrides.get(tenant)
        mine = TenantLimits(**{k: getattr(self, k) for k in TenantLimits.model_fields})
        if override is None:
            return mine
        given = {k: v for k, v in override if v is not None}
        return mine.model_copy(update=given)


class Config(Strict):
    server: Server = Field(default_factory=Server)
    sources: list[Source] = Field(min_length=1)
    filters: list[Filter] = Field(
        default_factory=list, description="Run in order on the events their match takes."
    )
    routes: list[Route] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits, description="Per-tenant limits.")

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        names = set(self.destinations)
        for i, route in enumerate(self.routes):
            if route.destination not in names:
                raise ValueError(
                    f"routes.{i}.destination: unknown destination {route.destination!r} "
                    f"(defined: {', '.join(sorted(names))})"
                )
        for name, dest in self.destinations.items():
            if dest.secondary is None:
                continue
            if dest.secondary not in names:
                raise ValueError(
                    f"destinations.{name}.secondary: unknown destination {dest.secondary!r}"
                )
            if dest.secondary == name:
                raise ValueError(f"destinations.{name}.secondary: cannot be itself")
            if self.destinations[dest.secondary].secondary is not None:
                raise ValueError(
                    f"destinations.{name}.secondary: {dest.secondary!r} has a secondary of its "
                    "own; chains are not supported"
                )
        paths: dict[str, str] = {}
        for name, dest in self.destinations.items():
            path = dest.buffer.path
            if path is None or dest.buffer.type != "file":
                continue
            key = os.path.normpath(os.path.abspath(path))
            if key in paths:
                raise ValueError(
                    f"destinations.{name}.buffer.path: {path!r} is also "
                    f"destinations.{paths[key]}'s: each file buffer needs its own directory"
                )
            paths[key] = name
        labels = {route.label for route in self.routes}
        for i, src in enumerate(self.sources):
            if src.label is not None and src.label not in labels:
                raise ValueError(f"sources.{i}.label: no route has label {src.label!r}")
        seen: set[tuple[str, int]] = set()
        for src in self.sources:
            if src.port and (src.bind, src.port) in seen:
                raise ValueError(f"sources: two sources listen on {src.bind}:{src.port}")
            seen.add((src.bind, src.port))
        return self
