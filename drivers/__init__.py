"""Database adapters for the ``pool`` engine, one module per database.

Each module exposes ``create(url, *, connect_timeout, socket_timeout)`` that
returns an adapter satisfying ``pool._driver.Driver`` structurally. A driver
never imports the engine: the dependency points one way, pool -> drivers.

``url`` reaches a driver with the pool's own parameters already removed; the
driver validates the parameters that remain and raises :class:`InvalidParameter`
for a bad one, which the engine reports as ``pool.ConfigError``.
"""

from __future__ import annotations

__all__ = ["InvalidParameter"]


class InvalidParameter(ValueError):
    """A driver-level URL parameter (or URL part) with a bad value."""

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        super().__init__(f"{parameter} {reason}, got {value!r}")
        self.parameter = parameter
        self.value = value
        self.reason = reason
