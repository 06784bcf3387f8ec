"""Fast unit tests (CPU, one process)."""
