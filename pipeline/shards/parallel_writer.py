"""`tokenmill shard --workers N`: N Ray actors write shards side by side; the driver keeps the manifest.

The seeded order is planned once, exactly as `write_shards` plans it; each split's planned
records are then cut into N contiguous slices, and worker w writes its slice as its own shard
sequence `[prefix-]SPLIT-wWWW-IIIIII.tar` (the same shard writer, `_ShardJob.write_shard`). The
driver alone writes `manifest.json`: after each shard a worker finishes, the committed shards
sorted by (split, worker, index), so the final manifest does not depend on which worker finished
first. Rerunning resumes every worker after its last committed shard (`plan_end` of its slice).

Determinism: the same source, settings, seed and N give byte-identical tars and manifest. A
different N cuts the same planned order at other places, so shard names, boundaries and
sha256s (and the dataset identity) change, though the samples and their concatenated order do
not; N is recorded in the manifest's settings and a rerun with another N is refused.
"""

from __future__ import annotations

import sys
from typing import Any

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.storage import join
from tokenmill.pipeline.shards.manifest import SPLITS, read_manifest, write_manifest
from tokenmill.pipeline.shards.writer import ShardSettings, _ShardJob, default_maxcount, plan


def worker_shard_name(prefix: str, split: str, worker: int, index: int) -> str:
    return f"{prefix + '-' if prefix else ''}{split}-w{worker:03d}-{index:06d}.tar"


def slices(records: list[int], workers: int) -> list[list[int]]:
    """`records` cut into `workers` contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(len(records), workers)
    out, start = [], 0
    for w in range(workers):
        end = start + base + (1 if w < extra else 0)
        out.append(records[start:end])
        start = end
    return out


class ShardWriterActor:
    """Writes one worker's shard sequence, one shard per `write_next` call."""

    def __init__(self, source, dest: str, settings: ShardSettings, storage_options: dict | None, worker: int,
                 records: dict[str, list[int]], resume: dict[str, tuple[int, int]]):
        from tokenmill.pipeline.runtime import faults

        faults.install_from_env()  # tests: storage faults in this worker process too
        self.job = _ShardJob(source, dest, settings, storage_options)
        self.worker, self.records = worker, records
        self.position = dict(resume)  # split -> (next record in the slice, next shard index)

    def write_next(self) -> dict[str, Any] | None:
        """The next shard's manifest entry (with `worker` and `skipped`), or None when done."""
        for split in SPLITS:
            start, index = self.position.get(split, (0, 0))
            if start >= len(self.records.get(split, [])):
                continue
            name = worker_shard_name(self.job.settings.prefix, split, self.worker, index)
            self.job.skipped = []
            entry = self.job.write_shard(name, split, self.records[split], start, _NoBar())
            self.position[split] = (entry["plan_end"], index + 1)
            return dict(entry, worker=self.worker, index=index, skipped=self.job.skipped)
        return None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _resume_points(shards: list[dict[str, Any]], workers: int) -> list[dict[str, tuple[int, int]]]:
    """Per worker, per split: (next record in its slice, next shard index) after committed shards."""
    points: list[dict[str, tuple[int, int]]] = [{} for _ in range(workers)]
    for shard in shards:
        points[shard["worker"]][shard["split"]] = (shard["plan_end"], shard["index"] + 1)
    return points


def _ordered(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["worker"], s["index"]))


def write_shards_parallel(src: str, dest: str, settings: ShardSettings | None, storage_options: dict | None,
                          workers: int, progress: bool = True) -> dict[str, Any]:
    """`write_shards` with `workers` Ray actors; the same summary."""
    import ray
    from tqdm import tqdm

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.sources import open_source

    settings = settings or ShardSettings()
    if settings.maxcount is None:
        settings = settings.model_copy(update=dict(maxcount=default_maxcount(src)))
    source = open_source(src, class_from_subfolder=settings.class_from_subfolder, labels=settings.labels,
                         storage_options=storage_options)
    planned = {split: slices(records, workers) for split, records in plan(source, settings).items()}
    fixed = dict(source=src, **settings.model_dump(), workers=workers)
    manifest = read_manifest(dest, storage_options)
    if manifest is not None and manifest.get("settings") != fixed:
        changed = sorted(k for k in fixed if manifest.get("settings", {}).get(k) != fixed.get(k))
        raise UserError(f"{dest} already holds shards written with different settings ({', '.join(changed)}); "
                        "use another DEST or the same options (a different --workers cuts other shards)")
    manifest = manifest or dict(format="webdataset", version=1, source=src, settings=fixed,
                                classes=source.classes, shards=[], complete=False)
    resumed = len(manifest["shards"])
    points = _resume_points(manifest["shards"], workers)
    done = sum(sum(p[0] for p in point.values()) for point in points)

    ensure_ray()
    source_ref = ray.put(source)
    actor_class = ray.remote(num_cpus=1)(ShardWriterActor)
    actors = [actor_class.remote(source_ref, dest, settings, storage_options, w,
                                 {split: planned[split][w] for split in SPLITS}, points[w]) for w in range(workers)]
    running = {actor.write_next.remote(): actor for actor in actors}
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(source), initial=done, desc=f"shard {dest} ({workers} workers)", unit="img",
              file=sys.stderr, disable=not progress) as bar:
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready)
            entry = ray.get(ready)
            if entry is None:
                continue
            bar.update(entry["plan_end"] - points[entry["worker"]].get(entry["split"], (0, 0))[0])
            points[entry["worker"]][entry["split"]] = (entry["plan_end"], entry["index"] + 1)
            skipped.extend(entry.pop("skipped"))
            if entry["count"]:
                manifest["shards"] = _ordered(manifest["shards"] + [entry])
                write_manifest(dest, manifest, storage_options)  # commit point of this shard
            running[actor.write_next.remote()] = actor
    for actor in actors:
        ray.kill(actor)
    manifest["complete"] = True
    write_manifest(dest, manifest, storage_options)
    return dict(dest=dest, manifest=join(dest, "manifest.json"), shards=len(manifest["shards"]),
                shards_written=len(manifest["shards"]) - resumed, shards_already_complete=resumed,
                samples=manifest["samples"], splits=manifest["splits"], image_stats=manifest["image_stats"],
                skipped=skipped, workers=workers)
