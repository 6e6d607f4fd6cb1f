"""``python -m benchmarks run ...`` measures; ``python -m benchmarks size ...`` sizes a fleet;
``python -m benchmarks connections ...`` measures what open connections cost;
``python -m benchmarks redeploy ...`` counts what rolling restarts lose."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from aggregator.config.units import parse_size
from benchmarks import abuse, backlog, connections, floor, plot, redeploy, report, sizing
from benchmarks.config import BUFFERS, FILTERS, SUBJECTS, RunConfig
from benchmarks.floor import LEVELS as FLOOR_LEVELS
from benchmarks.runner import run_benchmark
from benchmarks.templates import MODES
from emulator.__main__ import add_fault_arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_event_size(group: argparse._ActionsContainer, default: int) -> None:
    group.add_argument(
        "--event-size",
        type=int,
        default=default,
        help="bytes of each event's JSON line (%(default)s)",
    )


def _against(text: str) -> dict[str, Any]:
    """``SETTING=VALUE`` of --against, as RunConfig fields."""
    key, _, value = text.partition("=")
    if key == "buffer" and value in BUFFERS:
        return {"buffer": value}
    if key == "limits" and value in ("on", "off"):
        return {"limits": value == "on"}
    if key == "filters":
        return {"filters": _filters(value)}
    if key == "trickle_read_delay" and value:
        return {"trickle_read_delay": value}
    if key == "source" and value:
        if not (Path(value) / "aggregator" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"{value} holds no aggregator package")
        return {"source": Path(value).resolve()}
    raise argparse.ArgumentTypeError(
        "use buffer=memory|file, limits=on|off, filters=none|KIND,..., trickle_read_delay=DURATION "
        "or source=DIR"
    )


def _levels(text: str) -> tuple[str, ...]:
    levels = tuple(level for level in text.split(",") if level)
    if not levels or set(levels) - set(FLOOR_LEVELS):
        raise argparse.ArgumentTypeError(f"levels are among {', '.join(FLOOR_LEVELS)}")
    return levels


def _filters(text: str) -> tuple[str, ...]:
    """``none``, or filter kinds separated by commas."""
    kinds = () if text == "none" else tuple(text.split(","))
    for kind in kinds:
        if kind not in FILTERS:
            raise argparse.ArgumentTypeError(f"filters are {', '.join(FILTERS)} (or none)")
    return kinds


def _add_load_and_service(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """The load and the aggregator's settings: of `run`, and of `floor`."""
    load = parser.add_argument_group("load")
    load.add_argument("--mode", choices=MODES, default=defaults.mode)
    load.add_argument(
        "--batch",
        type=_positive_int,
        default=defaults.batch,
        help="events per message in forward and packed modes (%(default)s)",
    )
    _add_event_size(load, defaults.event_size)
    load.add_argument("--connections", type=_positive_int, default=defaults.connections)
    load.add_argument(
        "--senders",
        type=int,
        default=defaults.senders,
        help="load generator processes (0: one per core left by the workers)",
    )
    load.add_argument("--ack", action="store_true", help="ask for an ack of every message")
    load.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="events/s in total; 0: as fast as the aggregator takes them",
    )
    load.add_argument("--duration", type=float, default=defaults.duration, help="seconds")
    load.add_argument(
        "--fleet", action="store_true",
        help="an ECS cluster's shape: every message in its own write(), as Docker's driver "
        "sends; use with e.g. --connections 500 --rate 100000 (200 lines/s each)",
    )  # fmt: skip
    service = parser.add_argument_group("aggregator")
    service.add_argument("--workers", type=_positive_int, default=defaults.workers)
    service.add_argument(
        "--aggregate", action="store_true", help="pack many events per Firehose record"
    )
    service.add_argument("--flush-interval", default=defaults.flush_interval)
    service.add_argument("--chunk-limit", default=defaults.chunk_limit)
    service.add_argument("--total-limit", default=defaults.total_limit)
    service.add_argument("--flush-threads", type=_positive_int, default=defaults.flush_threads)
    service.add_argument(
        "--buffer", choices=BUFFERS, default=defaults.buffer,
        help="the destination's buffer type (%(default)s); file: in the run's temporary "
        "directory",
    )  # fmt: skip
    service.add_argument(
        "--limits", action="store_true",
        help="[limits] on, never limiting: every tenant's rate, burst and buffer share counted",
    )  # fmt: skip
    service.add_argument(
        "--trickle-read-delay", default=defaults.trickle_read_delay, metavar="DURATION",
        help="the forward input's trickle_read_delay (%(default)s; 0s: every write read at once)",
    )  # fmt: skip
    service.add_argument(
        "--filters", type=_filters, default=(), metavar="KIND,...",
        help=f"filters every event goes through, each keeping it: {', '.join(FILTERS)}",
    )  # fmt: skip


