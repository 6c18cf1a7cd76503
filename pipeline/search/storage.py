"""Where a search's Optuna study lives: SQLite in the run's output (one machine), or a PostgreSQL server that
workers on several machines share, given as a SQLAlchemy URL.

The URL may name environment variables, `${NAME}`, expanded when the study is opened (`postgresql://ftmerge:${PGPASS}
@db/ftmerge`, or the whole URL: `${FTMERGE_SEARCH_STORAGE}`), so a password stays out of the recipe, its copies and
its fingerprints. A `Storage` never shows its password: `display` masks it, `repr` uses `display`, and `scrub`
removes it from a library's error message before that message is shown or written anywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ENVIRONMENT_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+:)\S+@")  # to the last @: masks more, never less
DIALECTS = ("sqlite", "postgresql")  # one machine, several machines: the two the search is tested on
DRIVER_HINT = "pip install 'ftmerge[postgres]' installs psycopg 3, SQLAlchemy's driver for postgresql:// URLs"


class StorageError(ValueError):
    """A storage URL that cannot be used; the message never holds the URL's password."""


@dataclass(frozen=True)
class Storage:
    """A resolved storage URL (environment references expanded)."""

    url: str = field(repr=False)

    @property
    def dialect(self) -> str:
        return _parse(self.url).get_backend_name()

    @property
    def shared(self) -> bool:
        """A database server that processes on other machines reach (not a SQLite file)."""
        return self.dialect != "sqlite"

    @property
    def display(self) -> str:
        """The URL with its password replaced by ***, for the screen and the logs."""
        return _parse(self.url).render_as_string(hide_password=True)

    def scrub(self, text: str) -> str:
        """`text` without the URL's password (a driver's message may quote the connection string)."""
        password = _parse(self.url).password
        return text.replace(str(password), "***") if password else text

    def __repr__(self) -> str:
        return f"Storage({self.display!r})"


def sqlite_storage(path: Path) -> Storage:
    return Storage(f"sqlite:///{Path(path).absolute()}")


def resolve_storage(value: str) -> Storage:
    """The storage a recipe's URL names, its `${NAME}` references expanded from the environment. Raises
    StorageError for an unset variable, a string that is no database URL, a database other than SQLite or
    PostgreSQL, or a missing driver."""
    missing = sorted({name for name in ENVIRONMENT_REFERENCE.findall(value) if name not in os.environ})
    if missing:
        raise StorageError(
            f"the environment variable{'s' * (len(missing) > 1)} {', '.join(missing)} that the storage URL names "
            f"{'are' if len(missing) > 1 else 'is'} not set; export {missing[0]}=postgresql://user:password@host/db"
        )
    storage = Storage(ENVIRONMENT_REFERENCE.sub(lambda match: os.environ[match.group(1)], value))
    try:
        url = _parse(storage.url)
    except ValueError:
        raise StorageError(
            "not a database URL; expected postgresql://user@host:port/database (several machines) or "
            "sqlite:///path/study.db (one machine)"
        ) from None
    if url.get_backend_name() not in DIALECTS:
        raise StorageError(
            f"{url.get_backend_name()}: the search runs its study on PostgreSQL (postgresql://, several machines) "
            "or SQLite (one machine)"
        )
    if storage.shared:
        try:
            url.get_dialect().import_dbapi()
        except ImportError:
            raise StorageError(
                f"the PostgreSQL driver {url.get_driver_name()} is not installed: {DRIVER_HINT}"
            ) from None
    return storage


def mask_url_passwords(text: str) -> str:
    """`scheme://user:password@…` anywhere in `text` with the password as *** (a command line for the log)."""
    return URL_PASSWORD.sub(r"\1***@", text)


def has_literal_password(value: str) -> bool:
    """Whether a recipe's URL spells a password out instead of taking it from the environment."""
    try:
        password = _parse(value).password
    except ValueError:  # e.g. the whole URL is one `${NAME}`
        return False
    return bool(password) and not ENVIRONMENT_REFERENCE.search(str(password))


def _parse(url: str):
    """SQLAlchemy's URL object; ValueError (never echoing the string) when it is none."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        raise ValueError("not a database URL") from None
