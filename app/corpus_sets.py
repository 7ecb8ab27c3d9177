"""What eval sets and query sets share: files bound to one of the tenant's live corpora.

Read, list and delete are the same for both; only their upload rules differ (each package's
service module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from app.corpora.service import on_live_corpus
from app.db.base import utcnow
from app.db.models import EvalSet, QuerySet, Tenant
from app.db.tenant_rows import newest_first, owned
from app.dependants import active_jobs_using, refuse_if_used
from app.deps import Page

Row = TypeVar("Row", EvalSet, QuerySet)


@dataclass(frozen=True)
class CorpusBound(Generic[Row]):
    model: type[Row]
    kind: str  # "eval_set" or "query_set": the error's resource name and the jobs' column

    def prefix(self, row_id: str) -> str:
        """Object-store folder of the set's files."""
        return f"{self.kind}s/{row_id}/"

    def get(self, session: Session, tenant: Tenant, row_id: str) -> Row:
        """The tenant's set `row_id` on a live corpus (404 otherwise)."""
        return owned(session, self.model, tenant.id, row_id, self.kind,
                     on_live_corpus(self.model.corpus_id), self.model.deleted_at.is_(None))

    def list(self, session: Session, tenant: Tenant, page: Page) -> tuple[list[Row], int]:
        """A page of the tenant's sets, newest first, and their total."""
        return newest_first(session, self.model, page, self.model.tenant_id == tenant.id,
                            on_live_corpus(self.model.corpus_id),
                            self.model.deleted_at.is_(None))

    def delete(self, session: Session, tenant: Tenant, row_id: str) -> Row:
        """Mark a set no unfinished job uses deleted (409 naming them otherwise); the caller
        removes its files after the commit. Finished jobs keep naming it."""
        row = self.get(session, tenant, row_id)
        users = active_jobs_using(session, tenant.id, **{f"{self.kind}_id": row.id})
        refuse_if_used(self.kind, row.id, users)
        row.deleted_at = utcnow()
        session.flush()
        return row


EVAL_SETS = CorpusBound(EvalSet, "eval_set")
QUERY_SETS = CorpusBound(QuerySet, "query_set")