def _add_peer_bin(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--peer-bin", type=Path, metavar="PATH",
        help="Fluent Bit's executable (default: ../shared/peers/fluent-bit)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmarks of the aggregator."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = RunConfig()

    run = commands.add_parser(
        "run",
        help="run the aggregator under load and report",
        description="Start the sink, the aggregator and the load generator; measure; check "
        "that every event arrived (exit status 1 when not).",
    )
    _add_load_and_service(run, defaults)
    faults = run.add_argument_group("sink")
    faults.add_argument(
        "--stall-at",
        type=float,
        metavar="S",
        help="stall the sink S seconds into the load (with --stall-for)",
    )
    faults.add_argument("--stall-for", type=float, metavar="S")
    add_fault_arguments(faults, latency="--sink-latency")
    faults.add_argument(
        "--sample-every",
        type=_positive_int,
        default=defaults.sample_every,
        help="latency: read the send time of 1 event in K",
    )
    peers = run.add_argument_group("a peer under the same load")
    peers.add_argument(
        "--peer", choices=SUBJECTS[1:],
        help="after the aggregator, run this peer with the same load and sink; print both "
        "and their ratios",
    )  # fmt: skip
    _add_peer_bin(peers)
    peers.add_argument(
        "--against", metavar="SETTING=VALUE", type=_against, action="append",
        help="instead of a peer, the aggregator with a setting changed (repeat for several): "
        "buffer=memory|file, limits=on|off, filters=none|KIND,..., trickle_read_delay=DURATION "
        "or source=DIR (another "
        "checkout's aggregator: a before/after) (e.g. --buffer file --against buffer=memory: "
        "what the file buffer costs)",
    )  # fmt: skip
    peers.add_argument(
        "--pairs", type=_positive_int, default=1, metavar="N",
        help="measure both N times, taking turns to go first, and print the median ratio (a "
        "shared machine's speed drifts: one pair's ratio can be off by a fifth)",
    )  # fmt: skip
    output = run.add_argument_group("output")
    output.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="result file (default: benchmarks/results/<time>-<mode>.json)",
    )
    output.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the workers; writes <result>.profile.txt (slows the aggregator)",
    )
    output.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="longest wait for the last events (default: flush interval + 30)",
    )

    floor = commands.add_parser(
        "floor",
        help="the least Python on uvloop spends reading every write at once, beside Fluent "
        "Bit's and ours",
        description="Under the same load: Fluent Bit, the aggregator, and servers that read "
        "every write at once and do less with it than any forward server can (read only; and "
        "decode and ack; and one JSON encoding per message). Prints CPU-s per million events "
        "and ratios to Fluent Bit's. Exit status 1 when a run lost events.",
    )
    _add_load_and_service(floor, defaults)
    floor.add_argument(
        "--levels", type=_levels, default=FLOOR_LEVELS, metavar="LEVEL,...",
        help=f"which floors ({','.join(FLOOR_LEVELS)})",
    )  # fmt: skip
    _add_peer_bin(floor)
    floor.add_argument(
        "--pairs", type=_positive_int, default=1, metavar="N",
        help="N rounds, every other one in reverse order; medians",
    )  # fmt: skip

    conns = commands.add_parser(
        "connections",
        help="measure what each open client connection costs a worker in memory",
        description="Open many forward connections to one worker, send a burst on each, and "
        "report the worker's RSS with them left open and idle.",
    )
    conns.add_argument("--connections", type=_positive_int, default=300)
    conns.add_argument(
        "--burst", default="1MiB", help="bytes sent on each connection (%(default)s)"
    )
    _add_event_size(conns, defaults.event_size)

    roll = commands.add_parser(
        "redeploy",
        help="count what rolling restarts lose, per client mode",
        description="Two instances, clients like Docker's fluentd driver (with and without "
        "acks); the instance they use is stopped and started again, N times. Exit status 1 "
        "when anything was lost.",
    )
    roll.add_argument("--stops", type=_positive_int, default=20)
    roll.add_argument("--plain-clients", type=int, default=4, help="clients without acks")
    roll.add_argument("--acked-clients", type=int, default=4, help="clients with acks")
    roll.add_argument(
        "--interval", type=float, default=0.002, help="seconds between a client's messages"
    )
    roll.add_argument(
        "--max-connection-age", metavar="DURATION", help="also close connections at this age"
    )
    roll.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="run the aggregator package of this checkout instead (a before/after)",
    )

    hostile = commands.add_parser(
        "abuse",
        help="hostile input beside honest senders: crashes, memory, losses",
        description="Malformed frames, amplification, slowloris, unread acks and idle "
        "connections at once, with acked honest senders. Exit status 1 when a worker died, an "
        "honest event was lost, or a worker's memory went past its documented bound.",
    )
    hostile.add_argument("--frames", type=_positive_int, default=1_000_000)
    hostile.add_argument("--duration", type=float, default=30.0, help="seconds (%(default)s)")
    hostile.add_argument("--workers", type=_positive_int, default=1)

    disk = commands.add_parser(
        "backlog",
        help="a file buffer's backlog through an outage, a restart and the replay",
        description="One worker with a file buffer takes --events acked events while the sink "
        "refuses every call, holds them through the outage, is stopped, and a new process "
        "replays them. Reports RSS in each phase and the replay's speed; exit status 1 when an "
        "event is missing or RSS passed the documented bound.",
    )
    disk.add_argument("--events", type=_positive_int, default=1_000_000)
    _add_event_size(disk, 400)
    disk.add_argument(
        "--hold", type=float, default=30.0, help="seconds of outage with the backlog on disk"
    )
    disk.add_argument(
        "--dir", type=Path, help="where the buffer goes (default: a temporary directory)"
    )
    disk.add_argument("--json", type=Path, metavar="PATH", help="also write the result here")

    size = commands.add_parser(
        "size",
        help="turn per-core figures into a Fargate task count",
        description="Cores = load ÷ (per-core throughput x 70 %%); at least two tasks.",
    )
    size.add_argument("--mb-per-s", type=float, help="the load to carry, MB/s")
    size.add_argument("--events-per-s", type=float, help="the load to carry, events/s")
    size.add_argument(
        "--results",
        type=Path,
        metavar="FILE.json",
        help="a run's result (default: the newest in benchmarks/results/)",
    )
    size.add_argument("--per-core-mb-s", type=float, help="per-core MB/s, instead of a result")
    size.add_argument(
        "--per-core-events-s", type=float, help="per-core events/s, instead of a result"
    )
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    """The run's settings from the command line (every option is named as its setting)."""
    given = vars(args)
    names = {field.name for field in dataclasses.fields(RunConfig)}
    settings = {name: value for name, value in given.items() if name in names}
    if "json" in given:
        settings["json_path"] = given["json"]
    return RunConfig(**settings)


