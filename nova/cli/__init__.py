"""The `nova` command line."""
