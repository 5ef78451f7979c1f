"""The token store's Zarr v3 nodes as plain objects: built once in memory, then put one by one.

Every array names its dimensions (xarray needs them): per-row arrays share `sample`, a row's
own axes are `h`/`w` (`token` for 1-D codes, `latent` for 1-D latents), suffixed with the level
(`h_0`, `w_0`, ...) when levels differ in shape; codebook counts run over `code[_<level>]` and
the shard table over `input_shard`. Building in a `MemoryStore` and copying the objects lets
several drivers write the same bytes without ever deleting one another's (zarr's
`overwrite=True` removes the folder first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata, GroupMetadata

from tokenmill.pipeline.tokens.layout import Layout
from tokenmill.pipeline.tokens.store_format import MARKERS, REPORT, ROW_DIM, SHARD_DIM, ArraySpec

_ROW_AXES = {2: ("h", "w"), 3: ("channel", "h", "w")}
# `valid` (driver-written) is chunked in about this many rows, whole Zarr shards: a few objects
# at any store size, where one per Zarr shard would add an object per work unit.
VALID_BLOCK_ROWS = 1 << 22


def valid_chunk_rows(layout: Layout) -> int:
    return max(1, VALID_BLOCK_ROWS // layout.rows_per_zarr_shard) * layout.rows_per_zarr_shard


def dimension_names(spec: ArraySpec, variants: int = 1) -> tuple[str, ...]:
    """(`sample`, the row's axes...) of a token array; the level suffix keeps levels apart.
    With augmentation variants (`variants` > 1) a row's first axis is `variant`."""
    suffix = spec.name[len("codes"):] if spec.name.startswith("codes") else ""  # "", "_0", "_1", ...
    shape = spec.row_shape[1:] if variants > 1 else spec.row_shape
    one_d = ("token",) if spec.codebook_size is not None else ("latent",)
    axes = _ROW_AXES.get(len(shape), one_d if len(shape) == 1 else None)
    if axes is None:
        axes = tuple(f"axis_{i}" for i in range(len(shape)))
    return (ROW_DIM, *(["variant"] if variants > 1 else []), *(f"{axis}{suffix}" for axis in axes))


def counts_dimension(spec: ArraySpec) -> str:
    return "code" + (spec.name[len("codes"):] if spec.name.startswith("codes") else "")


def group_json(attributes: dict[str, Any], consolidated: ConsolidatedMetadata | None = None) -> bytes:
    """The `zarr.json` of a group with these attributes."""
    metadata = GroupMetadata(attributes=attributes, zarr_format=3, consolidated_metadata=consolidated)
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def build(attrs: dict[str, Any], claim: dict[str, Any], layout: Layout, specs: list[ArraySpec]) -> dict[str, bytes]:
    """Every object of a new store by key (`zarr.json`, `codes/zarr.json`, `shards/url/c/0`, ...):
    the arrays (empty), the shard table (filled), the `markers` group whose attributes are the
    creator's `claim`, and the empty `report` group."""
    objects: dict[str, Any] = {}
    group = zarr.create_group(store=zarr.storage.MemoryStore(objects), attributes=attrs, zarr_format=3)
    rows, shard = layout.rows, layout.rows_per_zarr_shard
    variants = int((attrs["lineage"].get("augment") or {}).get("variants", 1))  # encodings per sample
    for spec in specs:
        group.create_array(
            spec.name, shape=(rows, *spec.row_shape), dtype=spec.dtype, fill_value=0.0 if spec.codebook_size is None else 0,
            chunks=(layout.chunk_rows, *spec.row_shape), shards=(shard, *spec.row_shape), dimension_names=dimension_names(spec, variants),
        )
        if spec.codebook_size is not None:  # filled by `finalize`
            group.create_array(spec.counts_name, shape=(spec.codebook_size,), dtype="int64", chunks=(spec.codebook_size,),
                               fill_value=0, dimension_names=(counts_dimension(spec),))
    # One object per Zarr shard for the small per-row arrays the writers fill (no inner chunking needed).
    for name, dtype, fill in (("keys", str, ""), ("labels", "int64", -1)):
        group.create_array(name, shape=(rows,), dtype=dtype, fill_value=fill, chunks=(shard,), dimension_names=(ROW_DIM,))
    group.create_array("valid", shape=(rows,), dtype="bool", fill_value=False, chunks=(valid_chunk_rows(layout),),
                       dimension_names=(ROW_DIM,))
    _shard_table(group.create_group("shards"), layout)
    group.create_group(MARKERS, attributes=claim)
    group.create_group(REPORT)
    return {key: buffer.to_bytes() for key, buffer in objects.items()}


def _shard_table(table: zarr.Group, layout: Layout) -> None:
    n = len(layout.shards)
    columns = {
        "url": np.array([s.url for s in layout.shards], dtype=object),
        "split": np.array([s.split for s in layout.shards], dtype=object),
        "row_start": np.array([s.row_start for s in layout.shards], dtype=np.int64),
        "capacity": np.array([s.capacity for s in layout.shards], dtype=np.int64),
    }
    for name, values in columns.items():
        text = values.dtype == object
        arr = table.create_array(name, shape=(n,), dtype=str if text else values.dtype, chunks=(max(n, 1),),
                                 fill_value="" if text else 0, dimension_names=(SHARD_DIM,))
        arr[:] = values
    # good samples per input shard, -1 until `finalize`
    table.create_array("count", shape=(n,), dtype="int64", chunks=(max(n, 1),), fill_value=-1,
                       dimension_names=(SHARD_DIM,))


def consolidated_root(url_kwargs: dict[str, Any]) -> bytes:
    """The root `zarr.json` with consolidated metadata of the arrays, the shard table and the
    report, so `xarray.open_zarr(STORE)` and `zarr.open_group(STORE)` read one object. The
    markers group is listed without its children (one per input shard, each with its code
    counts: too many and too big to inline)."""
    root = zarr.open_group(mode="r", zarr_format=3, use_consolidated=False, **url_kwargs)
    members: dict[str, Any] = {}
    for name, node in root.members():
        metadata = node.metadata
        if isinstance(node, zarr.Group) and name != MARKERS:
            children = {child: sub.metadata for child, sub in node.members()}
            metadata = dataclasses.replace(metadata, consolidated_metadata=ConsolidatedMetadata(metadata=children))
        elif isinstance(node, zarr.Group):
            metadata = dataclasses.replace(metadata, consolidated_metadata=None)
        members[name] = metadata
    return group_json(dict(root.attrs), ConsolidatedMetadata(metadata=dict(sorted(members.items()))))


def store_objects(layout: Layout, specs: list[ArraySpec]) -> dict[str, int]:
    """The objects a finished store of this layout holds when every sample is good, by kind and
    in all: the nodes `build` creates (metadata, shard table), the Zarr shards the work units
    fill in each of their arrays (`specs` + keys + labels; all-fill ones are not stored), one
    marker per unit, and what finalize adds (`valid`'s chunks, shard counts, codebook counts)."""
    created = len(build({"lineage": {}}, {}, layout, specs))
    rps = layout.rows_per_zarr_shard
    filled = sum(-(-sum(s.count for s in unit.shards) // rps) for unit in layout.units)
    counts = {
        "metadata_and_shard_table": created,
        "unit_arrays": filled * (len(specs) + 2),
        "markers": sum(1 for unit in layout.units if unit.shards),
        "finalize": -(-layout.rows // valid_chunk_rows(layout)) + 1 + sum(s.codebook_size is not None for s in specs),
    }
    return {**counts, "total": sum(counts.values())}
