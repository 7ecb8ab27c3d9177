"""`tailor` command line: tenants and keys, migrations, the OpenAPI document, the API server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _create_tenant(args: argparse.Namespace) -> int:
    from app.db.session import session_scope
    from app.tenants.service import create_tenant

    with session_scope() as session:
        tenant, key = create_tenant(session, args.name)
    print(f"tenant_id: {tenant.id}")
    print(f"api_key:   {key}")
    print("The key is shown only once; store it now.", file=sys.stderr)
    return 0


def _create_key(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import KeyScope, Tenant
    from app.db.session import session_scope
    from app.tenants.service import create_api_key

    expires_at = utcnow() + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    with session_scope() as session:
        tenant = session.get(Tenant, args.tenant_id)
        if tenant is None:
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        row, key = create_api_key(session, tenant, name=args.name, scope=KeyScope(args.scope),
                                  expires_at=expires_at)
    print(f"key_id:  {row.id}")
    print(f"api_key: {key}")
    return 0


def _set_quota(args: argparse.Namespace) -> int:
    from app.db.models import Tenant
    from app.db.session import session_scope

    with session_scope() as session:
        tenant = session.get(Tenant, args.tenant_id)
        if tenant is None:
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        # 0 returns the quota to the deployment's setting.
        if args.concurrent_jobs is not None:
            tenant.max_concurrent_jobs = args.concurrent_jobs or None
        if args.stored_bytes is not None:
            tenant.max_stored_bytes = args.stored_bytes or None
        jobs, stored = tenant.max_concurrent_jobs, tenant.max_stored_bytes
    print(f"concurrent_jobs: {jobs or 'the setting'}")
    print(f"stored_bytes:    {stored or 'the setting'}")
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from app.db.session import session_scope
    from app.tenants.service import revoke_api_key

    with session_scope() as session:
        revoked = revoke_api_key(session, args.key_id)
    print("revoked" if revoked else f"no active key {args.key_id}", file=sys.stderr)
    return 0 if revoked else 1


def _migrate(args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade

    upgrade(revision=args.revision)
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from app.openapi import openapi_document, render_yaml, write_openapi

    if args.write:
        print(write_openapi(), file=sys.stderr)
    else:
        sys.stdout.write(render_yaml(openapi_document()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.settings import get_settings

    settings = get_settings()
    uvicorn.run(
        "app.main:app",
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=args.workers,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per task)."""
    parser = argparse.ArgumentParser(prog="tailor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tenant = commands.add_parser("create-tenant", help="create a tenant and print its API key")
    tenant.add_argument("name")
    tenant.set_defaults(run=_create_tenant)

    key = commands.add_parser("create-key", help="add an API key to a tenant")
    key.add_argument("tenant_id")
    key.add_argument("--name", default="", help="to recognise the key in lists")
    key.add_argument("--scope", choices=("train", "embed"), default="train",
                     help="train: every route; embed: the embedding and rerank routes only")
    key.add_argument("--expires-in-days", type=int, help="default: until revoked")
    key.set_defaults(run=_create_key)

    quota = commands.add_parser("set-quota", help="set a tenant's own quotas (0: the setting)")
    quota.add_argument("tenant_id")
    quota.add_argument("--concurrent-jobs", type=int, help="jobs queued or running at once")
    quota.add_argument("--stored-bytes", type=int, help="bytes of uploads stored")
    quota.set_defaults(run=_set_quota)

    revoke = commands.add_parser("revoke-key", help="revoke an API key by its key_ id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_revoke_key)

    migrate = commands.add_parser("migrate", help="apply database migrations (alembic upgrade)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(run=_migrate)

    openapi = commands.add_parser("openapi", help="print the OpenAPI document as YAML")
    openapi.add_argument("--write", action="store_true", help="write openapi.yaml instead")
    openapi.set_defaults(run=_openapi)

    serve = commands.add_parser("serve", help="run the API server (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tailor` and `python -m app.cli`."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
