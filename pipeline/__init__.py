"""Data in and tokens out: sources, shards, Ray Data streams, token store, tracking, configs."""

import os as _os

if _os.environ.get("TOKENMILL_STORAGE_FAULTS"):  # tests: storage faults in every process (pipeline.storage_faults)
    from pipeline import storage_faults as _storage_faults

    _storage_faults.install()
