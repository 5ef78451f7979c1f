"""`tokenmill tokenize`: a whole sharded dataset into a Zarr token store on a Ray Data actor pool.

`options` (`TokenizeOptions`: what the run is asked for, checked once), `driver`
(`tokenize_dataset`: manifest, layout, store creation, the pool, finalize), `pool` (`plan_pool`:
how many actors, on what, from the cluster's resources) and `actor` (`ShardEncoderActor`: one work
unit per call). This package joins the shard and token subsystems; `pipeline.tokens` never imports Ray.
"""
