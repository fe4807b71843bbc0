"""The error every check of a site's data raises: :class:`SiteDataError`, whose message says
what to fix. Kept apart from the checks so that every module reading user paths can raise it."""

from __future__ import annotations

__all__ = ["SiteDataError"]


class SiteDataError(ValueError):
    """A site folder that cannot be trained on as it is; the message says what to fix."""
