"""Thin entry points: the `tokenmill` CLI and `python -m tokenmill.jobs.<name>` modules for Ray jobs."""
