"""`tokenmill tokenize`: a whole sharded dataset into a Zarr token store on a Ray Data actor pool
(`driver`: `tokenize_dataset` and its actor; `pool`: `plan_pool`)."""
