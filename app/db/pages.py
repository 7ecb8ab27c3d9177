"""A page of a tenant's rows, newest first: the one listing every collection route uses."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.deps import Page

Row = TypeVar("Row")


def newest_first(
    session: Session, model: type[Row], page: Page, *where: ColumnElement[bool]
) -> tuple[list[Row], int]:
    """The page of `model`'s rows matching `where`, newest first (id breaks ties), and how many
    match in all. `model` has `created_at` and `id` columns."""
    table: Any = model
    count = session.scalar(select(func.count()).select_from(model).where(*where)) or 0
    rows = session.scalars(
        select(model)
        .where(*where)
        .order_by(table.created_at.desc(), table.id.desc())
        .offset(page.offset)
        .limit(page.limit)
    )
    return list(rows), count
