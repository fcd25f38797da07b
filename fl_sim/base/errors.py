"""User-facing errors: the CLI prints their one-line message and exits with code 2."""


class UserInputError(Exception):
    """Bad input from the user (scenario, path, name). One line, no traceback."""


class ScenarioError(UserInputError):
    """A scenario that cannot be loaded or validated; the message names the key."""


class DataUnavailableError(UserInputError):
    """A dataset or weights file that is not on this machine and cannot be fetched."""
