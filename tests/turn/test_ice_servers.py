"""The ICE server list handed to clients (auth.ok, GET /api/ice-servers)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from signaling.config import Config, load_config
from signaling.ice import ice_servers_for, ice_ttl, turn_credentials


def test_nothing_configured_means_no_ice_servers_not_a_public_stun_server():
    assert ice_servers_for(Config(), "alice", 1_700_000_000) == []


def test_stun_urls_are_passed_as_configured_without_credentials():
    cfg = Config(stun_urls=["stun:127.0.0.1:3478", "stun:stun.example.org"])
    assert ice_servers_for(cfg, "alice", 0) == [
        {"urls": ["stun:127.0.0.1:3478", "stun:stun.example.org"]}]


def test_turn_credentials_follow_the_turn_rest_scheme_with_the_configured_ttl():
    cfg = Config(turn_urls=["turn:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=tcp"],
                 turn_secret="s3cret", turn_ttl=600)
    [turn] = ice_servers_for(cfg, "alice", 1_700_000_000.7)
    assert turn["urls"] == ["turn:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=tcp"]
    assert turn["username"] == "1700000600:alice"
    expected = base64.b64encode(
        hmac.new(b"s3cret", b"1700000600:alice", hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected
    assert ice_ttl(cfg) == 600


def test_each_user_gets_their_own_credentials():
    cfg = Config(turn_urls=["turn:127.0.0.1:3478"], turn_secret="s")
    [a] = ice_servers_for(cfg, "alice", 100)
    [b] = ice_servers_for(cfg, "bob", 100)
    assert a["username"] != b["username"]
    assert a["credential"] != b["credential"]


def test_turn_urls_without_a_secret_are_not_offered():
    cfg = Config(stun_urls=["stun:127.0.0.1:3478"], turn_urls=["turn:127.0.0.1:3478"])
    assert ice_servers_for(cfg, "alice", 0) == [{"urls": ["stun:127.0.0.1:3478"]}]


def test_the_environment_variables_configure_the_list():
    cfg = load_config(env={
        "TALKBRIDGE_STUN_URLS": "stun:127.0.0.1:3478",
        "TALKBRIDGE_TURN_URLS": "turn:127.0.0.1:3478, turns:127.0.0.1:5349",
        "TALKBRIDGE_TURN_SECRET": "k",
        "TALKBRIDGE_TURN_TTL": "60",
    })
    stun, turn = ice_servers_for(cfg, "bob", 1000)
    assert stun == {"urls": ["stun:127.0.0.1:3478"]}
    assert turn["urls"] == ["turn:127.0.0.1:3478", "turns:127.0.0.1:5349"]
    assert (turn["username"], turn["credential"]) == turn_credentials("k", "bob", 1060)
