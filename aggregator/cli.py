"""Command line: ``aggregator run``, ``aggregator check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aggregator import __version__, logs, process
from aggregator.config import Config, ConfigError, load
from aggregator.config.model import FileDestination, FirehoseDestination, ForwardSource, Source
from aggregator.process import EXIT_CONFIG, EXIT_OK

DEFAULT_CONFIG = "conf/aggregator.toml"


def _guards(src: Source) -> str:
    """What a source asks of its clients, so that a locked-down config can be seen to be."""
    if isinstance(src, ForwardSource):
        guards = ["tls" + (" + client certificates" if src.tls.client_cert_auth else "")
                  if src.tls else "no tls"]  # fmt: skip
        if src.security is not None:
            guards.append("handshake: shared key" + (", users" if src.security.user_auth else "")
                          + ("" if src.security.allow_anonymous_source else ", listed clients"))
        else:
            guards.append("no handshake")
        return "  (" + "; ".join(guards) + ")"
    token = "control token" if src.control_token else "no control token: flush from this host only"
    return f"  ({token})"


def describe(config: Config) -> str:
    """The routing table and destinations, as ``check`` prints them."""
    lines = ["sources:"]
    for src in config.sources:
        lines.append(f"  {src.name:<12} {src.type:<8} {src.bind}:{src.port}{_guards(src)}")
    lines.append("routes (first match wins):")
    for i, route in enumerate(config.routes, 1):
        lines.append(f"  {i:>2}. {route.match!r:<32} -> {route.destination}")
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
        elif isinstance(dest, FileDestination):
            detail = f"directory {dest.path!r}"
        b = dest.buffer
        lines.append(f"  {name:<12} {dest.type:<9} {detail}".rstrip())
        lines.append(
            f"  {'':<12} buffer: chunk {b.chunk_limit_size} B / {b.chunk_limit_records} events / "
            f"{b.flush_interval:g} s, total {b.total_limit_size} B, "
            f"{b.flush_thread_count} concurrent flushes, on overflow {b.overflow_action}"
        )
        if dest.secondary:
            lines.append(f"  {'':<12} secondary: {dest.secondary}")
    return "\n".join(lines)


def _load(path: str) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"aggregator: configuration error in {path}:\n{exc}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aggregator", description="Fluentd-compatible log aggregator for Kinesis Firehose."
    )
    parser.add_argument("--version", action="version", version=f"aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run in the foreground until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="TOML config file")
    run.add_argument(
        "--workers", type=int, help="worker processes (default: [server] workers, or the CPUs)"
    )
    check = commands.add_parser("check", help="validate a config and print its routing table")
    check.add_argument("-c", "--config", required=True, help="TOML config file")
    args = parser.parse_args(argv)

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
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
