"""The one config object: defaults < TOML < environment < flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from signaling.config import Config, add_config_flags, config_from_args, load_config


def test_precedence_is_toml_then_environment_then_flags(tmp_path: Path):
    toml = tmp_path / "talkbridge.toml"
    toml.write_text(
        'port = 9001\nrate_limit = 5.5\nturn_urls = ["turn:a:3478", "turn:b:3478"]\n'
        "max_frame = 1000\n"
    )
    env = {"TALKBRIDGE_PORT": "9002", "TALKBRIDGE_STUN_URLS": "stun:x:3478, stun:y:3478"}
    cfg = load_config(str(toml), env=env, overrides={"port": "9003", "max_frame": None})
    assert cfg.port == 9003  # flag beats env beats file
    assert cfg.rate_limit == 5.5 and cfg.max_frame == 1000  # from the file
    assert cfg.turn_urls == ["turn:a:3478", "turn:b:3478"]
    assert cfg.stun_urls == ["stun:x:3478", "stun:y:3478"]  # comma-separated env list


def test_fixed_environment_names_reach_their_settings():
    env = {
        "TALKBRIDGE_JWT_SECRET": "s",
        "TALKBRIDGE_STORE": "postgresql://db/x",
        "TALKBRIDGE_RATE_LIMIT": "0",
        "TALKBRIDGE_RATE_BURST": "7",
        "TALKBRIDGE_MAX_FRAME": "2048",
        "TALKBRIDGE_CALL_TIMEOUT": "30",
        "TALKBRIDGE_TURN_SECRET": "t",
        "TALKBRIDGE_TURN_TTL": "600",
        "TALKBRIDGE_RELAY_ADDRESSES": "127.0.0.1",
        "TALKBRIDGE_PUSH_WEBHOOK": "http://127.0.0.1:1/p",
        "TALKBRIDGE_REDIS": "redis://127.0.0.1:6379/0",
        "TALKBRIDGE_JWT_PUBLIC_KEY": "/k.pem",
    }
    cfg = load_config(env=env)
    assert (cfg.jwt_secret, cfg.store_url, cfg.rate_limit, cfg.rate_burst) == (
        "s",
        "postgresql://db/x",
        0.0,
        7,
    )
    assert (cfg.max_frame, cfg.call_timeout, cfg.turn_secret, cfg.turn_ttl) == (
        2048,
        30.0,
        "t",
        600,
    )
    assert cfg.relay_addresses == ["127.0.0.1"] and cfg.push_webhook == "http://127.0.0.1:1/p"
    assert cfg.redis == "redis://127.0.0.1:6379/0" and cfg.jwt_public_key == "/k.pem"


def test_booleans_parse_from_text():
    assert load_config(env={"TALKBRIDGE_CALL_WAITING": "false"}).call_waiting is False
    assert load_config(env={"TALKBRIDGE_CALL_WAITING": "yes"}).call_waiting is True


def test_demo_accounts_follow_the_setting_and_by_default_the_secret():
    auto = load_config(env={})
    assert auto.demo_accounts(secret_generated=True) is True
    assert auto.demo_accounts(secret_generated=False) is False
    on = load_config(env={"TALKBRIDGE_ALLOW_REGISTRATION": "yes"})
    assert on.demo_accounts(secret_generated=False) is True
    off = load_config(env={"TALKBRIDGE_ALLOW_REGISTRATION": "false"})
    assert off.demo_accounts(secret_generated=True) is False
    with pytest.raises(ValueError, match="allow_registration"):
        load_config(env={"TALKBRIDGE_ALLOW_REGISTRATION": "maybe"})


def test_unknown_toml_key_is_an_error(tmp_path: Path):
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_config(str(toml), env={})


def test_every_setting_has_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(
        ["--rate-limit", "3", "--data-dir", "/tmp/x", "--call-waiting", "true"]
    )
    cfg = config_from_args(args)
    assert (cfg.rate_limit, cfg.data_dir, cfg.call_waiting) == (3.0, "/tmp/x", True)


def test_default_store_is_sqlite_under_the_data_dir(tmp_path: Path):
    cfg = Config(data_dir=str(tmp_path))
    assert cfg.store_url == f"sqlite:///{tmp_path.resolve() / 'talkbridge.sqlite3'}"


def test_missing_secret_is_generated_once_with_a_warning(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING):
        a = Config(data_dir=str(tmp_path))
        a.ensure_jwt_secret()
    assert len(a.jwt_secret) >= 32 and "DEVELOPMENT secret" in caplog.text
    b = Config(data_dir=str(tmp_path))
    b.ensure_jwt_secret()
    assert b.jwt_secret == a.jwt_secret  # tokens survive a restart
    assert (tmp_path / "dev-jwt-secret").stat().st_mode & 0o077 == 0


def test_no_secret_is_generated_when_a_public_key_is_configured(tmp_path: Path):
    cfg = Config(data_dir=str(tmp_path), jwt_public_key=str(tmp_path / "backend.pem"))
    cfg.ensure_jwt_secret()
    assert cfg.jwt_secret == "" and not (tmp_path / "dev-jwt-secret").exists()
