"""The persister: drains Redis event streams into Postgres, the source of truth."""
