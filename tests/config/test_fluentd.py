"""fluent.conf read and converted: syntax, each mapping, and what is refused or dropped."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli import main
from aggregator.config import ConfigError, loads, parse, read
from aggregator.config.fluentd import convert_file, fluent_size, fluent_time
from aggregator.config.model import (
    Concat,
    FileDestination,
    FirehoseDestination,
    ForwardDestination,
    ForwardSource,
)
from aggregator.config.writer import to_toml

BLOG = Path(__file__).parent / "fluentd" / "aws-blog.conf"
FORWARD_TIER = Path(__file__).parent / "fluentd" / "forward-tier.conf"


def convert(
    tmp_path: Path, text: str, name: str = "fluent.conf"
) -> tuple[dict[str, Any], list[str]]:
    path = tmp_path / name
    path.write_text(text)
    return convert_file(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        convert(tmp_path, text)
    return str(info.value)


def test_the_aws_blog_config_converts_to_the_same_routing() -> None:
    config, warnings = read(BLOG, env={})
    assert config.server.workers == 4
    forward, http = config.sources
    assert isinstance(forward, ForwardSource) and forward.port == 24224
    assert (forward.name, forward.label, http.port, http.label) == ("input1", "@mainstream",
                                                                    8888, None)  # fmt: skip
    assert [(r.match, r.destination, r.label) for r in config.routes] == [
        ("health*", "null_1", None),
        ("frontend*", "output_kinesis_frontend", "@mainstream"),
        ("backend*", "output_kinesis_backend", "@mainstream"),
    ]
    front = config.destinations["output_kinesis_frontend"]
    assert isinstance(front, FirehoseDestination)
    assert (front.delivery_stream, front.region, front.aggregate) == (
        "elasticsearch-delivery-stream", "us-west-2", False)  # fmt: skip
    assert front.buffer.flush_interval == 1.0
    assert front.buffer.chunk_limit_size == 1024**2
    assert front.buffer.total_limit_size == 2 * 1024**3
    assert front.buffer.flush_thread_count == 15
    assert front.buffer.retry_timeout == 72 * 3600  # Fluentd's default, not ours
    # what was dropped is said, with file and line
    assert f"{BLOG}:26: <buffer>: flush_thread_interval ignored" in warnings[0]
    assert any("overflow_action" in w and "throw_exception" in w for w in warnings)


def test_convert_prints_toml_that_loads_to_the_same_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["convert", str(BLOG)]) == 0
    out, err = capsys.readouterr()
    assert "[[routes]]" in out and 'label = "@mainstream"' in out
    assert "warning:" in err and "flush_thread_interval" in err
    assert loads(out, env={}) == read(BLOG, env={})[0]


def test_check_and_run_take_a_fluent_conf(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(BLOG)]) == 0
    out, _ = capsys.readouterr()
    assert "-> routes of @mainstream" in out and "(label @mainstream)" in out


def test_syntax_quotes_comments_env_and_multiline_arrays(tmp_path: Path) -> None:
    data, _ = convert(
        tmp_path,
        """
# a comment
<source>
  @type http   # trailing comment
  port "#{ENV['HTTP_PORT']}"
  bind '0.0.0.0'
  cors_allow_origins ["http://a.example",
                      "http://b.example"]
</source>
<match app.** "quoted">  # patterns as written
  @type kinesis_firehose
  delivery_stream_name "#{ENV.fetch('STREAM', 'logs')}"
  region "#{ENV.fetch('REGION')}"
  endpoint "http://h:1/#not-a-comment"
</match>
""",
    )
    http = data["sources"][0]
    assert http["port"] == "${HTTP_PORT:-}"
    assert http["cors_allow_origins"] == ["http://a.example", "http://b.example"]
    dest = data["destinations"]["kinesis_firehose_1"]
    assert dest["delivery_stream"] == "${STREAM:-logs}" and dest["region"] == "${REGION}"
    assert dest["endpoint_url"] == "http://h:1/#not-a-comment"
    config = parse(data, env={"HTTP_PORT": "9000", "REGION": "eu-west-1"})
    assert config.sources[0].port == 9000
    firehose = config.destinations["kinesis_firehose_1"]
    assert isinstance(firehose, FirehoseDestination)
    assert (firehose.delivery_stream, firehose.region) == ("logs", "eu-west-1")
    with pytest.raises(ConfigError, match="REGION is not set"):
        parse(data, env={})  # ENV.fetch without a default fails in Ruby too


def test_a_literal_dollar_brace_stays_literal(tmp_path: Path) -> None:
    data, _ = convert(
        tmp_path,
        """
<source>
  @type forward
  <security>
    self_hostname agg
    shared_key ab${cd}
  </security>
</source>
<match **>
  @type null
