"""Command line: ``aggregator run``, ``check``, ``health``, ``top`` and ``convert``."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from aggregator import __version__, logs, process
from aggregator.config import Config, ConfigError, fluentd, parse, read, writer
from aggregator.config.model import (
    FileDestination,
    FirehoseDestination,
    ForwardDestination,
    ForwardSource,
    HttpSource,
    Source,
)
from aggregator.process import EXIT_CONFIG, EXIT_OK

DEFAULT_CONFIG = "conf/aggregator.toml"
CONFIG_ENV = "AGGREGATOR_CONFIG"
"""Names the config file when ``-c`` is not given (the container image sets it)."""
HEALTH_TIMEOUT = 3.0
TOP_INTERVAL = 1.0
TOKEN_ENV = "CONTROL_TOKEN"
"""The control token ``top`` sends, as the shipped conf/fargate.toml reads it."""


def _guards(src: Source) -> str:
    """What a source asks of its clients, so that a locked-down config can be seen to be."""
    if isinstance(src, ForwardSource):
        guards = ["tls" + (" + client certificates" if src.tls.client_cert_auth else "")
                  if src.tls else "no tls"]  # fmt: skip
        if src.security is not None:
            guards.append(
                "handshake: shared key"
                + (", users" if src.security.user_auth else "")
                + ("" if src.security.allow_anonymous_source else ", listed clients")
            )
        else:
            guards.append("no handshake")
        return "  (" + "; ".join(guards) + ")"
    token = "control token" if src.control_token else "no control token: flush from this host only"
    return f"  ({token})"


def describe(config: Config) -> str:
    """The routing table and destinations, as ``check`` prints them."""
    lines = ["sources:"]
    for src in config.sources:
        routes = f"  -> routes of {src.label}" if src.label else ""
        lines.append(f"  {src.name:<12} {src.type:<8} {src.bind}:{src.port}{_guards(src)}{routes}")
    if config.filters:
        lines.append("filters (in order, before the routes):")
        for i, f in enumerate(config.filters, 1):
            label = f"  (label {f.label})" if f.label else ""
            lines.append(f"  {i:>2}. {f.match!r:<32} {f.type}{label}")
    lines.append("routes (first match wins):")
    for i, route in enumerate(config.routes, 1):
        label = f"  (label {route.label})" if route.label else ""
        lines.append(f"  {i:>2}. {route.match!r:<32} -> {route.destination}{label}")
    if not config.routes:
        lines.append("  (none: every event is counted as unmatched)")
    lines.append("destinations:")
    for name, dest in config.destinations.items():
        detail = ""
        if isinstance(dest, FirehoseDestination):
            packing = "many events per record" if dest.aggregate else "one event per record"
            region = dest.region or "default region"
            endpoint = f", endpoint {dest.endpoint_url}" if dest.endpoint_url else ""
            detail = f"stream {dest.delivery_stream!r} ({region}{endpoint}), {packing}"
            detail += f", only field {dest.data_key!r}" if dest.data_key else ""
            detail += f", {dest.compression} per record" if dest.compression else ""
            detail += f", as role {dest.assume_role.role_arn}" if dest.assume_role else ""
        elif isinstance(dest, FileDestination):
            detail = f"directory {dest.path!r}"
        elif isinstance(dest, ForwardDestination):
            servers = ", ".join(f"{s.host}:{s.port}" + (" (standby)" if s.standby else "")
                                for s in dest.servers)  # fmt: skip
            guards = [("tls" if dest.tls else "no tls"),
                      ("handshake" if dest.security else "no handshake"),
                      ("acks" if dest.require_ack_response else "no acks")]  # fmt: skip
            detail = f"servers {servers} ({'; '.join(guards)})"
        b = dest.buffer
        lines.append(f"  {name:<12} {dest.type:<9} {detail}".rstrip())
        where = f"file in {b.path!r}, fsync {b.fsync}" if b.type == "file" else "memory"
        lines.append(
            f"  {'':<12} buffer ({where}): chunk {b.chunk_limit_size} B / "
            f"{b.chunk_limit_records} events / {b.flush_interval:g} s, total "
            f"{b.total_limit_size} B, {b.flush_thread_count} concurrent flushes, on overflow "
            f"{b.overflow_action}"
        )
        if dest.secondary:
            lines.append(f"  {'':<12} secondary: {dest.secondary}")
    return "\n".join(lines)


def _load(path: str) -> Config | None:
    try:
        config, warnings = read(path)
    except ConfigError as exc:
        print(f"aggregator: configuration error in {path}:\n{exc}", file=sys.stderr)
        return None
    for warning in warnings:
        print(f"aggregator: warning: {warning}", file=sys.stderr)
    return config


def convert(path: str) -> int:
    """``aggregator convert fluent.conf``: the equivalent TOML on standard output, warnings
    about what was left out on standard error; exit 2 if it cannot be converted or used."""
    try:
        data, warnings = fluentd.convert_file(path)
        parse(data)  # the same validation as run and check
    except ConfigError as exc:
        print(f"aggregator: cannot convert {path}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        print(f"aggregator: warning: {warning}", file=sys.stderr)
    print(f"# Converted from {path} by aggregator convert {__version__}.")
    print(writer.to_toml(data), end="")
    return EXIT_OK


def _http_source(config: Config) -> HttpSource | None:
    """The source the control plane is mounted on: the first HTTP one."""
    return next((src for src in config.sources if isinstance(src, HttpSource)), None)


def control_url(config: Config, path: str) -> str | None:
    """Where this host's control plane answers ``path``: the first HTTP source, on loopback
    when it listens on every address."""
    src = _http_source(config)
    if src is None:
        return None
    host = "127.0.0.1" if src.bind in ("0.0.0.0", "") else src.bind
    host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    return f"http://{host}:{src.port}{path}"


def control_token(config: Config) -> str | None:
    src = _http_source(config)
    return None if src is None else src.control_token


def metrics_url(url: str) -> str:
    """``--url``: the service's address, or its /metrics URL."""
    url = url if "://" in url else f"http://{url}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def health(url: str, timeout: float) -> int:
    """``aggregator health``: exit 0 when the service answers 200, else 1; for a container
    HEALTHCHECK or an ECS health check, in an image that has no curl."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            print(resp.read().decode(errors="replace").strip())
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read().decode(errors='replace').strip()}")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


def _top(url: str, token: str | None, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("aggregator top: --interval must be above 0", file=sys.stderr)
        return EXIT_CONFIG
    from aggregator import top  # rich, only for this command

    return top.run(url, token, args.interval, args.once)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aggregator", description="Fluentd-compatible log aggregator for Kinesis Firehose."
    )
    parser.add_argument("--version", action="version", version=f"aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    default_config = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    config_help = f"config file, TOML or Fluentd's (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})"
    run = commands.add_parser("run", help="run in the foreground until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", default=default_config, help=config_help)
    run.add_argument(
        "--workers", type=int, help="worker processes (default: [server] workers, or the CPUs)"
    )
    check = commands.add_parser("check", help="validate a config and print its routing table")
    check.add_argument("-c", "--config", default=default_config, help=config_help)
    probe = commands.add_parser("health", help="exit 0 if the service is healthy, else 1")
    probe.add_argument("-c", "--config", default=default_config, help=config_help)
    probe.add_argument("--url", help="the health URL (default: the config's HTTP source)")
    probe.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT, help="seconds")
    top = commands.add_parser("top", help="a live view of a running service, from its /metrics")
    top.add_argument("-c", "--config", default=default_config,
                     help=config_help + "; its HTTP source and control_token say where to ask")
    top.add_argument("--url", help="the service's HTTP port or /metrics URL, e.g. "
                     "http://10.0.3.7:8888 (default: from the config)")
    top.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                     help=f"the control_token (default: ${TOKEN_ENV}, else the config's)")
    top.add_argument("--interval", type=float, default=TOP_INTERVAL,
                     help=f"seconds between two views (default {TOP_INTERVAL:g})")
    top.add_argument("--once", action="store_true",
                     help="print one view (two scrapes --interval apart) and exit, for scripts")
    to_toml = commands.add_parser("convert", help="print a fluent.conf as this service's TOML")
    to_toml.add_argument("fluent_conf", help="Fluentd configuration file")
    args = parser.parse_args(argv)

    if args.command == "convert":
        return convert(args.fluent_conf)
    if args.command == "health" and args.url:
        return health(args.url, args.timeout)
    if args.command == "top" and args.url:
        return _top(metrics_url(args.url), args.token, args)
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG if args.command != "health" else 1
    if args.command == "top":
        url = control_url(config, "/metrics")
        if url is None:
            print("aggregator top: the config has no http source to ask; use --url",
                  file=sys.stderr)  # fmt: skip
            return 1
        return _top(url, args.token or control_token(config), args)
    if args.command == "health":
        url = control_url(config, "/api/health")
        if url is None:
            print("unhealthy: the config has no http source to ask", file=sys.stderr)
            return 1
        return health(url, args.timeout)
    if args.command == "check":
        print(describe(config))
        return EXIT_OK

    if args.workers is not None and args.workers < 1:
        print("aggregator: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.server.log_level, worker="supervisor")
    process.prepare_metrics_dir()  # before prometheus-client is imported, below
    from aggregator import supervisor

    return supervisor.run(args.config, config, args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
