"""One exception type for problems a user can fix: printed as a message, never a traceback."""


class LensspaceError(RuntimeError):
    """A failure with a message that says what is wrong and what to do about it."""
