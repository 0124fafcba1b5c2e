"""Django-style lookups (``key__startswith="proj/"``) turned into SQL conditions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lamin_io.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Table

__all__ = ["conditions", "ordering"]

_OPS = ("exact", "iexact", "contains", "icontains", "startswith", "endswith", "gt", "gte",
        "lt", "lte", "in", "isnull")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def ordering(table: Table, fields: tuple[str, ...], order_by: str | Iterable[str] | None
             ) -> list[Any]:
    """Translate ``order_by`` (``"size"``, ``"-created_at"``, or a list) into SQL order terms.

    A leading ``-`` sorts descending; ties, and no ``order_by``, go by insertion (id).
    """
    names = [] if order_by is None else [order_by] if isinstance(order_by, str) \
        else list(order_by)
    out = []
    for name in names:
        field = name.removeprefix("-") if isinstance(name, str) else None
        if field not in fields:
            msg = f"cannot order by {name!r}; fields (a leading - for descending): " \
                  f"{', '.join(fields)}"
            raise InvalidArgumentError(msg)
        out.append(table.c[field].desc() if name.startswith("-") else table.c[field].asc())
    return [*out, table.c.id]


def conditions(table: Table, fields: tuple[str, ...],
               lookups: dict[str, Any]) -> list[ColumnElement[bool]]:
    """Translate ``{"field__op": value}`` into SQLAlchemy conditions on ``table``."""
    out = []
    for name, value in lookups.items():
        field, _, op = name.partition("__")
        op = op or "exact"
        if field not in fields:
            msg = f"cannot filter on {field!r}; fields: {', '.join(fields)}"
            raise InvalidArgumentError(msg)
        if op not in _OPS:
            msg = f"unknown lookup {op!r} in {name!r}; lookups: {', '.join(_OPS)}"
            raise InvalidArgumentError(msg)
        col = table.c[field]
        if op == "exact":
            out.append(col.is_(None) if value is None else col == value)
        elif op == "iexact":
            out.append(col.ilike(_escape(str(value)), escape="\\"))
        elif op in ("contains", "icontains"):
            pattern = f"%{_escape(str(value))}%"
            out.append(col.like(pattern, escape="\\") if op == "contains"
                       else col.ilike(pattern, escape="\\"))
        elif op == "startswith":
            out.append(col.like(f"{_escape(str(value))}%", escape="\\"))
        elif op == "endswith":
            out.append(col.like(f"%{_escape(str(value))}", escape="\\"))
        elif op == "in":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                msg = (f"{name}= takes a list of values, got {value!r}: write "
                       f"{name}=[{value!r}] (a string would be read letter by letter)")
                raise InvalidArgumentError(msg)
            out.append(col.in_(list(value)))
        elif op == "isnull":
            out.append(col.is_(None) if value else col.is_not(None))
        else:
            out.append({"gt": col > value, "gte": col >= value,
                        "lt": col < value, "lte": col <= value}[op])
    return out