</match>
""",
    )
    config = parse(data, env={})
    assert config.sources[0].security.shared_key == "ab${cd}"  # type: ignore[union-attr]


def test_include_reads_relative_files_and_globs(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("<source>\n  @type forward\n</source>\n")
    (tmp_path / "conf.d" / "b.conf").write_text("<match **>\n  @type stdout\n</match>\n")
    data, warnings = convert(tmp_path, "@include conf.d/*.conf\n")
    assert [s["type"] for s in data["sources"]] == ["forward"]
    assert data["destinations"]["stdout_1"]["type"] == "stdout"
    assert any("b.conf:1" in w and "stdout" in w for w in warnings)
    assert "no such file" in error(tmp_path, "@include missing.conf\n")


def test_security_tls_and_users_map_to_our_keys(tmp_path: Path) -> None:
    data, _ = convert(
        tmp_path,
        """
<source>
  @type forward
  <transport tls>
    cert_path /etc/tls/cert.pem
    private_key_path /etc/tls/key.pem
    min_version TLSv1_2
  </transport>
  <security>
    self_hostname aggregator
    shared_key "#{ENV['SHARED_KEY']}"
    user_auth true
    allow_anonymous_source false
    <user>
      username alice
      password "#{ENV['ALICE_PASSWORD']}"
    </user>
    <client>
      network 10.0.0.0/8
      users alice
    </client>
  </security>
</source>
<match **>
  @type null
</match>
""",
    )
    source = data["sources"][0]
    assert source["tls"] == {
        "cert_path": "/etc/tls/cert.pem",
        "private_key_path": "/etc/tls/key.pem",
        "min_version": "TLSv1.2",
    }
    security = source["security"]
    assert security["users"] == [{"username": "alice", "password": "${ALICE_PASSWORD:-}"}]
    assert security["clients"] == [{"network": "10.0.0.0/8", "users": ["alice"]}]
    config = parse(data, env={"SHARED_KEY": "k", "ALICE_PASSWORD": "p"})
    forward = config.sources[0]
    assert isinstance(forward, ForwardSource) and forward.security is not None
    assert forward.security.user_auth and not forward.security.allow_anonymous_source


def test_secondary_inject_and_file_outputs(tmp_path: Path) -> None:
    data, warnings = convert(
        tmp_path,
        """
<source>
  @type forward
</source>
<match app.**>
  @type kinesis_firehose
  @id app
  delivery_stream_name app-stream
  append_new_line true
  <inject>
    tag_key tag
    time_key time
    time_type string
    time_format %Y-%m-%dT%H:%M:%S.%LZ
  </inject>
  <format>
    @type json
  </format>
  <buffer tag>
    overflow_action drop_oldest_chunk
    retry_max_times 5
  </buffer>
  <secondary>
    @type secondary_file
    directory /var/log/fluent/failed
  </secondary>
</match>
<match debug.**>
  @type file
  path /var/log/fluent/debug
