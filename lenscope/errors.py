"""The project's user-facing error types.

Every error that means "the input or a setting is wrong" derives from ``UserError``; the command
line prints such errors as one line naming the problem and the fix (exit status 2). Anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or a bad setting; the message names the problem and the fix in one line."""


class ConfigError(UserError, ValueError):
    """A setting is invalid; the message names the flag to change."""
