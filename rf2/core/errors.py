"""Errors a user can fix: bad config values, bad data files, bad device profiles.

Each carries one line that names the field (or file and line), the bad value and what
is allowed. The CLI prints that line alone and exits with status 2.
"""

from __future__ import annotations

from typing import Any


class UserInputError(Exception):
    """Base of every error caused by the user's input rather than by rf2."""

    exit_code = 2


class ConfigError(UserInputError):
    """A config value is unknown, of the wrong type, or out of range."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config error: {field}={value!r} is not allowed; allowed: {allowed}")


class DataError(UserInputError):
    """A dataset file is missing, unreadable or malformed, or empty after filtering."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"data error: {where}: {problem}")


class ProfileError(UserInputError):
    """A device profile is invalid."""

    def __init__(self, profile: str, field: str, value: Any, allowed: str) -> None:
        self.profile, self.field, self.value, self.allowed = profile, field, value, allowed
        super().__init__(
            f"device profile error: {profile}: {field}={value!r} is not allowed; allowed: {allowed}"
        )
