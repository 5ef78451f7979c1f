"""Hand-made shards for the reader and stream tests: PNG bytes, tars from (name, bytes) members,
a class-folder source written as uneven shards, a dirty shard (a corrupt image, a sample
without an image, a cut inside the last sample), and the samples of a shard folder in the order readers see them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tokenmill.pipeline.shards.manifest import read_manifest
from tokenmill.pipeline.shards.problems import CORRUPT_IMAGE, NO_IMAGE, TRUNCATED_TAR


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of (member name, data) pairs, in that order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    Path(path).write_bytes(tar_bytes(members))


def write_folder_shards(root: Path) -> tuple[Path, dict[str, tuple[np.ndarray, int]]]:
    """27 random 12x12 RGB PNGs in 3 class folders under root/src, written as uneven shards
    (maxcount 4, a quarter val) to root/shards; returns (root, {key: (pixels, class)})."""
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    rng = np.random.default_rng(0)
    expected = {}
    for c, name in enumerate(["a", "b", "c"]):
        (root / "src" / name).mkdir(parents=True)
        for i in range(9):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "src" / name / f"{i}.png")
            expected[f"{name}_{i}"] = (pixels, c)
    write_shards(str(root / "src"), str(root / "shards"),
                 ShardSettings(maxcount=4, val_fraction=0.25, class_from_subfolder=True), progress=False)
    return root, expected


# The dirty shard: grey 16x16 pixels of its good samples, and the kind of problem reported per key.
DIRTY_GOOD = {f"g{i}": np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8) for i in range(6)}
DIRTY_KINDS = {"bad": CORRUPT_IMAGE, "text": NO_IMAGE, "g4": TRUNCATED_TAR}


def write_dirty_shard(path: Path) -> str:
    """g0..g5 grey PNGs, a corrupt PNG ("bad"), a sample without an image ("text"), and the tar
    cut inside g5's data: g4 (which may lack members behind the cut) and g5 are lost, and the
    truncation is reported under g4, the sample being read. Returns the path as a string."""
    good = DIRTY_GOOD
    members = [("g0.png", png(good["g0"])), ("g0.cls", b"3"), ("bad.png", png(good["g1"])[:-40]),
               ("g1.png", png(good["g1"])), ("text.txt", b"no image"), ("text.cls", b"1")]
    members += [(f"g{i}.png", png(good[f"g{i}"])) for i in range(2, 6)]
    whole = tar_bytes(members)
    cut = whole.index(png(good["g5"])) + 20  # inside g5's PNG data
    path.write_bytes(whole[:cut])
    return str(path)


def samples_in_shard_order(dest: Path) -> list[tuple[str, str, int]]:
    """(split, key, label) of every sample of `dest`, in manifest then tar order (the order readers see)."""
    samples = []
    for entry in read_manifest(str(dest))["shards"]:
        with tarfile.open(dest / entry["url"]) as tar:
            samples += [(entry["split"], m.name.split(".")[0], int(tar.extractfile(m).read()))
                        for m in tar if m.name.endswith(".cls")]
    return samples
