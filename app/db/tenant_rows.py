"""A tenant's rows: one of them by id (404 for anyone else's), and a page of them newest first,
as every resource route reads them."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.deps import Page
from app.errors import NotFound

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


def owned(
    session: Session, model: type[Row], tenant_id: str, row_id: str, resource: str,
    *where: ColumnElement[bool],
) -> Row:
    """The tenant's row `row_id` of `model` that matches `where` (NotFound naming `resource`,
    e.g. "eval_set", otherwise: another tenant's row is as absent as a missing one)."""
    table: Any = model
    row = session.scalar(
        select(model).where(table.id == row_id, table.tenant_id == tenant_id, *where)
    )
    if row is None:
        raise NotFound(f"{resource.replace('_', ' ')} {row_id} not found", resource=resource,
                       id=row_id)
    return row
