"""PostgreSQL storage: SQL migrations, the async `Store`, the embedded server (see db/README.md)."""
