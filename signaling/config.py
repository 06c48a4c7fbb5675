"""The one config object.

Every setting has a flag (``--rate-limit``), an environment variable (``TALKBRIDGE_RATE_LIMIT``)
and a TOML key (``rate_limit``). Precedence: defaults < TOML file < environment < flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_PREFIX = "TALKBRIDGE_"


def _list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


_TRUE = ("1", "true", "yes", "on")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


@dataclass
class Config:
    """All settings of a talkbridge node. Field name = TOML key; env = TALKBRIDGE_<NAME>."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "./data"
    # Auth
    jwt_secret: str = ""  # HS256; generated for development only when no key is configured
    jwt_public_key: str = ""  # path to a PEM public key (RS256, ES256/ES384/ES512)
    token_ttl: int = 7 * 24 * 3600  # seconds, for tokens minted by /api/login
    # When set, every token must carry this `aud` / `iss` (and /api/login's tokens do)
    jwt_audience: str = ""
    jwt_issuer: str = ""
    # /api/register and /api/login (demo accounts): true, false, or auto: on only while
    # tokens are signed with the generated development secret (see Config.demo_accounts)
    allow_registration: str = "auto"
    auth_timeout: float = 10.0  # seconds for the first auth frame; 0 = no limit
    # /api/register and /api/login attempts per second per client address, and burst;
    # 0 = no limit (signaling/login_limits.py)
    login_rate: float = 1.0
    login_burst: int = 10
    # load balancers whose X-Forwarded-For names the client (addresses or networks)
    trusted_proxies: list[str] = field(default_factory=list)
    # Storage and scale-out
    store: str = ""  # sqlite:///path | postgresql://...; default: sqlite under data_dir
    redis: str = ""  # redis://...; empty = in-process bus and presence
    node_id: str = ""
    # Limits
    rate_limit: float = 100.0  # frames per second per connection; 0 = off
    rate_burst: int = 200
    max_frame: int = 65536
    send_queue: int = 4096  # frames buffered to one slow device before it is disconnected
    recall_window: int = 120  # seconds a sender may recall a message
    group_member_limit: int = 2000
    # Calls
    call_timeout: float = 45.0
    call_grace: float = 20.0  # seconds a disconnected party may take to resume a call
    call_waiting: bool = False
    call_via_relay: bool = False  # policy: every 1:1 call's media goes through the media relay
    stun_urls: list[str] = field(default_factory=list)
    turn_urls: list[str] = field(default_factory=list)
    turn_secret: str = ""
    turn_ttl: int = 86400
    # Media relay
    relay_addresses: list[str] = field(default_factory=list)
    relay_workers: int = 0  # relay worker processes; 0 = one per core
    relay_in_process: bool = False  # run the relay in the signaling process (tests, tiny demos)
    relay_host: bool = True  # with several nodes: this node may host group-call rooms
    # Push
    push_webhook: str = ""
    push_retries: int = 5
    # Misc
    log_level: str = "INFO"
    shutdown_grace: float = 5.0

    @property
    def store_url(self) -> str:
        """The store URL, defaulting to an SQLite file in the data dir."""
        if self.store:
            return self.store
        return f"sqlite:///{Path(self.data_dir).resolve() / 'talkbridge.sqlite3'}"

    def demo_accounts(self, secret_generated: bool) -> bool:
        """Whether /api/register and /api/login serve demo accounts. ``auto`` turns them on
        only while tokens are signed with the generated development secret: an app that
        mints its own tokens (a configured secret or public key) shares its user ids with
        demo accounts, and anyone could register an id of the app's users and get tokens
        for it, so they stay off there unless turned on."""
        if self.allow_registration.strip().lower() == "auto":
            return secret_generated
        return _bool(self.allow_registration)

    def ensure_jwt_secret(self) -> None:
        """Generate and persist a development secret when no key at all is configured (loudly).

        With a public key and no secret, tokens come from the app's backend only: a generated
        (or left-over) HS256 secret would be a second, unintended way in, so none is used,
        and the demo accounts, which mint HS256 tokens, are off (see signaling/http_api.py).
        """
        if self.jwt_secret:
            return
        if self.jwt_public_key:
            log.info(
                "TALKBRIDGE_JWT_PUBLIC_KEY is set and TALKBRIDGE_JWT_SECRET is not: only tokens "
                "signed with that key are accepted; /api/register and /api/login are off "
                "(they mint HS256 tokens, which need TALKBRIDGE_JWT_SECRET)."
            )
            return
        path = Path(self.data_dir) / "dev-jwt-secret"
        if path.exists():
            self.jwt_secret = path.read_text().strip()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.jwt_secret = secrets.token_urlsafe(48)
            path.write_text(self.jwt_secret)
            path.chmod(0o600)
        log.warning(
            "TALKBRIDGE_JWT_SECRET is not set: using a generated DEVELOPMENT secret from %s. "
            "Set TALKBRIDGE_JWT_SECRET in production.",
            path,
        )


_FIELDS = {f.name: f for f in fields(Config)}
_REGISTRATION_VALUES = ("auto", *_TRUE, "0", "false", "no", "off")
_DEFAULTS = Config()


def _coerce(name: str, value: Any) -> Any:
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        return _bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list):
        return _list(value)
    return str(value)


def load_config(
    toml_path: str | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the config from a TOML file, the environment and explicit overrides (flags)."""
    values: dict[str, Any] = {}
    env = dict(os.environ) if env is None else env
    toml_path = toml_path or env.get(ENV_PREFIX + "CONFIG")
    if toml_path:
        with open(toml_path, "rb") as fh:
            data = tomllib.load(fh)
        for key, value in data.get("talkbridge", data).items():
            if key not in _FIELDS:
                raise ValueError(f"unknown setting {key!r} in {toml_path}")
            values[key] = _coerce(key, value)
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ValueError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    cfg = Config(**values)
    if cfg.allow_registration.strip().lower() not in _REGISTRATION_VALUES:
        raise ValueError(
            f"allow_registration must be auto, true or false, not {cfg.allow_registration!r}"
        )
    if not cfg.node_id:
        cfg.node_id = secrets.token_hex(4)
    return cfg


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting (all default to None so env/TOML are not overridden)."""
    parser.add_argument("--config", help="TOML config file (env TALKBRIDGE_CONFIG)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        parser.add_argument(flag, dest=f.name, default=None, help=f"(env {env_name})")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config for parsed CLI arguments."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    return load_config(getattr(args, "config", None), overrides=overrides)