def _side_by_side(config: RunConfig, other: RunConfig, pairs: int) -> int:
    """Both configurations under the same load, ``pairs`` times, in the order ABBA... so that a
    drift of the machine's speed weighs on both alike; each pair printed, then the median
    ratio."""
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    status = 0
    peer = other.subject if other.subject != "aggregator" else report.label(other.to_json())
    for n in range(pairs):
        ours_config, path = config, config.json_path
        if path is not None and pairs > 1:  # one result file per pair
            numbered = path.with_stem(f"{path.stem}-{n + 1}")
            ours_config = dataclasses.replace(config, json_path=numbered)
        peer_config = other
        if n % 2:
            theirs, ours = run_benchmark(peer_config), run_benchmark(ours_config)
        else:
            ours, theirs = run_benchmark(ours_config), run_benchmark(peer_config)
        ours_json, theirs_json = ours.to_json(), theirs.to_json()
        print(report.comparison(ours_json, theirs_json))
        if ours.json_path is not None:
            picture = ours.json_path.with_name(ours.json_path.stem + f"-vs-{peer}.png")
            if plot.comparison_png(ours_json, theirs_json, picture):
                print(f"picture: {picture}")
        results.append((ours_json, theirs_json))
        status = max(status, ours.exit_status, theirs.exit_status)
    if pairs > 1:
        print(report.pairs_summary(results))
    return status


def _sizing_text(args: argparse.Namespace) -> str:
    if args.per_core_mb_s is not None or args.per_core_events_s is not None:
        per_core = sizing.PerCore(args.per_core_mb_s, args.per_core_events_s, "given")
    else:
        path = args.results or sizing.newest_result()
        per_core = sizing.per_core_from_result(sizing.load_result(path), str(path))
    return sizing.render(per_core, args.mb_per_s, args.events_per_s)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "size":
            print(_sizing_text(args))
            return 0
        if args.command == "connections":
            burst = connections.make_burst(parse_size(args.burst), args.event_size)
        elif args.command == "floor":
            config = _config(args)
            if config.workers != 1:
                raise ValueError("the floor servers are one process: compare with --workers 1")
        elif args.command == "run":
            config = _config(args)
            other = None
            if args.peer is not None and args.against is not None:
                raise ValueError("--peer or --against: one thing to compare with")
            if args.peer is not None:
                other = dataclasses.replace(config, subject=args.peer, buffer="memory",
                                            json_path=None)  # fmt: skip
            elif args.against is not None:
                changes = {k: v for change in args.against for k, v in change.items()}
                other = dataclasses.replace(config, **changes, json_path=None)
            if args.pairs > 1 and other is None:
                raise ValueError("--pairs compares with a peer: give --peer too")
    except (ValueError, OSError) as exc:  # bad settings, or a results file that is not there
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    try:
        if args.command == "connections":
            print(connections.measure(args.connections, burst).render())
            return 0
        if args.command == "floor":
            return floor.run(config, args.levels, args.pairs)
        if args.command == "backlog":
            replayed = backlog.run(args.events, args.event_size, args.hold, args.dir, args.json)
            print(replayed.render())
            return replayed.exit_status
        if args.command == "abuse":
            outcome = abuse.run(args.frames, args.duration, args.workers)
            print(outcome.render())
            return outcome.exit_status
        if args.command == "redeploy":
            result = redeploy.measure(
                args.stops, args.plain_clients, args.acked_clients, args.interval,
                args.source, args.max_connection_age,
            )  # fmt: skip
            print(result.render())
            return result.exit_status
        if other is None:
            return run_benchmark(config).exit_status
        return _side_by_side(config, other, args.pairs)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError) as exc:  # a part did not start, or the machine refused
        print(f"{parser.prog} {args.command}: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
