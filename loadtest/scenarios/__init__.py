"""Scenario plugins: every module in this package registers its scenarios on import.

Adding a scenario is adding a module here with a ``@register``-ed ``Scenario`` subclass;
nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from loadtest.scenarios.base import REGISTRY, Context, Scenario, register

__all__ = ["REGISTRY", "Context", "Scenario", "load_all", "register"]


def load_all() -> dict[str, type[Scenario]]:
    """Import every scenario module and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
