"""Corruption: 15 classes of damage x {h5ad, zarr, parquet, csv, tiledbsoma} (issue 25, item 1).

Each artifact is saved correctly (its record holds SHA-256, size and the stored object's
state; a folder's its manifest), then its *stored* bytes are damaged behind the registry's
back: on local storage, and on the loopback S3 server for h5ad, zarr, parquet and csv.
Every read -- ``load()``, ``cache()``, ``open()`` and a data access through what it
returned -- must raise a typed error whose text (message and notes) names the artifact's
key and its stored path, within :data:`_damage.LIMIT` seconds, and leave the registry rows
and every stored byte as they were after the damage. Three classes concern what is saved
or opened rather than stored bytes (wrong suffix, symlink, empty folder). The same damage
opened by path, with no record, must give a typed error or the data itself, never a
library's own error.

What each class does to each format (a folder's *data chunk*: zarr ``X/0.0``, TileDB-SOMA's
``ms/RNA/X/data`` values ``a0.tdb``), and what catches it:

=====================  ===========================================================  =======
class                  h5ad / zarr / parquet / csv / tiledbsoma                     caught
=====================  ===========================================================  =======
empty file             file / data chunk / file / file / data chunk                 S
truncated to 50 %      as above                                                     S
truncated by 8 bytes   as above                                                     S
zeroed header          first 512 bytes zeroed (same size), as above                 T
64-byte flip           64 bytes inverted mid-file (same size), as above             T
wrong suffix           csv bytes as .h5ad / a parquet file in .zarr / csv bytes     D
                       as .parquet / parquet bytes as .csv / the AnnData zarr as
                       .tiledbsoma (saved so; the record is right)
missing chunk          n/a / X/1.0 deleted / n/a / n/a / X coordinates d0.tdb       M
truncated chunk        n/a / X/2.0 halved / n/a / n/a / obs a0.tdb halved           S
missing root metadata  root attributes deleted / .zgroup .zattrs .zmetadata         S, M
                       deleted / footer cut off / header line cut off / root
                       group's __group and __meta deleted
invalid JSON metadata  n/a / .zmetadata / the pandas schema metadata / n/a / n/a    S, T
unknown encoding type  X's encoding-type "bogus-matrix" (h5py; zarr's .zattrs and   S, T
                       .zmetadata) / as h5ad / n/a / n/a / n/a
deleted object         the file or folder removed                                   G
hash mismatch          bytes changed in place at the same size, with size, time     H
                       and inode kept (bit rot); S3: the same size written
symlink out of root    the stored file / data chunk replaced by a link to a copy    L
                       of itself outside the root (local only)
empty folder           a folder named x.h5ad, x.zarr, ... with nothing in it        E
=====================  ===========================================================  =======

Caught by: S the size against the record (``StorageModifiedError``); T the state
(S3: ETag; locally modification time and inode, then the hash) against the record
(``StorageModifiedError``); M a file the manifest lists is missing
(``CorruptArtifactError``); G the stored object is gone (``StorageObjectMissingError``);
H the hash that ``cache()`` and ``load()`` compute once for each state of the stored files
(``CorruptArtifactError``; on S3 the ETag, ``StorageModifiedError``); L the stored object
or a file below it leads out of the storage root (``CorruptArtifactError``, before a byte
is read); D decoding: ``load()`` and ``open()`` raise ``CorruptArtifactError`` (the
AnnData zarr as ``.tiledbsoma``: ``UnsupportedFormatError``), while ``cache()`` returns
the recorded bytes, which are intact; E ``save()`` refuses an empty folder
(``InvalidArgumentError``), ``open()`` by path raises a typed error.

Not applicable, and why: missing/truncated chunk for h5ad, parquet and csv (one file: no
chunk files; damage inside it is the byte classes); invalid JSON metadata for h5ad (HDF5
attributes, no JSON document), csv (no metadata) and tiledbsoma (TileDB's metadata are
typed key-values in compressed files); unknown encoding type for parquet (no type tag:
page encodings are Thrift enums inside the pages, the byte classes' case), csv (no tag
at all) and tiledbsoma (tiledbsoma refuses to write ``soma_object_type`` and
``soma_encoding_version``, and the files holding them are compressed); symlink and empty
folder on S3 (object stores have neither); hash mismatch keeping the ETag on S3 (the ETag
changes with the bytes). One limit, documented in the README: ``open()`` of *local*
storage checks the state, not the bytes, so the hash-mismatch class is caught there by
``cache()``/``load()`` only (``test_open_checks_state_not_bytes``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import pytest
from _damage import FORMATS, Stored, read_opened, same, text_of, within, write_sources
from conftest import snapshot

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

Modified = errors.StorageModifiedError
Corrupt = errors.CorruptArtifactError
Missing = errors.StorageObjectMissingError


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


# -- the damage -----------------------------------------------------------------------------

def _data_chunk(s: Stored, fmt: str) -> str:
    """The file a byte class damages: the file itself, or a folder's data chunk."""
    if fmt == "zarr":
        return "X/0.0"
    if fmt == "tiledbsoma":
        return s.match("ms/RNA/X/data/__fragments/", "/a0.tdb")
    return ""


