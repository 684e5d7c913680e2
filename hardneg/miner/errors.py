"""Exceptions raised by the core library."""


class ValidationError(ValueError):
    """Bad input at a public entry point; the message says what was wrong and what is accepted."""


class SnapshotError(RuntimeError):
    """A snapshot that is missing, incomplete or corrupt. Nothing is loaded from it."""


class NotFoundError(KeyError):
    """An id or a snapshot name that the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"
