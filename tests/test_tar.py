"""align.data.tar reads what tarfile reads: every regular file's name and bytes, in order, from
ustar, GNU and pax archives (long and unicode names, empty and odd-sized files, folders and links
skipped), compressed ones through tarfile, from a pipe that returns short reads; a cut or damaged
archive raises, and shard reading counts the samples it lost."""
import gzip
import io
import tarfile

import pytest

from align.data.tar import tar_members

LONG = "deep/" * 30 + "name-longer-than-a-hundred-bytes.jpg"  # > 255 bytes: no ustar prefix can hold it


def _archive(fmt, compress=None):
    """A tar holding files of awkward names and sizes (a 125-byte name needs the ustar prefix), a folder, a symlink and a hard link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compress}" if compress else "w", format=fmt) as tar:
        folder = tarfile.TarInfo("sample")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        files = [("sample/000001.jpg", bytes(range(256)) * 7), ("sample/000001.json", b'{"id": "a"}'),
                 ("sample/000002.txt", b""), ("sample/000002.flac", b"x" * 512), ("p/" * 60 + "x.png", b"y" * 513)]
        if fmt != tarfile.USTAR_FORMAT:
            files += [(LONG, b"long"), ("caf\u00e9/\u00e9t\u00e9.txt", "\u00e9".encode())]
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            link = tarfile.TarInfo(f"sample/link{kind.decode()}.jpg")
            link.type, link.linkname = kind, "sample/000001.jpg"
            tar.addfile(link)
    return buffer.getvalue()


def _tarfile_members(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


class _Pipe(io.RawIOBase):
    """A stream that returns at most 100 bytes per read, as a pipe may."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def readable(self):
        return True

    def read(self, size=-1):
        size = 100 if size is None or size < 0 else min(size, 100)
        chunk = self.data[self.at:self.at + size]
        self.at += len(chunk)
        return chunk


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [None, "gz", "bz2", "xz"])
def test_members_equal_tarfiles(fmt, compress):
    data = _archive(fmt, compress)
    expected = _tarfile_members(data)
    assert len(expected) >= 5 and all(not name.endswith("/") for name, _ in expected)
    assert list(tar_members(io.BytesIO(data))) == expected
    assert list(tar_members(_Pipe(data))) == expected
    if fmt != tarfile.USTAR_FORMAT:
        assert (LONG, b"long") in expected


def test_an_empty_stream_or_archive_has_no_members():
    assert list(tar_members(io.BytesIO(b""))) == []
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w").close()
    assert list(tar_members(io.BytesIO(buffer.getvalue()))) == []


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_cut_archive_raises_after_the_whole_members(fmt):
    data = _archive(fmt)
    expected = _tarfile_members(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # cut inside a header, and inside each member's data
        cuts = [100, 512 + 300] + [m.offset_data + m.size // 2 for m in tar.getmembers() if m.size > 1]
    for cut in cuts:
        got = []
        with pytest.raises(EOFError):
            for member in tar_members(io.BytesIO(data[:cut])):
                got.append(member)
        assert got == expected[:len(got)], cut  # what came out before the cut is whole and right


def test_a_damaged_header_raises_naming_the_checksum():
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    data[512 + 10] ^= 0xFF  # the second header's name (the folder comes first)
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))


def test_a_shard_cut_mid_member_counts_its_lost_samples(tmp_path):
    from align.data.shards import TruncatedShard, tar_samples

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for n in range(4):
            for ext, payload in (("jpg", b"j" * 700), ("json", b"{}")):
                info = tarfile.TarInfo(f"{n:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    path = tmp_path / "cut.tar"
    path.write_bytes(buffer.getvalue()[:512 * 12])  # 5 blocks a sample: inside sample 2's jpg
    seen = []
    with pytest.raises(TruncatedShard) as raised:
        for key, files in tar_samples(str(path)):
            seen.append((key, sorted(files)))
    assert seen == [("000000", ["jpg", "json"]), ("000001", ["jpg", "json"])]
    assert raised.value.reason == "truncated_shard"
    gz = tmp_path / "whole.tar.gz"
    gz.write_bytes(gzip.compress(buffer.getvalue()))
    assert [key for key, _ in tar_samples(str(gz))] == [f"{n:06d}" for n in range(4)]
