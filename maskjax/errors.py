"""The error a user's config mistake raises, importable from every layer without cycles."""


class ConfigError(ValueError):
    """A bad config value: the message names the field and the allowed values.

    The CLI prints it as one line and exits non-zero (no traceback)."""
