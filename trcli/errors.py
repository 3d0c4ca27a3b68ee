"""Known errors: the CLI prints their one-line message and exits with their code."""


class TrcliError(Exception):
    exit_code = 1


class UsageError(TrcliError):
    """Bad flags, config, input data or paths: exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A bad recipe, environment variable or flag value, naming the key and where it came from."""


class DataError(UsageError):
    """A bad input file or record, naming the file and line."""


class GateError(TrcliError):
    """A quality gate was not met (e.g. judge --min-win-rate): exit 3."""

    exit_code = 3
