"""The shard stream's checks before Ray: an empty list, a missing shard and a tar without images
are refused with the URL named. (The stream itself: tests/integration/test_stream.py.)"""

from __future__ import annotations

import pytest
from helpers.shards import write_folder_shards, write_tar

from tokenmill.models.errors import UserError
from tokenmill.pipeline.shards.manifest import shard_urls
from tokenmill.pipeline.shards.stream import check_shards, open_stream


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """27 random 12x12 RGB PNGs in 3 class folders, written as uneven shards (maxcount 4)."""
    return write_folder_shards(tmp_path_factory.mktemp("stream"))


def test_checks_before_ray_name_the_url(tmp_path, folder_shards):
    root, _ = folder_shards
    urls = shard_urls(str(root / "shards"))
    with pytest.raises(UserError, match="empty"):
        check_shards([])
    missing = urls[0].replace("000000", "000099")
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        open_stream(urls + [missing])
    write_tar(tmp_path / "docs.tar", [("a.txt", b"x"), ("a.json", b"{}")])
    with pytest.raises(UserError, match=f"{tmp_path / 'docs.tar'} contains no images"):
        check_shards([str(tmp_path / "docs.tar")])

