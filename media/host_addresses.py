"""Restrict the host addresses aioice gathers ICE candidates on.

aioice (used by aiortc) enumerates every interface and *skips* 127.0.0.1 and ::1, so a
peer on a loopback-only network (tests, single-machine demos) gathers no candidate at all.
aioice has no public setting for this, so we replace its module-level
``get_host_addresses``. This is the one place that touches that private function; the
version pin below makes an aioice upgrade fail loudly here instead of silently gathering
on every interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import aioice
import aioice.ice

SUPPORTED_AIOICE = ("0.13.",)

_original = aioice.ice.get_host_addresses
_configured: tuple[str, ...] | None = None


class UnsupportedAioiceVersion(RuntimeError):
    """The installed aioice is not one whose internals this adapter was written against."""


def _check_version() -> None:
    version = getattr(aioice, "__version__", "")
    if not version.startswith(SUPPORTED_AIOICE):
        raise UnsupportedAioiceVersion(
            f"aioice {version!r} is not supported by media.host_addresses "
            f"(tested with {SUPPORTED_AIOICE}); re-check aioice.ice.get_host_addresses"
        )


def _restricted(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    assert _configured is not None
    return [a for a in _configured if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def restrict_host_addresses(addresses: Sequence[str] | None) -> None:
    """Gather host candidates only on ``addresses`` (loopback allowed).

    ``None`` or an empty list restores aioice's own choice.
    """
    global _configured
    _check_version()
    if addresses:
        _configured = tuple(a.strip() for a in addresses if a.strip())
        aioice.ice.get_host_addresses = _restricted
    else:
        _configured = None
        aioice.ice.get_host_addresses = _original


def configured_host_addresses() -> tuple[str, ...] | None:
    """The addresses set by :func:`restrict_host_addresses`, or ``None`` when unrestricted."""
    return _configured
