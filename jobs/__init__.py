"""Thin entry points: the `tokenmill` CLI and `python -m jobs.<name>` modules for Ray jobs."""
