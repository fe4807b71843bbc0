"""The error a user fixes in the config: raised by every config check, before anything runs."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value a user must change before anything runs."""
