"""Database adapters for the ``pool`` engine, one module per database.

Installed as ``pool_drivers`` (the repository keeps them in ``drivers/``), so
that an application's own ``drivers`` package shadows nothing.

Each module exposes ``create(url, *, connect_timeout, socket_timeout)`` that
returns an adapter satisfying ``pool._driver.Driver`` structurally. A driver
never imports the engine: the dependency points one way, pool -> pool_drivers.

``url`` reaches a driver with the pool's own parameters already removed; the
driver validates the parameters that remain and raises :class:`InvalidParameter`
for a bad one, which the engine reports as ``pool.ConfigError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["InvalidParameter", "PasswordProvider", "resolve_password"]

#: ``Pool(..., password=...)``: a string, or a callable / async callable asked
#: at each connect (a token that expires: AWS RDS IAM, Azure AD, GCP IAM)
PasswordProvider = Callable[[], Any]


async def resolve_password(provider: PasswordProvider) -> str:
    """Ask the provider for the password of one connect. Never kept, never shown."""
    value = provider()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str):
        raise TypeError(
            f"the password provider must return a str, got {type(value).__name__}"
        )
    return value


class InvalidParameter(ValueError):
    """A driver-level URL parameter (or URL part) with a bad value."""

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        super().__init__(f"{parameter} {reason}, got {value!r}")
        self.parameter = parameter
        self.value = value
        self.reason = reason
