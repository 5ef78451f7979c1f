"""Pretrained weights from an fsspec URL (pipeline/runtime/weights.py): checked against the sha256
configured next to the URL, cached per node; a missing file or a wrong hash is one UserError.
memory:// stands for a remote store (s3://, https://): the same code path, no server."""

from __future__ import annotations

import hashlib
import uuid

import fsspec
import pytest

from tokenmill.models.errors import UserError
from tokenmill.models.lpips import LPIPSWeights, resolve_lpips_weights
from tokenmill.pipeline.runtime.weights import CACHE_ENV, fetch_weights, local_lpips_weights

PAYLOAD = b"weights " * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def remote():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-wide)."""
    fs = fsspec.filesystem("memory")
    root = f"memory://weights-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(url: str, data: bytes) -> str:
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def test_a_remote_file_is_checked_cached_and_reused(remote, tmp_path):
    url = put(f"{remote}/vgg.pth", PAYLOAD)
    local = fetch_weights(url, PAYLOAD_SHA, "loss.perceptual.vgg_path", cache=tmp_path)
    assert local == tmp_path / PAYLOAD_SHA / "vgg.pth" and local.read_bytes() == PAYLOAD
    fsspec.filesystem("memory").rm(url)  # gone remotely: the node's checked copy still serves
    assert fetch_weights(url, PAYLOAD_SHA, "loss.perceptual.vgg_path", cache=tmp_path) == local
    assert sorted(p.name for p in local.parent.iterdir()) == [".vgg.pth.lock", "vgg.pth"]  # no partial download left


def test_a_local_file_or_file_url_is_used_in_place(tmp_path):
    path = tmp_path / "lin.pth"
    path.write_bytes(PAYLOAD)
    assert fetch_weights(f"file://{path}", PAYLOAD_SHA, "x", cache=tmp_path / "cache") == path
    assert fetch_weights(str(path), PAYLOAD_SHA[:8], "x", cache=tmp_path / "cache") == path  # a published prefix
    assert not (tmp_path / "cache").exists()


def test_a_wrong_hash_is_one_line_and_leaves_nothing_cached(remote, tmp_path):
    url = put(f"{remote}/vgg.pth", PAYLOAD)
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(UserError, match=r"loss.perceptual.vgg_path: memory://.*vgg.pth has sha256 .*expected") as err:
        fetch_weights(url, wrong, "loss.perceptual.vgg_path", cache=tmp_path)
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / wrong).iterdir()] == [".vgg.pth.lock"]  # no partial, no cached file
    local = tmp_path / "vgg.pth"
    local.write_bytes(PAYLOAD)
    with pytest.raises(UserError, match="expected"):
        fetch_weights(str(local), wrong, "x", cache=tmp_path)
    with pytest.raises(UserError, match="not 8 to 64 hex digits"):
        fetch_weights(url, "sha256:abc", "x", cache=tmp_path)


def test_a_missing_file_is_one_line(remote, tmp_path):
    for url in (f"{remote}/nope.pth", str(tmp_path / "nope.pth")):
        with pytest.raises(UserError, match=r"^--lpips-vgg: .*nope.pth does not exist$"):
            fetch_weights(url, PAYLOAD_SHA, "--lpips-vgg", cache=tmp_path)


def test_lpips_config_urls_resolve_to_checked_local_files(remote, tmp_path, monkeypatch):
    """A train config's loss.perceptual with URLs and their hashes loads like local paths; without
    a configured hash a remote file must be the published one."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    vgg, lin = put(f"{remote}/vgg.pth", b"vgg" * 100), put(f"{remote}/lin.pth", b"lin" * 100)
    config = LPIPSWeights(vgg_path=vgg, lin_path=lin, vgg_sha256=hashlib.sha256(b"vgg" * 100).hexdigest(),
                          lin_sha256=hashlib.sha256(b"lin" * 100).hexdigest())
    resolved = resolve_lpips_weights(local_lpips_weights(config))
    assert resolved.vgg_path.parent.parent == tmp_path and resolved.lin_path.read_bytes() == b"lin" * 100
    assert (resolved.vgg_sha256, resolved.lin_sha256) == (config.vgg_sha256, config.lin_sha256)
    with pytest.raises(UserError, match=r"^loss.perceptual.lin_path: .* expected a78928a0"):
        local_lpips_weights(LPIPSWeights(lin_path=lin, verify_sha256=False))


def test_train_with_a_wrong_hash_exits_2_in_one_line_before_training(remote, tmp_path, capsys, monkeypatch):
    from tokenmill.jobs.cli import main as cli_main

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = put(f"{remote}/vgg16-397923af.pth", PAYLOAD)
    code = cli_main(["train", "configs/debug_vqgan.yaml", "--set", "loss.perceptual_weight=1.0",
                     "--set", f"loss.perceptual.vgg_path={url}", "--set", f"loss.perceptual.vgg_sha256={'f' * 64}",
                     "--set", f"run.root={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    (line,) = err
    assert line.startswith("tokenmill train: error: loss.perceptual.vgg_path: memory://") and "expected ffff" in line, line
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray").exists()


def test_install_weights_bakes_a_checked_copy(remote, tmp_path):
    """infra/Dockerfile's LPIPS_*_URL build arguments: the checked bytes land at the given path."""
    from tokenmill.pipeline.runtime.weights import install_weights

    url = put(f"{remote}/lin.pth", PAYLOAD)
    dest = tmp_path / "hub" / "checkpoints" / "lpips_vgg_v0.1.pth"
    assert install_weights(url, PAYLOAD_SHA, dest) == dest and dest.read_bytes() == PAYLOAD
    with pytest.raises(UserError, match="expected"):
        install_weights(url, "a" * 64, tmp_path / "other.pth")
    assert not (tmp_path / "other.pth").exists()
