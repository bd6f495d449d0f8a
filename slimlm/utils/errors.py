"""User-facing errors: the CLI prints ``error: <message>`` and exits 2 (traceback only with --debug)."""


class SlimlmError(Exception):
    """A problem with the user's input (path, checkpoint, config, recipe, prompt...), named in one line."""


class CheckpointError(SlimlmError):
    """A checkpoint that cannot be read: missing, truncated, unsupported architecture or tensor type."""


class ConfigError(SlimlmError):
    """A bad config / recipe value or key."""
