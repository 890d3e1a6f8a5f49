"""The error a user's config mistake raises, importable from every layer without cycles."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stops (non-zero exit), its
    last finite checkpoint intact. The message names the step, the metric and that checkpoint."""


class ConfigError(ValueError):
    """A bad config value: the message names the field and the allowed values.

    The CLI prints it as one line and exits non-zero (no traceback)."""
