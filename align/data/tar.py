"""Read the members of a tar stream fast: ``(name, bytes)`` of every regular file, in order.

Shards are read sample by sample in every dataloader worker, and ``tarfile`` in stream mode
spends about 50 µs of Python on each member's header (it decodes every field of it), as much as
decoding a small JPEG. This reader takes from a header only what a shard needs: the name (with
the ustar prefix, a GNU long name or a pax ``path``), the size (octal, GNU base-256 or pax
``size``) and the type, and checks the header's checksum as ``tarfile`` does.

Formats: POSIX ustar, GNU and pax (``tarfile``'s three; GNU tar, bsdtar and webdataset's
writers make these). Regular files (types ``0``, NUL, ``7``) are yielded; directories, links,
devices, FIFOs, GNU sparse files, volume labels and pax global headers are skipped. A compressed tar (gzip,
bzip2, xz or zstd, found by its magic bytes) is handed to ``tarfile`` (``r|*``), which
decompresses it.

Errors: a stream that ends inside a header raises ``EOFError``, inside a member's data
``TruncatedMember`` (an ``EOFError`` naming the member, so a reader knows what came before it is
whole); a header
whose checksum does not match, or a malformed size or pax record, raises ``ValueError``. An
empty stream, or one that ends at a header boundary without the two zero blocks, simply ends
(as ``tarfile`` does).

Example::

    with open("shard-000000.tar", "rb") as stream:
        for name, data in tar_members(stream):
            ...
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Dict, Iterator, Optional, Tuple

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


class TruncatedMember(EOFError):
    """The stream ended inside the data of the member ``name`` (its header was whole)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes (a pipe may return fewer per read); EOFError if the stream ends."""
    data = stream.read(size)
    if len(data) == size:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            raise EOFError(f"the tar ends inside {what} ({got} of {size} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _number(field: bytes, what: str) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"tar header: {what} field {field!r} is not octal") from None


def _check_sum(header: bytes) -> None:
    stored = _number(header[148:156], "checksum")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the field itself counts as spaces
    if stored == unsigned:
        return
    high = sum(1 for b in header[:148] if b > 127) + sum(1 for b in header[156:] if b > 127)
    if stored != unsigned - 256 * high:  # some old writers summed signed chars; tarfile accepts both
        raise ValueError(f"tar header: checksum {stored} does not match the header ({unsigned})")


def _pax_records(data: bytes) -> Dict[bytes, bytes]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records: Dict[bytes, bytes] = {}
    at = 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise ValueError(f"tar pax header: bad record length at byte {at}") from None
        record = data[space + 1:at + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"tar pax header: malformed record at byte {at}")
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        at += length
    return records


def _name(header: bytes) -> bytes:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":  # ustar and pax headers carry a prefix; GNU ones ("ustar  ") do not
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
        if prefix:
            name = prefix + b"/" + name
    return name


def _compressed(first: bytes) -> bool:
    return any(first.startswith(magic) for magic in COMPRESSED_MAGIC)


class _Prepend:
    """A read-only stream: ``head`` bytes, then the rest of ``stream`` (for tarfile's fallback)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))


def tar_members(stream: BinaryIO) -> Iterator[Tuple[str, bytes]]:
    """``(name, data)`` of every regular file of a tar stream, in order (module doc)."""
    header = stream.read(BLOCK)
    if header and _compressed(header):
        with tarfile.open(fileobj=_Prepend(header, stream), mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
        return
    long_name: Optional[bytes] = None
    pax: Dict[bytes, bytes] = {}
    while header:
        if len(header) < BLOCK:
            header += _read_exact(stream, BLOCK - len(header), "a header")
        if header.count(0) == BLOCK:
            return  # the end-of-archive zero block
        _check_sum(header)
        kind = header[156:157]
        size = int(pax[b"size"]) if b"size" in pax and kind not in (b"x", b"g") else _number(header[124:136], "size")
        if size < 0:
            raise ValueError(f"tar header: negative size {size}")
        name = (pax.get(b"path") or long_name or _name(header)).decode("utf-8", "surrogateescape")
        try:
            data = _read_exact(stream, size, "a member's data") if size else b""
            if size % BLOCK:
                _read_exact(stream, BLOCK - size % BLOCK, "a member's padding")
        except EOFError as error:
            raise TruncatedMember(name, str(error)) from None
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0]
        elif kind == b"x":  # pax extended header of the next member
            pax = _pax_records(data)
        elif kind in (b"g", b"K", b"V"):  # pax global header, GNU long link name, volume label
            pass
        else:
            if kind in REGULAR and not name.endswith("/"):  # an old-style entry ending in / is a folder
                yield name, data
            long_name, pax = None, {}
        header = stream.read(BLOCK)
