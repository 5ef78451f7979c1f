"""Shard writing, manifest, resume after interruption, index and inspect (no Ray). (The builtin
MNIST source: tests/integration/test_builtin_shards.py.)"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from helpers.shards import samples_in_shard_order
from PIL import Image

import tokenmill.pipeline.shards.writer as shard_writer
from tokenmill.jobs.cli import main
from tokenmill.pipeline.shards.manifest import (
    manifest_identity,
    read_manifest,
    scan_shard,
    shard_urls,
    shards_for_split,
)
from tokenmill.pipeline.shards.writer import ShardSettings, split_of, write_shards


def make_folder(root, n_per_class=9, classes=("cat", "dog", "emu")):
    """PNG images in class sub-folders (one nested deeper), mixed grey/RGB and sizes;
    returns {key: pixels (H, W, C)} as the writer should store them."""
    rng = np.random.default_rng(0)
    expected = {}
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            sub = root / name / ("deep" if i == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            shape = (5 + i, 7 + c) if i % 3 == 0 else (6, 6 + i, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"img{i}.png")
            key = f"{name}_deep_img{i}" if i == 0 else f"{name}_img{i}"
            expected[key] = (pixels[:, :, None] if pixels.ndim == 2 else pixels, c)
    return expected


def test_folder_to_shards_manifest_and_scan(tmp_path):
    expected = make_folder(tmp_path / "src")
    summary = write_shards(str(tmp_path / "src"), str(tmp_path / "out"),
                           ShardSettings(maxcount=4, val_fraction=0.3, class_from_subfolder=True), progress=False)
    manifest = read_manifest(str(tmp_path / "out"))
    assert summary["samples"] == manifest["samples"] == len(expected) == 27
    assert manifest["classes"] == ["cat", "dog", "emu"] and manifest["complete"]
    assert manifest["image_stats"]["channels"] == {"1": 9, "3": 18}
    for split in ("train", "val"):
        counts = [s["count"] for s in manifest["shards"] if s["split"] == split]
        assert all(c == 4 for c in counts[:-1]) and 0 < counts[-1] <= 4  # uneven last shard
    seen = {}
    for url in shard_urls(str(tmp_path / "out")):
        entry = next(s for s in manifest["shards"] if url.endswith(s["url"]))
        scan = scan_shard(url, split=entry["split"])
        assert scan.problems == [] and scan.entry["sha256"] == entry["sha256"] and scan.entry["count"] == entry["count"]
        with tarfile.open(url) as tar:
            names = tar.getnames()
            for name in names:
                key, ext = name.split(".", 1)
                data = tar.extractfile(name).read()
                if ext == "png":
                    pixels = np.asarray(Image.open(io.BytesIO(data)))
                    seen[key] = pixels[:, :, None] if pixels.ndim == 2 else pixels
                    assert split_of(key, 0.3) == entry["split"]
                elif ext == "cls":
                    assert int(data) == expected[key][1]
                elif ext == "json":
                    meta = json.loads(data)
                    assert meta["key"] == key and meta["original_height"] == expected[key][0].shape[0]
    assert sorted(seen) == sorted(expected)
    assert all(np.array_equal(seen[k], expected[k][0]) for k in expected)


def test_seeded_order_is_reproducible_and_no_shuffle_keeps_key_order(tmp_path):
    make_folder(tmp_path / "src", n_per_class=10)  # keys sorted = class-sorted (cat_, dog_, emu_)
    src = str(tmp_path / "src")

    def shard(name: str, *options: str) -> dict[str, list[str]]:
        """Keys of each split in shard order."""
        assert main(["shard", src, str(tmp_path / name), "--maxcount", "4", "--class-from-subfolder",
                     "--no-progress", *options]) == 0
        samples = samples_in_shard_order(tmp_path / name)
        assert all(split == split_of(key, 0.1) for split, key, _ in samples)  # val chosen by key hash, as before
        return {split: [key for s, key, _ in samples if s == split] for split in ("train", "val")}

    a, again, other, plain = shard("a", "--seed", "3"), shard("b", "--seed", "3"), shard("c", "--seed", "4"), \
        shard("d", "--no-shuffle")
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(tars) > 2
    assert all((tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes() for t in tars)
    assert a == again and a["train"] != other["train"]
    for split in ("train", "val"):
        assert sorted(a[split]) == sorted(other[split]) == plain[split] and len(plain[split]) > 1
    assert a["train"] != plain["train"] and {k.split("_")[0] for k in a["train"][:9]} == {"cat", "dog", "emu"}
    settings = read_manifest(str(tmp_path / "a"))["settings"]
    assert (settings["shuffle"], settings["seed"]) == (True, 3)
    assert read_manifest(str(tmp_path / "d"))["settings"]["shuffle"] is False


def test_arrays_with_labels_and_maxsize(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=np.arange(30) % 5)
    summary = write_shards(str(tmp_path / "data.npz"), f"memory://{tmp_path.name}/arr",
                           ShardSettings(maxsize=800, val_fraction=0.0), progress=False)
    manifest = read_manifest(f"memory://{tmp_path.name}/arr")
    assert summary["samples"] == 30 and summary["splits"] == {"train": {"shards": len(manifest["shards"]), "samples": 30}}
    assert len(manifest["shards"]) > 2  # maxsize split them
    assert shards_for_split(f"memory://{tmp_path.name}/arr", "train")[0].startswith("memory://")


class Interrupted(Exception):
    pass


def test_interrupted_runs_resume_without_duplicates(tmp_path, monkeypatch):
    make_folder(tmp_path / "src", n_per_class=10)
    settings = ShardSettings(maxcount=3, val_fraction=0.2, seed=11)  # shuffled: the resume replans the same order
    write_shards(str(tmp_path / "src"), str(tmp_path / "clean"), settings, progress=False)
    clean = read_manifest(str(tmp_path / "clean"))
    firsts = [s["first_key"] for s in clean["shards"] if s["split"] == "train"]
    assert firsts != sorted(firsts)

    real_manifest, real_encode = shard_writer.write_manifest, shard_writer.encode_image
    calls = {"manifest": 0, "encode": 0}

    def crash_after_commit(*args, **kwargs):  # shard moved into place, manifest not yet updated
        calls["manifest"] += 1
        if calls["manifest"] == 3:
            raise Interrupted()
        return real_manifest(*args, **kwargs)

    def crash_mid_shard(*args, **kwargs):  # a half-written .partial shard is left behind
        calls["encode"] += 1
        if calls["encode"] == 17:
            raise Interrupted()
        return real_encode(*args, **kwargs)

    dest = str(tmp_path / "out")
    for name, crash in [("write_manifest", crash_after_commit), ("encode_image", crash_mid_shard)]:
        monkeypatch.setattr(shard_writer, name, crash)
        with pytest.raises(Interrupted):
            write_shards(str(tmp_path / "src"), dest, settings, progress=False)
        monkeypatch.undo()
        assert not read_manifest(dest)["complete"]
    summary = write_shards(str(tmp_path / "src"), dest, settings, progress=False)
    assert summary["shards_already_complete"] > 0 and summary["shards_written"] > 0
    resumed = read_manifest(dest)
    assert [(s["url"], s["count"], s["sha256"]) for s in resumed["shards"]] == \
           [(s["url"], s["count"], s["sha256"]) for s in clean["shards"]]
    assert all((tmp_path / "out" / s["url"]).read_bytes() == (tmp_path / "clean" / s["url"]).read_bytes()
               for s in clean["shards"])
    keys = [k for url in shard_urls(dest) for k in tarfile.open(url).getnames() if k.endswith(".png")]
    assert len(keys) == len(set(keys)) == 30
    assert not list((tmp_path / "out").glob("*.partial"))
    assert write_shards(str(tmp_path / "src"), dest, settings, progress=False)["shards_written"] == 0


def test_rerun_with_other_settings_is_refused(tmp_path):
    write_shards("builtin:digits", str(tmp_path / "d"), ShardSettings(maxcount=1000), progress=False)
    assert main(["shard", "builtin:digits", str(tmp_path / "d"), "--maxcount", "10", "--no-progress"]) == 2
    assert main(["shard", "builtin:digits", str(tmp_path / "d"), "--seed", "1", "--no-progress"]) == 2
    assert main(["shard", "builtin:digits", str(tmp_path / "d"), "--no-shuffle", "--no-progress"]) == 2
    assert main(["shard", "builtin:digits", str(tmp_path / "d"), "--no-progress"]) == 0  # defaults: maxcount 1000


def test_index_existing_shards_and_inspect_verify(tmp_path, capsys):
    make_folder(tmp_path / "src", n_per_class=4)
    dest = tmp_path / "out"
    write_shards(str(tmp_path / "src"), str(dest), ShardSettings(maxcount=5, val_fraction=0.0,
                                                                  image_format="jpg"), progress=False)
    written = read_manifest(str(dest))
    (dest / "manifest.json").unlink()
    assert main(["shard", "index", str(dest), "--no-progress", "--json", str(tmp_path / "index.json")]) == 0
    indexed = read_manifest(str(dest))
    assert [(s["url"], s["count"], s["sha256"]) for s in indexed["shards"]] == \
           [(s["url"], s["count"], s["sha256"]) for s in written["shards"]]
    assert indexed["formats"] == {"jpg": 12}
    # Same shards, other settings and source: the same identity (what stores and runs record).
    assert indexed["source"] != written["source"] and manifest_identity(indexed) == manifest_identity(written)

    # plant a corrupt JPEG and a sample with no image member in the first shard
    first = dest / indexed["shards"][0]["url"]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpg, data = next((m, d) for m, d in members if m.name.endswith(".jpg"))
    planted = [("bad.jpg", data[:20] + b"\x00" * 40), ("note.txt", b"hello")]  # header kept, pixels destroyed
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        for name, data in planted:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    capsys.readouterr()
    assert main(["inspect", str(dest), "--verify", "--json", str(tmp_path / "inspect.json")]) == 0
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["kind"] == "shards" and report["samples"] == 12 and not report["ok"]
    reasons = {p["key"]: p["reason"] for p in report["problems"]}
    assert reasons["bad"].startswith(("corrupt image data", "not an image")) and reasons["note"] == "no image member"
    assert any(p["reason"].startswith("sha256") for p in report["problems"])
    assert "problems" in capsys.readouterr().out


def test_cli_missing_source_exits_2(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "nope"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(tmp_path / "nope")]) == 2
