"""Database access: ORM models, engine and session factories, migrations."""
