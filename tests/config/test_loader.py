"""Config loading: env expansion, defaults, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.cli import main
from aggregator.config import ConfigError, load, loads
from aggregator.config.model import FileDestination, FirehoseDestination

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[[sources]]
type = "forward"

[[routes]]
match = "**"
destination = "out"

[destinations.out]
type = "null"
"""


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, env or {})
    return str(info.value)


def test_shipped_configs_are_valid() -> None:
    default = load(ROOT / "conf" / "aggregator.toml", env={})
    assert [s.port for s in default.sources] == [24224, 8888]
    local = default.destinations["local"]
    assert isinstance(local, FileDestination)
    assert local.path == "./data"
    assert local.inject.tag_key == "tag"
    fargate = load(ROOT / "conf" / "fargate.toml", env={})
    search, archive = fargate.destinations["search"], fargate.destinations["archive"]
    assert isinstance(search, FirehoseDestination) and isinstance(archive, FirehoseDestination)
    assert not search.aggregate and archive.aggregate
    assert search.endpoint_url is None  # "${FIREHOSE_ENDPOINT:-}" means the AWS default
    assert fargate.sources[1].control_token is None  # type: ignore[union-attr]
    assert search.buffer.total_limit_size == 256 * 1024**2
    assert search.buffer.flush_thread_count == 15
    assert [r.match for r in fargate.routes] == ["frontend*", "backend*", "health*"]
    env = {"SEARCH_MATCH": "web.** api.*", "SEARCH_STREAM": "logs", "BUFFER_TOTAL_LIMIT": "64MiB",
           "FLUSH_THREAD_COUNT": "4", "STOP_TIMEOUT": "120", "HANDOFF_ADDRESS": "nlb:24224"}
    fargate = load(ROOT / "conf" / "fargate.toml", env=env)
    search = fargate.destinations["search"]
    assert isinstance(search, FirehoseDestination) and search.delivery_stream == "logs"
    assert fargate.routes[0].match == "web.** api.*"
    assert search.buffer.total_limit_size == 64 * 1024**2
    assert search.buffer.flush_thread_count == 4
    assert (fargate.server.stop_timeout, fargate.server.handoff) == (120.0, "nlb:24224")


def test_defaults() -> None:
    config = loads(MINIMAL, {})
    forward = config.sources[0]
    assert (forward.bind, forward.port) == ("0.0.0.0", 24224)
    assert config.server.stop_timeout == 30.0
    assert config.server.handoff is None
    firehose = FirehoseDestination.model_validate({"type": "firehose", "delivery_stream": "s"})
    assert firehose.request_timeout == 60.0  # botocore's: a slow Firehose must not duplicate
    assert config.destinations["out"].buffer.overflow_action == "block"


def test_env_expansion() -> None:
    text = MINIMAL.replace('type = "forward"', 'type = "forward"\nport = "${PORT}"').replace(
        'type = "null"', 'type = "file"\npath = "${DIR:-/tmp/x}"\nprefix = "$${literal}"'
    )
    config = loads(text, {"PORT": "25000"})
    assert config.sources[0].port == 25000
    out = config.destinations["out"]
    assert isinstance(out, FileDestination)
    assert out.path == "/tmp/x"
    assert out.prefix == "${literal}"
    assert loads(text, {"PORT": "1", "DIR": "/data"}).destinations["out"].path == "/data"  # type: ignore[union-attr]


def test_unset_variable_is_an_error() -> None:
    text = MINIMAL.replace('type = "forward"', 'type = "forward"\nbind = "${BIND_ADDR}"')
    assert "sources.0.bind: environment variable BIND_ADDR is not set" in error_of(text)


def test_unknown_key_names_its_path() -> None:
    text = MINIMAL.replace(
        'type = "null"', 'type = "null"\n[destinations.out.buffer]\nflush_intreval = "1s"'
    )
    assert error_of(text) == "destinations.out.buffer.flush_intreval: unknown key"


def test_bad_duration_names_its_path() -> None:
    text = MINIMAL.replace('type = "null"', 'type = "null"\nbuffer = { flush_interval = "1x" }')
    assert error_of(text).startswith(
        "destinations.out.buffer.flush_interval: invalid duration '1x'"
    )


def test_missing_required_key() -> None:
    text = MINIMAL.replace('type = "null"', 'type = "firehose"')
    assert error_of(text) == "destinations.out.delivery_stream: required key is missing"


def test_unknown_destination_type() -> None:
    assert "destinations.out" in error_of(MINIMAL.replace('type = "null"', 'type = "kafka"'))


def test_route_to_unknown_destination() -> None:
    message = error_of(MINIMAL.replace('destination = "out"', 'destination = "nowhere"'))
    assert "routes.0.destination: unknown destination 'nowhere'" in message


