"""The error a library function raises about a value it was handed: it says what is wrong and where inside that value,
never which recipe key the value came from. The recipe layer (a stage's `check`) adds the key."""

from __future__ import annotations


class ConfigProblem(ValueError):
    """A setting a library function cannot work with. `where` locates it inside the value the function was given
    (e.g. `("slices", 2, "parameters")` inside a merge configuration); `at(key)` is the message under a recipe key."""

    def __init__(self, message: str, where: tuple = ()):
        super().__init__(message)
        self.where = tuple(where)

    def at(self, key: str) -> str:
        location = ".".join(str(part) for part in (key, *self.where) if part != "")
        return f"{location}: {self}" if location else str(self)
