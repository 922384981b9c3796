"""Config: parsers, defaults, and the one-line exit 78 for bad values."""

from __future__ import annotations

import pytest
from conftest import run_lobbyd

import lobbyd
from lobbyd import Config, ConfigError, parse_bool, parse_int, redact_url


def test_driver_names_one_or_both_transports() -> None:
    assert Config.from_env({"DRIVER": "redis"}).driver == ("Redis",)
    assert Config.from_env({"DRIVER": "NATS, Redis"}).driver == ("NATS", "Redis")
    assert Config.from_env({"DRIVER": "nats,NATS"}).driver == ("NATS",)


def test_defaults_match_the_spec() -> None:
    c = Config.from_env({})
    assert (c.host, c.port, c.token, c.disable_api, c.driver) == ("127.0.0.1", 1313, "", False,
                                                                  ("NATS",))
    assert (c.redis_host, c.redis_port, c.redis_db, c.redis_channel, c.redis_password) == \
        ("127.0.0.1", 6379, 0, "lobby:discovery", "")
    assert c.nats_url == ("nats://127.0.0.1:4222",)
    assert c.nats_discovery_channel == "lobby.discovery"
    assert (c.labels_path, c.runtime_labels_filename) == ("/etc/lobby/labels", "_runtime")
    assert (c.clean_every, c.keep_alive, c.ttl, c.node_exporter_port) == (15, 5, 30, 9100)
    assert c.register is True and c.callback == ()
    assert (c.callback_cooldown, c.callback_first_run_delay) == (15, 30)


@pytest.mark.parametrize("word,value", [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("yes", True), ("on", True), ("0", False), ("f", False), ("F", False), ("FALSE", False),
    ("false", False), ("False", False), ("no", False), ("off", False),
])
def test_parse_bool_accepts_go_words_and_yes_no(word: str, value: bool) -> None:
    assert parse_bool("X", word) is value


def test_parse_bool_rejects_maybe_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="REGISTER='maybe'"):
        parse_bool("REGISTER", "maybe")


@pytest.mark.parametrize("text", ["abc", "-1", "0", "65536", "1e3", "99999999999999999999"])
def test_parse_int_rejects_out_of_range_and_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="PORT"):
        parse_int("PORT", text, 1, 65535)


def test_full_environment_is_parsed() -> None:
    c = Config.from_env({
        "TOKEN": "s3cret", "HOST": "::", "PORT": "8080", "DISABLE_API": "yes",
        "NATS_URL": "nats://a:4222, tls://user:pw@b:4223,c", "LABELS": " x:1 ,, y:2 ",
        "RUNTIME_LABELS_FILENAME": "mine", "HOSTNAME": "h.example.com", "REGISTER": "0",
        "CALLBACK": "/usr/bin/env 'a b'", "LOG_LEVEL": "debug", "TTL": "7",
    })
    assert c.token == "s3cret" and c.host == "::" and c.port == 8080 and c.disable_api
    assert c.nats_url == ("nats://a:4222", "tls://user:pw@b:4223", "nats://c")
    assert c.labels == ("x:1", "y:2")
    assert c.runtime_labels_filename == "mine" and c.hostname == "h.example.com"
    assert c.register is False and c.callback == ("/usr/bin/env", "a b")
    assert c.log_level == "DEBUG" and c.ttl == 7


def test_empty_value_means_default() -> None:
    assert Config.from_env({"PORT": "", "TTL": "  "}).port == 1313


def test_redact_url_hides_passwords_and_tokens() -> None:
    assert redact_url("nats://user:hunter2@host:4222") == "nats://***@host:4222"
    assert redact_url("tls://tok3n@host") == "tls://***@host"
    assert redact_url("nats://host:4222") == "nats://host:4222"


