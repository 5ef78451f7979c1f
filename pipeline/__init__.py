"""Data in and tokens out: sources, shards, Ray Data streams, token store, tracking, configs.

Importing it does nothing else: test fault injection is installed explicitly by the process
entry points that need it (`pipeline.runtime.faults.install_from_env`).
"""
