"""``talkbridge`` command line: ``talkbridge serve``, ``talkbridge token``."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

from aiohttp import web

from signaling.config import add_config_flags, config_from_args


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``talkbridge`` console script."""
    parser = argparse.ArgumentParser(prog="talkbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a talkbridge node")
    add_config_flags(serve)
    token = sub.add_parser("token", help="mint an HS256 token with the configured secret")
    add_config_flags(token)
    token.add_argument("user")
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--device-id", dest="dev", default=None)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "token":
        from signaling.auth import TokenVerifier

        config.ensure_jwt_secret()
        extra = {"dev": args.dev} if args.dev else {}
        tok, _ = TokenVerifier(config).mint(args.user, ttl=args.ttl, **extra)
        print(tok)
        return 0
    from signaling.app import create_app

    raise_fd_limit()
    app = create_app(config)
    print(f"talkbridge serving on http://{config.host}:{config.port}/", file=sys.stderr, flush=True)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        print=None,
        shutdown_timeout=config.shutdown_grace,
        access_log=None,
        backlog=4096,  # connection storms (reconnects after a node dies) overflow 128
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
