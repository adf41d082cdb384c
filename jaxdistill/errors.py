"""The errors a user can fix. Each message says what went wrong and what to do; the CLI
prints them as one line (the traceback only with --verbose)."""


class UserError(ValueError):
    """Bad input, settings or files, as opposed to a bug in jaxdistill."""


class ConfigError(UserError):
    """An experiment or model config that cannot run (a bad value, a contradiction)."""


class DataError(UserError):
    """A malformed record or data file: the message names the file, the record and the field."""


class RunError(UserError):
    """A work directory that cannot be used as asked (locked, unwritable, a damaged checkpoint)."""
