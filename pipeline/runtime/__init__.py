"""What every job's process needs around its real work: the Ray connection (`ray_connection`),
quiet or verbose output (`console`), fsspec URLs (`storage`) and bounded retries of storage steps
(`storage_retry`), secrets kept out of records (`redaction`), and test fault injection (`faults`).

Nothing here knows about shards, tokens or models.
"""
