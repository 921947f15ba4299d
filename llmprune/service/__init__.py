"""The pruning service: jobs submitted over HTTP, kept in SQLite, run in worker processes."""
