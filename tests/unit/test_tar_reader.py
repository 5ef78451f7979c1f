"""The shard tar reader against `tarfile`: same members in every format, damage reported."""

from __future__ import annotations

import io
import tarfile

import pytest

from tokenmill.pipeline.shards.tar_reader import TarFormatError, iter_files
from tokenmill.pipeline.shards.wds_io import iter_samples

NAMES = ["a.png", "b/c.cls", "x" * 150 + ".json", "ü/é.txt", "p" * 90 + "/" + "q" * 90 + ".png"]
USTAR_NAMES = ["a.png", "b/c.cls", "p" * 90 + "/" + "q" * 90 + ".png"]  # ustar: no names > 100+155


def make_tar(fmt: int, compression: str = "", names: list[str] = NAMES) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=f"w:{compression}" if compression else "w", format=fmt) as archive:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for i, name in enumerate(names):
            data = bytes((i * 7 + j) % 251 for j in range(i * 700 + 1))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        archive.addfile(link)
    return out.getvalue()


def tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive if info.isfile()]


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile_in_every_format(fmt, compression):
    data = make_tar(fmt, compression, USTAR_NAMES if fmt == tarfile.USTAR_FORMAT else NAMES)
    expected = tarfile_members(data)
    assert len(expected) >= 3
    assert list(iter_files(io.BytesIO(data))) == expected


def test_damage_is_raised_with_the_members_read_before_it():
    data = make_tar(tarfile.GNU_FORMAT)
    cases = {
        b"": ("empty tar", 0),
        bytes(1024): ("empty tar", 0),
        data[:100]: ("unexpected end of data in a header", 0),
        data[:1536]: ("no end-of-archive marker", 1),  # cut exactly after the first member
        data[:2500]: ("unexpected end of data", 1),  # inside the second member's data
        b"PK\x03\x04" + bytes(600): ("bad checksum", 0),  # a zip, not a tar
    }
    for damaged, (reason, members) in cases.items():
        with pytest.raises(TarFormatError, match=reason) as raised:
            list(iter_files(io.BytesIO(damaged)))
        assert raised.value.members == members, reason


def test_a_bad_header_mid_archive_is_damage_not_the_end():
    data = bytearray(make_tar(tarfile.USTAR_FORMAT, names=["a.png", "b.png"]))
    data[1536 + 10] ^= 0xFF  # second file's header (after folder, a.png header, a.png data)
    (damage,) = list(iter_samples(io.BytesIO(bytes(data))))  # tarfile would yield "a" and stop quietly
    assert (damage.reason, damage.key) == ("truncated tar: bad checksum", "a")  # "a" may miss members