@pytest.mark.parametrize("name,value,expect", [
    ("PORT", "abc", "PORT='abc'"),
    ("PORT", "70000", "PORT='70000'"),
    ("TTL", "-1", "TTL='-1'"),
    ("KEEP_ALIVE", "0", "KEEP_ALIVE='0'"),
    ("REGISTER", "maybe", "REGISTER='maybe'"),
    ("DISABLE_API", "2", "DISABLE_API='2'"),
    ("RUNTIME_LABELS_FILENAME", "../x", "RUNTIME_LABELS_FILENAME='../x'"),
    ("DRIVER", "kafka", "DRIVER='kafka'"),
    ("DRIVER", "NATS,zmq", "DRIVER='NATS,zmq'"),
    ("REDIS_PORT", "0", "REDIS_PORT='0'"),
    ("REDIS_DB", "-1", "REDIS_DB='-1'"),
    ("REDIS_CHANNEL", "a b", "REDIS_CHANNEL"),
    ("REDIS_HOST", "256.1.1.1", "REDIS_HOST"),
    ("NATS_URL", "http://x:1", "NATS_URL"),
    ("NATS_URL", "nats://x:99999", "NATS_URL"),
    ("NATS_DISCOVERY_CHANNEL", "a b", "NATS_DISCOVERY_CHANNEL"),
    ("LABELS", "ok,bad\x01label", "LABELS"),
    ("HOST", "not a host!", "HOST"),
    ("HOST", "256.1.1.1", "HOST"),
    ("HOST", "192.0.2.1", "HOST"),  # a documentation address: not on this machine
    ("CALLBACK", "'unbalanced", "CALLBACK"),
    ("LOG_LEVEL", "chatty", "LOG_LEVEL"),
    ("HOSTNAME", "has space", "HOSTNAME"),
])
def test_bad_config_exits_78_with_one_line(name: str, value: str, expect: str) -> None:
    result = run_lobbyd({name: value})
    assert result.returncode == 78, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expect in lines[0] and "Traceback" not in result.stderr
    # one format whether the environment says it or binding finds it (HOST=192.0.2.1)
    assert lines[0].startswith("lobbyd: configuration error: "), lines[0]


def test_secret_in_bad_nats_url_is_not_printed() -> None:
    result = run_lobbyd({"NATS_URL": "nats://user:hunter2@host:99999"})
    assert result.returncode == 78
    assert "hunter2" not in result.stderr and "***" in result.stderr


def test_version_and_help() -> None:
    version = run_lobbyd({}, args=["--version"])
    assert version.returncode == 0 and version.stdout.strip() == f"lobbyd {lobbyd.__version__}"
    help_ = run_lobbyd({}, args=["--help"])
    assert help_.returncode == 0
    for name, (default, _parser, _text) in lobbyd.ENV_VARS.items():
        assert name in help_.stdout
        if default:
            assert default in help_.stdout
    bad = run_lobbyd({}, args=["--frobnicate"])
    assert bad.returncode == 2 and "--help" in bad.stderr


def test_cut_off_keep_and_kv_replicas() -> None:
    c = Config.from_env({})
    assert (c.cut_off_keep, c.kv_replicas) == (0, 0)  # the whole cut; auto
    c = Config.from_env({"CUT_OFF_KEEP": "600", "KV_REPLICAS": "3"})
    assert (c.cut_off_keep, c.kv_replicas) == (600, 3)
    assert Config.from_env({"KV_REPLICAS": " AUTO "}).kv_replicas == 0
    for env, said in [({"CUT_OFF_KEEP": "-5"}, "CUT_OFF_KEEP='-5': expected a whole number"),
                      ({"KV_REPLICAS": "0"}, "KV_REPLICAS='0': expected auto or a whole "
                                             "number from 1 to 5"),
                      ({"KV_REPLICAS": "7"}, "KV_REPLICAS='7'")]:
        with pytest.raises(ConfigError, match=said):
            Config.from_env(env)
    result = run_lobbyd({"KV_REPLICAS": "many"})
    assert result.returncode == 78 and result.stderr.count("\n") == 1
    assert "KV_REPLICAS='many'" in result.stderr