def _bytes(edit: Callable[[bytearray], bytes | bytearray], *,
           keep_state: bool = False) -> Callable[[Stored, str], None]:
    def damage(s: Stored, fmt: str) -> None:
        rel = _data_chunk(s, fmt)
        s.write(rel, bytes(edit(bytearray(s.read(rel)))), keep_state=keep_state)
    return damage


def _zeroed(d: bytearray) -> bytearray:
    n = min(512, len(d))
    d[:n] = bytes(n)
    return d


def _flipped(d: bytearray) -> bytearray:
    start = max(len(d) // 2 - 32, 0)
    for i in range(start, min(start + 64, len(d))):
        d[i] ^= 0xFF
    return d


def _missing_chunk(s: Stored, fmt: str) -> None:
    s.remove("X/1.0" if fmt == "zarr" else s.match("ms/RNA/X/data/__fragments/", "/d0.tdb"))


def _truncated_chunk(s: Stored, fmt: str) -> None:
    rel = "X/2.0" if fmt == "zarr" else s.match("obs/__fragments/", "/a0.tdb")
    data = s.read(rel)
    s.write(rel, data[: len(data) // 2])


def _h5_edit(s: Stored, edit: Callable[[Any], None]) -> None:
    import tempfile

    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "x.h5ad")
        with open(local, "wb") as f:  # noqa: PTH123
            f.write(s.read())
        with h5py.File(local, "r+") as f:
            edit(f)
        with open(local, "rb") as f:  # noqa: PTH123
            s.write("", f.read())


def _zarr_json(s: Stored, rel: str, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(s.read(rel))
    edit(doc)
    s.write(rel, json.dumps(doc).encode())


def _missing_root_metadata(s: Stored, fmt: str) -> None:
    if fmt == "h5ad":
        def drop(f: Any) -> None:
            for name in list(f.attrs):
                del f.attrs[name]
        _h5_edit(s, drop)
    elif fmt == "zarr":
        for rel in (".zgroup", ".zattrs", ".zmetadata"):
            s.remove(rel)
    elif fmt == "parquet":  # the footer (FileMetaData, its length, the magic) cut off
        data = s.read()
        footer = int.from_bytes(data[-8:-4], "little")
        s.write("", data[: len(data) - 8 - footer])
    elif fmt == "csv":
        s.write("", s.read().split(b"\n", 1)[1])
    else:
        for rel in s.files():
            if rel.startswith(("__group/", "__meta/")):
                s.remove(rel)


def _invalid_json(s: Stored, fmt: str) -> None:
    if fmt == "zarr":
        s.write(".zmetadata", b'{"metadata": {".zgroup": {"zarr_format": 2}, ' + b"\n")
        return
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(s.read()))
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"pandas": b'{"columns": [{"name": '}), out)
    s.write("", out.getvalue())


def _unknown_encoding(s: Stored, fmt: str) -> None:
    if fmt == "h5ad":
        _h5_edit(s, lambda f: f["X"].attrs.__setitem__("encoding-type", "bogus-matrix"))
        return

    def bogus(doc: dict[str, Any]) -> None:
        doc["encoding-type"] = "bogus-matrix"

    def bogus_consolidated(doc: dict[str, Any]) -> None:
        bogus(doc["metadata"]["X/.zattrs"])

    _zarr_json(s, "X/.zattrs", bogus)
    _zarr_json(s, ".zmetadata", bogus_consolidated)


