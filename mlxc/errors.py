"""The errors a user can cause and fix, and how each reads as one line."""

from __future__ import annotations

from mlxc.config import ConfigError
from mlxc.store import StoreError


class ModelError(RuntimeError):
    """The model cannot be found, fetched, converted or loaded; the message says what to do."""


class InputError(ValueError):
    """Bad input from a command line or a file (a message says which and why)."""


class PromptTooLong(InputError):
    """The prompt does not fit the model's context window."""


class NotEnoughMemory(InputError):
    """The request's KV cache (prompt + max_tokens) cannot fit the memory limit even alone."""


class EngineBusy(RuntimeError):
    """The engine's queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def __getattr__(name: str):
    # USER_ERRORS holds pydantic's ValidationError, imported only when it is asked for: the
    # modules that take an error class from here are on `mlxc ask`'s hit path, pydantic not.
    if name == "USER_ERRORS":
        from pydantic import ValidationError

        return (ConfigError, ModelError, StoreError, InputError, ValidationError)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe(exc: Exception) -> str:
    """One line: pydantic's list of problems reads as 'field: problem; field: problem'."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return str(exc)
