"""The error a user's config mistake raises, importable from every layer without cycles."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stops (non-zero exit), its
    last finite checkpoint intact. The message names the step, the metric and that checkpoint."""


class ConfigError(ValueError):
    """A bad config value: the message names the field and the allowed values.

    The CLI prints it as one line and exits non-zero (no traceback)."""


class CheckpointDamaged(RuntimeError):
    """No checkpoint of a workdir (or not the one asked for) reads back intact: the message names each
    step tried and what was wrong with it. Nothing on disk was deleted."""


class CheckpointNotWritten(RuntimeError):
    """A save failed (a full disk, an unwritable bucket): the run stops; the message names the last
    complete checkpoint, which the failure did not touch."""


# What the CLI prints as one line (no traceback), exit status 1.
ONE_LINE = (ConfigError, TrainingDiverged, CheckpointDamaged, CheckpointNotWritten)