</match>
""",
    )
    config = parse(data, env={})
    app = config.destinations["app"]
    assert isinstance(app, FirehoseDestination)
    assert (app.inject.tag_key, app.inject.time_key, app.inject.time_format) == (
        "tag", "time", "iso8601")  # fmt: skip
    assert app.buffer.overflow_action == "drop_oldest_chunk" and app.buffer.retry_max_times == 5
    assert app.secondary == "app_secondary"
    failed = config.destinations["app_secondary"]
    assert isinstance(failed, FileDestination) and failed.path == "/var/log/fluent"
    debug = config.destinations["file_1"]
    assert isinstance(debug, FileDestination)
    assert (debug.path, debug.prefix) == ("/var/log/fluent", "debug")
    assert any("NDJSON" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<filter **>\n  @type geoip\n</filter>",
            ":1: <filter> @type geoip is not supported",
        ),
        (
            "<filter **>\n  @type record_transformer\n  enable_ruby true\n</filter>",
            ":3: record_transformer enable_ruby true is not supported",
        ),
        ("<source>\n  @type tail\n</source>", ":1: <source> @type tail is not supported"),
        ("<match **>\n  @type s3\n</match>", ":1: <match> @type s3 is not supported"),
        (
            "<match **>\n  @type kinesis_firehose\n  delivery_stream_name s\n  aws_key_id AKIA\n"
            "</match>",
            ":4: aws_key_id is not supported: credentials come from",
        ),
        (
            "<match **>\n  @type kinesis_firehose\n  delivery_stream_name s\n"
            "  append_new_line false\n</match>",
            ":4: append_new_line false is not supported",
        ),
        (
            "<match **>\n  @type kinesis_firehose\n  delivery_stream_name s\n"
            "  <shared_credentials>\n  </shared_credentials>\n</match>",
            ":4: <shared_credentials> is not supported",
        ),
        (
            "<source>\n  @type forward\n  add_tag_prefix x\n</source>",
            ":3: <source> forward: add_tag_prefix is not supported",
        ),
        ("<source>\n  @type forward\n", ":1: <source> is never closed"),
        ("<source>\n  @type forward\n</match>", ":3: </match> does not close"),
        ('<source>\n  @type forward\n  port "#{`id`}"\n</source>', ":3: embedded Ruby"),
        (
            "<match **>\n  @type null\n  <buffer>\n    chunk_limit_size x\n  </buffer>\n</match>",
            ":4: invalid size",
        ),
        ("<label mainstream>\n</label>", ":1: a label's name starts with @"),
        (
            "<match **>\n  @type null\n  <buffer>\n    @type file\n  </buffer>\n</match>",
            ":3: <buffer> @type file needs path",
        ),
        (
            "<match **>\n  @type null\n  <buffer>\n    @type redis\n  </buffer>\n</match>",
            ":4: <buffer> @type redis is not supported",
        ),
    ],
)
def test_what_cannot_be_converted_is_an_error_with_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = error(tmp_path, text)
    assert f"{tmp_path / 'fluent.conf'}{expected}" in message, message


def test_a_source_label_without_routes_is_refused(tmp_path: Path) -> None:
    data, _ = convert(tmp_path, "<source>\n  @type forward\n  @label @nowhere\n</source>\n"
                                "<match **>\n  @type null\n</match>\n")  # fmt: skip
    with pytest.raises(ConfigError, match="no route has label '@nowhere'"):
        parse(data, env={})


def test_fluentd_units_read_as_fluentd_reads_them() -> None:
    assert fluent_size("1m", "") == 1024**2
    assert fluent_size("2GB", "") == 2 * 1024**3
    assert fluent_size("8k", "") == 8192
    assert fluent_size("1000", "") == 1000
    assert fluent_time("1", "") == 1.0 and fluent_time("0.1", "") == 0.1
    assert fluent_time("30s", "") == 30.0 and fluent_time("5m", "") == 300.0
    assert fluent_time("1h", "") == 3600.0 and fluent_time("1d", "") == 86400.0


def test_the_toml_writer_round_trips_a_config_shape() -> None:
    data = {
        "server": {"workers": 2, "log_level": "info"},
        "sources": [{"type": "forward", "security": {"self_hostname": "a", "shared_key": "k",
                                                      "users": [{"username": "u",
                                                                 "password": "p\"q\\n"}]}}],
        "routes": [{"match": "a.** b", "destination": "d"}],
        "destinations": {"d": {"type": "file", "path": "/x", "inject": {"tag_key": "tag"},
                               "buffer": {"flush_interval": 0.5}},
                         "odd name": {"type": "null"}},
    }  # fmt: skip
    assert tomllib.loads(to_toml(data)) == data


def test_unnamed_outputs_get_unique_names_and_their_secondary_follows(tmp_path: Path) -> None:
    data, _ = convert(
        tmp_path,
        """
<source>
  @type forward
</source>
<match a.**>
  @type kinesis_firehose
  delivery_stream_name a
  <secondary>
    @type file
    path /tmp/failed/a
  </secondary>
</match>
<match b.**>
  @type null
  @id null_2
</match>
<match c.**>
  @type null
</match>
<match d.**>
  @type null
</match>
""",
    )
    assert data["destinations"]["kinesis_firehose_1"]["secondary"] == "kinesis_firehose_1_secondary"
    assert [r["destination"] for r in data["routes"]] == [
        "kinesis_firehose_1", "null_2", "null_1", "null_3"]  # fmt: skip


def test_a_fluentd_file_buffer_becomes_a_file_buffer(tmp_path: Path) -> None:
    text = """<source>
  @type forward
</source>
<match app.**>
  @type kinesis_firehose
  delivery_stream_name app
  <buffer>
    @type file
    path /var/log/fluent/buffer/app
    total_limit_size 8g
    path_suffix .buf
  </buffer>
