"""Shared fixtures. Tests marked ``netns`` must run inside scripts/netns-run (make test does)."""

from __future__ import annotations

import subprocess

import pytest


def only_loopback() -> bool:
    """True when this process sits in a network namespace whose only interface is ``lo``."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]
    return names == ["lo"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("netns") for item in items) and not only_loopback():
        skip = pytest.mark.skip(reason="WebRTC/browser test: run it through scripts/netns-run")
        for item in items:
            if item.get_closest_marker("netns"):
                item.add_marker(skip)
