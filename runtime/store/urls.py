"""Store locations as text: telling a PostgreSQL URL from a file path, and hiding passwords."""

from __future__ import annotations

import re

__all__ = ["is_postgres_url", "redact"]


def is_postgres_url(text: str) -> bool:
    """Whether `text` names a PostgreSQL database (rather than an SQLite file)."""
    return text.startswith(("postgresql://", "postgres://"))


def redact(location: str) -> str:
    """The location with any password in a URL replaced, fit for messages and logs."""
    return re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", location)