</match>
<match other.**>
  @type kinesis_firehose
  delivery_stream_name other
  <buffer>
    @type file_single
    path /var/log/fluent/other/*.buf
  </buffer>
</match>
"""
    data, warnings = convert(tmp_path, text)
    config = parse(data, env={})
    app, other = (config.destinations[f"kinesis_firehose_{n}"] for n in (1, 2))
    assert (app.buffer.type, app.buffer.path) == ("file", "/var/log/fluent/buffer/app")
    assert app.buffer.total_limit_size == 8 * 1024**3
    assert (other.buffer.type, other.buffer.path) == ("file", "/var/log/fluent/other")
    assert any(":11: <buffer>: path_suffix ignored" in w for w in warnings)
    assert any(":17: <buffer> @type file: total_limit_size not set" in w for w in warnings)


def test_every_problem_of_a_file_is_named_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fluent.conf"
    path.write_text("""<source>
  @type forward
  add_tag_prefix x
</source>
<source>
  @type tail
</source>
<match **>
  @type kinesis_firehose
  delivery_stream_name s
  port "#{`id`}"
  <buffer>
    chunk_limit_size x
  </buffer>
</match>
""")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    for line, what in ((3, "add_tag_prefix is not supported"), (5, "@type tail is not supported"),
                       (11, "embedded Ruby"), (13, "invalid size")):  # fmt: skip
        assert f"{path}:{line}: " in err and what in err, err
    assert "Traceback" not in err


def test_env_defaults_written_with_or_and_monitoring_sources(tmp_path: Path) -> None:
    data, warnings = convert(tmp_path, """<system>
  workers "#{ENV['FLUENT_WORKERS'] || '3'}"
</system>
<source>
  @type monitor_agent
  port 24220
</source>
<source>
  @type forward
  port "#{ENV["FORWARD_PORT"] || 24224}"
</source>
<match **>
  @type null
</match>
""")
    assert data["server"]["workers"] == "${FLUENT_WORKERS:-3}"
    assert data["sources"] == [{"type": "forward", "port": "${FORWARD_PORT:-24224}"}]
    assert parse(data, env={}).server.workers == 3
    assert parse(data, env={"FLUENT_WORKERS": "2"}).server.workers == 2
    assert any(":4: <source> @type monitor_agent ignored" in w and "/metrics" in w
               for w in warnings)  # fmt: skip


def test_a_forward_output_converts_with_its_servers_tls_security_and_include() -> None:
    env = {"FORWARD_SHARED_KEY": "k3y", "CENTRAL_PASSWORD": "pw"}
    config, warnings = read(FORWARD_TIER, env=env)
    (concat,) = config.filters
    assert isinstance(concat, Concat) and concat.use_partial_metadata
    central = config.destinations["to_central"]
    assert isinstance(central, ForwardDestination)
    assert (central.require_ack_response, central.ack_response_timeout, central.compress) == (
        True, 30.0, "gzip")  # fmt: skip
    assert central.tls is not None and central.tls.ca_path == "/etc/fluent/ca.pem"
    assert central.security is not None
    assert (central.security.self_hostname, central.security.shared_key) == ("edge", "k3y")
    a, b = central.servers
    assert (a.name, a.host, a.port, a.weight, a.standby) == (
        "central-a", "central-a.logging.internal", 24224, 60, False)  # fmt: skip
    assert (b.host, b.port, b.standby, b.username, b.password) == (
        "central-b.logging.internal", 24224, True, "edge", "pw")  # fmt: skip
    assert central.buffer.type == "file" and central.secondary == "to_central_secondary"
    assert any("central.conf:10: <match> forward: heartbeat_type ignored" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  tls_allow_self_signed_cert true\n", ":3: tls_allow_self_signed_cert is not supported"),
        ("  host 10.0.0.1\n", ":3: host is obsolete in out_forward: use a <server> section"),
        ("  transport tls\n  tls_ca_cert_path a.pem,b.pem\n", ":4: one CA file"),
    ],
)
def test_what_a_forward_output_cannot_do_is_named(
    tmp_path: Path, text: str, expected: str
) -> None:
    conf = f"<match **>\n  @type forward\n{text}  <server>\n    host h\n  </server>\n</match>\n"
    assert expected in error(tmp_path, conf)


def test_the_kinesis_plugins_own_settings_convert(tmp_path: Path) -> None:
    data, _ = convert(tmp_path, """<source>
  @type forward
</source>
<match **>
  @type kinesis_firehose
  delivery_stream_name central-logs
  region eu-west-1
  data_key log
  compression zlib
  chomp_record true
  http_proxy http://proxy.internal:3128
  <assume_role_credentials>
    role_arn arn:aws:iam::123456789012:role/central-logging
    role_session_name fluentd
    external_id "#{ENV['EXTERNAL_ID']}"
    sts_endpoint_url https://sts.eu-west-1.amazonaws.com
    duration_seconds 3600
  </assume_role_credentials>
</match>
""")
    (dest,) = parse(data, env={"EXTERNAL_ID": "x-42"}).destinations.values()
    assert isinstance(dest, FirehoseDestination)
    assert (dest.data_key, dest.compression, dest.chomp_record, dest.http_proxy) == (
        "log", "zlib", True, "http://proxy.internal:3128")  # fmt: skip
    role = dest.assume_role
    assert role is not None
    assert (role.role_arn, role.role_session_name, role.external_id, role.duration_seconds,
            role.sts_endpoint_url) == ("arn:aws:iam::123456789012:role/central-logging",
                                       "fluentd", "x-42", 3600,
                                       "https://sts.eu-west-1.amazonaws.com")  # fmt: skip