def test_bad_pattern() -> None:
    assert "routes.0" in error_of(MINIMAL.replace('match = "**"', 'match = "a.{b"'))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('type = "grep"\nregexp = [{ key = "a", pattern = \'/\\p{Alpha}/\' }]',
         "filters.0.regexp.0.pattern: regexp /\\p{Alpha}/: \\p{...} has no Python equivalent"),
        ('type = "parser"\nkey_name = "log"\nparse = { type = "regexp", expression = "/(a/" }',
         "filters.0.parse.expression: regexp /(a/: missing )"),
        ('type = "parser"\nkey_name = "log"\nparse = { type = "regexp", expression = "/a/" }',
         "at least one named group"),
        ('type = "concat"\nkey = "log"\nmultiline_start_regexp = "/[[:nope:]]/"',
         "[:nope:] is not supported"),
    ],
)  # fmt: skip
def test_a_filter_regexp_that_cannot_run_is_a_config_error(table: str, expected: str) -> None:
    text = MINIMAL + f'\n[[filters]]\nmatch = "**"\n{table}\n'
    assert expected in error_of(text)


def test_secondary_must_exist_and_not_chain() -> None:
    text = MINIMAL.replace('type = "null"', 'type = "null"\nsecondary = "ghost"')
    assert "destinations.out.secondary: unknown destination 'ghost'" in error_of(text)


def test_invalid_toml() -> None:
    assert "invalid TOML" in error_of("[[sources]\n")


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["check", "-c", str(good)]) == 0
    assert "'**'" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "\n[server]\nstop_timeout = 0\n")
    assert main(["check", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "server.stop_timeout" in err
    assert main(["check", "-c", str(tmp_path / "missing.toml")]) == 2


def test_check_shows_what_each_source_asks_of_its_clients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text(MINIMAL + '\n[[sources]]\ntype = "http"\n')
    assert main(["check", "-c", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "(no tls; no handshake)" in out and "no control token" in out
    locked = tmp_path / "locked.toml"
    security = ('security = { self_hostname = "agg", shared_key = "k", user_auth = true, '
                'users = [{ username = "u", password = "p" }] }')
    locked.write_text(MINIMAL.replace('type = "forward"', f'''type = "forward"
{security}
tls = {{ cert_path = "c.pem", private_key_path = "k.pem" }}''') + '''
[[sources]]
type = "http"
control_token = "t"
''')
    assert main(["check", "-c", str(locked)]) == 0
    out = capsys.readouterr().out
    assert "(tls; handshake: shared key, users)" in out and "(control token)" in out


def test_security_and_tls_settings_that_cannot_work_are_refused() -> None:
    assert "user_auth needs users" in error_of(MINIMAL.replace(
        'type = "forward"', 'type = "forward"\nsecurity = { self_hostname = "a", '
        'shared_key = "k", user_auth = true }'))  # fmt: skip
    assert "cert_path and private_key_path" in error_of(MINIMAL.replace(
        'type = "forward"', 'type = "forward"\ntls = { cert_path = "c.pem" }'))  # fmt: skip
    assert "exactly one of host and network" in error_of(MINIMAL.replace(
        'type = "forward"', 'type = "forward"\nsecurity = { self_hostname = "a", '
        'shared_key = "k", clients = [{}] }'))  # fmt: skip


def test_a_key_of_an_earlier_version_is_read_as_its_replacement_with_a_warning() -> None:
    warnings: list[str] = []
    config = loads(MINIMAL + '\n[server]\nshutdown_timeout = "100s"\n', {}, warnings=warnings)
    assert config.server.stop_timeout == 100
    assert warnings and warnings[0].startswith("server.shutdown_timeout is now stop_timeout")
    both = error_of(MINIMAL + '\n[server]\nshutdown_timeout = "100s"\nstop_timeout = "5s"\n')
    assert "server.shutdown_timeout: renamed stop_timeout, which is set too" in both


def test_limits_read_with_their_units_and_overrides() -> None:
    config = loads(MINIMAL + """
[limits]
instances = "${TASKS:-4}"
rate = "2MiB/s"
buffer_share = 0.25
tenant_from = { regex = '^k8s\\.(?P<tenant>[^.]+)' }

[limits.overrides.payments]
rate = "10MiB/s"
max_event_size = "256KiB"
""", {})  # fmt: skip
    limits = config.limits
    assert (limits.instances, limits.rate, limits.buffer_share) == (4, 2 * 2**20, 0.25)
    assert limits.tenant_from.regex is not None and limits.tenant_from.part is None
    payments = limits.of("payments")
    assert (payments.rate, payments.buffer_share, payments.max_event_size) == (
        10 * 2**20, 0.25, 256 * 1024)  # fmt: skip
    assert limits.of("search").rate == 2 * 2**20
    assert loads(MINIMAL, {}).limits.rate is None  # off unless asked


def test_limits_that_cannot_work_are_refused_with_their_path() -> None:
    assert "limits.buffer_share" in error_of(MINIMAL + "\n[limits]\nbuffer_share = 1.5\n")
    assert "limits.rate: invalid rate" in error_of(MINIMAL + '\n[limits]\nrate = "fast"\n')
    assert "limits.tenant_from" in error_of(
        MINIMAL + "\n[limits]\ntenant_from = { regex = '(unclosed' }\n"
    )
    assert "limits.overrides.x.burst" in error_of(
        MINIMAL + '\n[limits.overrides.x]\nburst = "-1"\n'
    )
