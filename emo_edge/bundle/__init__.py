"""The bundle on disk: its files and hashes (files) and its schemas and consistency checks (schema)."""