def _hash_mismatch(s: Stored, fmt: str) -> None:
    rel = _data_chunk(s, fmt)
    data = bytearray(s.read(rel))
    data[len(data) // 2] ^= 0x01  # one bit: the same size
    s.write(rel, bytes(data), keep_state=True)


def _symlink_out(s: Stored, fmt: str) -> None:
    rel = _data_chunk(s, fmt)
    target = os.path.join(s.root, rel) if rel else s.root
    outside = os.path.join(s.root.split("/storage/")[0], "outside", os.path.basename(target))
    os.makedirs(os.path.dirname(outside), exist_ok=True)
    shutil.copyfile(target, outside)  # the same bytes: only the link is wrong
    os.remove(target)
    os.symlink(outside, target)


def _deleted(s: Stored, fmt: str) -> None:
    s.remove("")


LOCAL, BOTH = ("local",), ("local", "s3")
_FOLDERS = ("zarr", "tiledbsoma")
_ALL = tuple(FORMATS)

#: class -> (damage, formats, storages, expected error by format; None: by how it is made)
DAMAGE: dict[str, tuple[Callable[[Stored, str], None], tuple[str, ...], tuple[str, ...],
                        dict[str, type[Exception]]]] = {
    "empty file": (_bytes(lambda d: b""), _ALL, BOTH, {}),
    "truncated to 50%": (_bytes(lambda d: d[: len(d) // 2]), _ALL, BOTH, {}),
    "truncated by 8 bytes": (_bytes(lambda d: d[:-8]), _ALL, BOTH, {}),
    "zeroed header": (_bytes(_zeroed), _ALL, BOTH, {}),
    "64-byte flip": (_bytes(_flipped), _ALL, BOTH, {}),
    "missing chunk": (_missing_chunk, _FOLDERS, BOTH, {f: Corrupt for f in _FOLDERS}),
    "truncated chunk": (_truncated_chunk, _FOLDERS, BOTH, {}),
    "missing root metadata": (_missing_root_metadata, _ALL, BOTH,
                              {"zarr": Corrupt, "tiledbsoma": Corrupt}),
    "invalid JSON metadata": (_invalid_json, ("zarr", "parquet"), BOTH, {}),
    "unknown encoding type": (_unknown_encoding, ("h5ad", "zarr"), BOTH, {}),
    "deleted object": (_deleted, _ALL, BOTH, {f: Missing for f in _ALL}),
    "hash mismatch": (_hash_mismatch, _ALL, BOTH, {}),
    "symlink out of root": (_symlink_out, _ALL, LOCAL, {f: Corrupt for f in _ALL}),
}
_S3_FORMATS = ("h5ad", "zarr", "parquet", "csv")


def _cases() -> list[Any]:
    out = []
    for name, (_, fmts, storages, _) in DAMAGE.items():
        for fmt in fmts:
            for storage in storages:
                if storage == "s3" and fmt not in _S3_FORMATS:
                    continue
                out.append(pytest.param(name, fmt, storage, id=f"{name}-{fmt}-{storage}"))
    return out


def _expected(name: str, fmt: str, storage: str) -> type[Exception]:
    if name == "hash mismatch" and storage == "local":
        return Corrupt  # (the hash: the state is as recorded)
    return DAMAGE[name][3].get(fmt, Modified)


def _save(fmt: str, sources: dict[str, Path]) -> Any:
    return ln.Artifact(sources[fmt], key=f"c/{FORMATS[fmt]}").save(mute=True)


def _reads(art: Any, fmt: str) -> dict[str, Callable[[], Any]]:
    return {"load": lambda: art.load(mute=True), "cache": lambda: art.cache(mute=True),
            "open": lambda: read_opened(fmt, art.open())}


def _check(exc: BaseException | None, expected: type[Exception] | tuple[type[Exception], ...],
           *names: str) -> None:
    assert exc is not None, "read without an error"
    assert isinstance(exc, expected), repr(exc)
    shown = text_of(exc)
    for name in names:
        assert name in shown, (name, shown)


# -- damage to stored bytes, read through the record ------------------------------------

@pytest.mark.parametrize(("name", "fmt", "storage_kind"), _cases())
def test_damaged_artifact_raises_typed_error(name, fmt, storage_kind, conn, sources) -> None:
    art = _save(fmt, sources)
    stored = Stored(art.path)
    DAMAGE[name][0](stored, fmt)
    rows_before, names_before = snapshot(conn)
    bytes_before = stored.state() if name != "deleted object" else {}
    expected = _expected(name, fmt, storage_kind)
    reads = _reads(art, fmt)
    if name == "hash mismatch" and storage_kind == "local":
        del reads["open"]  # open() checks the state, not the bytes (see the module's notes)
    for read, fn in reads.items():
        _, exc = within(fn)
        _check(exc, expected, "c/" + FORMATS[fmt], art._saved().storage_key)
        assert read  # (named in the assertion's traceback)
    assert snapshot(conn) == (rows_before, names_before)
    if name != "deleted object":
        assert stored.state() == bytes_before


@pytest.mark.parametrize("storage_kind", ["local"])
def test_open_checks_state_not_bytes(storage_kind, conn, sources) -> None:
    """The documented limit: bytes damaged in place, state kept, are not seen by open().

    ``cache()``/``load()`` hash them once for that state and refuse; ``open()`` checks the
    state, which is as recorded, and reads what a format without checksums cannot tell.
    """
    art = _save("csv", sources)
    stored = Stored(art.path)
    data = bytearray(stored.read())
    at = data.index(b"0.", len(data) // 2) + 2  # a digit of a number: still a valid csv
    data[at] = ord("9") if data[at] != ord("9") else ord("1")
    stored.write("", bytes(data), keep_state=True)
    for read in (art.cache, art.load):
        with pytest.raises(Corrupt, match="no longer hash to the record's SHA-256"):
            read()
    got = art.open().to_table().to_pandas()
    assert len(got) == 50
    assert not same("csv", got)  # one value differs: what the hash of cache()/load() caught


# -- what is saved: the wrong suffix, a link out of the root, an empty folder ------------

def _wrong_suffix(fmt: str, sources: dict[str, Path], where: Path) -> Path:
    """Another format's bytes under ``fmt``'s name."""
    where.mkdir(parents=True, exist_ok=True)
    target = where / FORMATS[fmt]
    if fmt == "zarr":
        target.mkdir(parents=True)
        shutil.copyfile(sources["parquet"], target / "part.parquet")
        return target
    if fmt == "tiledbsoma":
        shutil.copytree(sources["zarr"], target)
        return target
    other = {"h5ad": "csv", "parquet": "csv", "csv": "parquet"}[fmt]
    shutil.copyfile(sources[other], target)
    return target


_S3_WRONG = ("h5ad", "zarr", "parquet")


@pytest.mark.parametrize(("fmt", "storage_kind"), [
    pytest.param(f, s, id=f"{f}-{s}") for f in FORMATS for s in BOTH
    if s == "local" or f in _S3_WRONG])
def test_wrong_suffix(fmt, storage_kind, conn, sources, tmp_path) -> None:
    """The record is right, the content is another format's: typed errors when decoded."""
    source = _wrong_suffix(fmt, sources, tmp_path / "wrong")
    art = ln.Artifact(source, key=f"c/{FORMATS[fmt]}").save(mute=True)
    before = snapshot(conn)
    expected = errors.UnsupportedFormatError if fmt == "tiledbsoma" else Corrupt
    for read in ("load", "open"):
        _, exc = within(_reads(art, fmt)[read])
        _check(exc, expected, "c/" + FORMATS[fmt], art._saved().storage_key)
    cached, exc = within(lambda: art.cache(mute=True))
    assert exc is None
    from lamin_io.storage import hash_path, to_upath

    assert hash_path(to_upath(cached), mute=True)[0] == art.hash  # the recorded bytes
    # by path, without a record: the same typed errors, naming the path
    _, exc = within(lambda: read_opened(fmt, ln.open(source)))
    _check(exc, expected, str(source))
    assert snapshot(conn) == before


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_empty_folder(fmt, tmp_path) -> None:
    conn = ln.connect(tmp_path / "r.db", tmp_path / "storage")
    empty = tmp_path / "src" / FORMATS[fmt]
    empty.mkdir(parents=True)
    with pytest.raises(errors.InvalidArgumentError, match="empty folder") as info:
        ln.Artifact(empty, key=f"c/{FORMATS[fmt]}").save(mute=True)
    assert str(empty) in str(info.value)
    inside = tmp_path / "storage" / "in" / FORMATS[fmt]  # in place, inside the root
    inside.mkdir(parents=True)
    with pytest.raises(errors.InvalidArgumentError, match="empty folder"):
        ln.Artifact(inside).save(mute=True)
    assert snapshot(conn)[0] == []
    _, exc = within(lambda: read_opened(fmt, ln.open(empty)))
    _check(exc, (Corrupt, errors.UnsupportedFormatError), str(empty))


def test_a_linked_file_is_saved_as_a_copy(tmp_path, sources) -> None:
    """A link inside the root to a file outside: its bytes are copied in, never read there."""
    conn = ln.connect(tmp_path / "r.db", tmp_path / "storage")
    outside = tmp_path / "outside" / "t.csv"
    outside.parent.mkdir()
    shutil.copyfile(sources["csv"], outside)
    link = tmp_path / "storage" / "proj" / "t.csv"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    art = ln.Artifact(link, key="proj/t.csv").save(mute=True)
    assert art.is_managed  # a copy under the reserved prefix, not the link
    outside.write_text("a,b,s\n0,0,changed\n")  # the outside file changes afterwards
    assert same("csv", art.load())
    assert ln.Artifact.get(key="proj/t.csv").uid == art.uid
    assert len(snapshot(conn)[0]) == 1


@pytest.mark.parametrize("fmt", ["zarr", "tiledbsoma"])
def test_a_folder_linking_out_is_not_registered_in_place(fmt, tmp_path, sources) -> None:
    conn = ln.connect(tmp_path / "r.db", tmp_path / "storage")
    inside = tmp_path / "storage" / "proj" / FORMATS[fmt]
    shutil.copytree(sources[fmt], inside)
    _symlink_out(Stored(_local_upath(inside)), fmt)
    with pytest.raises(errors.InvalidArgumentError, match="outside the storage root") as info:
        ln.Artifact(inside).save(mute=True)
    assert str(inside) in str(info.value)
    assert snapshot(conn)[0] == []


def _local_upath(path: Path) -> Any:
    from lamin_io.storage import to_upath

    return to_upath(path)


# -- damage opened by path, without a record ---------------------------------------------

_BY_PATH = [pytest.param(n, f, id=f"{n}-{f}") for n, (_, fmts, _, _) in DAMAGE.items()
            for f in fmts if n not in ("deleted object", "symlink out of root")]


@pytest.mark.parametrize(("name", "fmt"), _BY_PATH)
def test_damage_opened_by_path(name, fmt, sources, tmp_path) -> None:
    """No record to compare with: a typed error naming the path, or the data itself.

    Formats without checksums cannot tell every damage (a csv cut at a line end is a
    shorter csv): those reads must still never raise a library's own error. Reading data
    through a pyarrow ``Dataset`` or a SOMA object that ``open()`` returned is those
    libraries' own API (and errors): only opening is checked for them here.
    """
    import lamin_io.storage as st

    copy = tmp_path / FORMATS[fmt]
    (shutil.copytree if sources[fmt].is_dir() else shutil.copyfile)(sources[fmt], copy)
    DAMAGE[name][0](Stored(st.to_upath(copy)), fmt)
    ln.connect(tmp_path / "r.db", tmp_path / "storage")
    reads: dict[str, Callable[[], Any]] = {"load": lambda: ln.Artifact(copy).load(mute=True)}
    if fmt in ("h5ad", "zarr"):
        reads["open"] = lambda: read_opened(fmt, ln.open(copy))
    else:
        reads["open"] = lambda: ln.open(copy)
    for read, fn in reads.items():
        got, exc = within(fn)
        if exc is None:
            continue  # (whether it is the data cannot be told without a record)
        assert isinstance(exc, errors.LaminIOError), (read, repr(exc))
        assert str(copy) in text_of(exc), (read, text_of(exc))
        assert got is None
