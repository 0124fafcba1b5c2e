"""Moving bytes: conditional uploads, verified downloads, removal and stored-object checks."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from lamin_io._faults import kill_point
from lamin_io.errors import (
    CorruptArtifactError,
    ObjectExistsError,
    SourceChangedError,
    StorageModifiedError,
    StorageObjectMissingError,
)
from lamin_io.storage._filesystem import error_codes
from lamin_io.storage._hashing import (
    BLOCK_SIZE,
    Manifest,
    folder_files,
    hash_stream,
    manifest_hash,
)
from lamin_io.storage._paths import is_local
from lamin_io.storage._progress import ProgressCallback

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from upath import UPath

__all__ = ["abort_upload", "download", "download_hashed", "fingerprint", "folder_states",
           "open_uploads", "remove", "upload"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

UPLOAD_BLOCK = 64 * 2**20  # multipart part size for S3 uploads


def _is_precondition_failure(exc: BaseException) -> bool:
    """Whether a conditional create failed because the object exists.

    Told by the S3 error code or HTTP status (or s3fs's ``FileExistsError`` for it),
    never by what a message happens to contain.
    """
    return isinstance(exc, FileExistsError) or any(
        code in ("PreconditionFailed", "412") for code in error_codes(exc))


def _copy_verified(src_fs: Any, src: str, fout: BinaryIO, expected: str,
                   cb: ProgressCallback) -> None:
    try:
        fin = src_fs.open(src, "rb", block_size=BLOCK_SIZE)
    except FileNotFoundError as exc:
        msg = f"{src} disappeared while it was being saved: save again"
        raise SourceChangedError(msg) from exc
    # outside the ``try``: writing to the target may fail with FileNotFoundError too (S3's
    # NoSuchBucket), which says nothing about the source
    with fin:
        digest, _ = hash_stream(fin, cb, sink=fout)
    if digest != expected:
        msg = f"{src} changed while it was being saved (its hash moved): save again"
        raise SourceChangedError(msg)


def upload(src: UPath, dest: UPath, *, sha256: str, manifest: Manifest | None,
           mute: bool = False) -> None:
    """Copy exactly the hashed content of ``src`` to ``dest``, never overwriting anything.

    Every byte is hashed again while it streams and must match ``sha256`` (a file) or the
    ``manifest`` (a folder), so a source edited between hashing and upload is refused with
    :class:`SourceChangedError`. Local targets are assembled under a temporary name and
    published with ``link``/``rename``; S3 targets are written with a conditional create
    (``If-None-Match: *``), so two writers cannot overwrite each other, and published only
    when every file verified: a failed or changed source publishes nothing. A local target
    is removed on failure; an S3 folder whose publishing failed half-way may keep the files
    published before: the caller removes it (its key is unique).
    """
    entries = [("", 0, sha256)] if manifest is None else list(manifest.entries)
    src_fs, src_root = src.fs, src.path.rstrip("/")
    total = manifest.size if manifest is not None else int(src_fs.info(src_root)["size"])
    with ProgressCallback(f"uploading {src.name}", mute=mute) as cb:
        cb.set_size(total)
        if is_local(dest):
            _publish_local(src_fs, src_root, entries, Path(dest.path), cb)
            return
        _publish_s3(src_fs, src_root, entries, dest, cb)


def _publish_s3(src_fs: Any, src_root: str, entries: list[tuple[str, int, str]],
                dest: UPath, cb: ProgressCallback) -> None:
    """Upload every file as an unpublished multipart upload; publish only when all verify.

    A file is published (its upload completed, conditionally: ``If-None-Match: *``) only
    after every byte of every file was hashed again on the way and matched: a source that
    changed mid-copy leaves nothing at any final key (its uploads are aborted).
    """
    fs, root = dest.fs, dest.path.rstrip("/")
    uploads: list[Any] = []  # uploaded, not published
    try:
        for rel, _, digest in entries:
            target = f"{root}/{rel}" if rel else root
            # fs._open, not fs.open: open() files every writer with autocommit=False in the
            # filesystem's transaction list for good (the filesystem is cached: a leak), and
            # a later transaction of the caller's would commit or discard ours again
            fout = fs._open(target, "xb", block_size=UPLOAD_BLOCK, autocommit=False)
            uploads.append(fout)
            _copy_verified(src_fs, f"{src_root}/{rel}" if rel else src_root, fout, digest,
                           cb)
            fout.close()  # its last part goes up; nothing is visible yet
            kill_point("upload")  # (an open multipart upload, parts sent, not completed)
        for fout in uploads:
            fout.commit()
    except BaseException as exc:
        for fout in uploads:
            _abort(fout)
        if isinstance(exc, Exception) and _is_precondition_failure(exc):
            msg = f"refusing to overwrite existing object {dest}"
            raise ObjectExistsError(msg) from exc
        raise


def _abort(upload: Any) -> None:
    """Abort an unpublished multipart upload (one published already is the caller's).

    The writer is marked closed too: a discarded writer left open would, when collected,
    start a new multipart upload from its finalizer (an orphan upload, made from whatever
    thread the collector runs in).
    """
    try:
        upload.discard()
    except Exception:  # noqa: BLE001 (an upload completed meanwhile cannot be aborted)
        logger.debug("cannot abort the upload of %s", upload.path, exc_info=True)
    finally:
        upload.closed = True


def _publish_local(src_fs: Any, src_root: str, entries: list[tuple[str, int, str]],
                   dest: Path, cb: ProgressCallback) -> None:
    """Assemble a verified copy beside ``dest``, then publish it without overwriting."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex}"
    try:
        for rel, _, digest in entries:
            target = tmp / rel if rel else tmp
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fout:
                _copy_verified(src_fs, f"{src_root}/{rel}" if rel else src_root,
                               fout, digest, cb)
            kill_point("upload")
        try:
            if rel:  # a folder: rename fails when dest exists and is not empty
                os.rename(tmp, dest)
            else:  # a file: link is an atomic create-if-absent
                os.link(tmp, dest)
        except OSError as exc:
            msg = f"refusing to overwrite existing {dest}"
            raise ObjectExistsError(msg) from exc
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def fingerprint(path: UPath, *, folder: bool = False) -> dict[str, Any]:
    """Return what identifies a stored object's current state cheaply (no content read).

    S3: size and ETag (and version id where the bucket keeps versions); local: size,
    modification time and inode. A ``folder`` gets ``{"files": {relative path: state}}``
    with each file's state: ``[size, ETag]`` on S3, ``[size, mtime_ns, inode]`` locally, so
    a file rewritten at the same size is told apart too. Raises
    :class:`StorageObjectMissingError` when the object is gone.
    """
    if folder:
        return {"files": folder_states(path)}
    try:
        info = path.fs.info(path.path)
    except FileNotFoundError as exc:
        msg = f"stored object {path} is missing"
        raise StorageObjectMissingError(msg) from exc
    fp: dict[str, Any] = {"size": int(info.get("size") or 0)}
    if is_local(path):
        st = os.stat(path.path)
        fp["mtime_ns"], fp["inode"] = st.st_mtime_ns, st.st_ino
    else:
        etag = info.get("ETag") or info.get("etag")
        if etag:
            fp["etag"] = str(etag).strip('"')
        if info.get("VersionId") not in (None, "null"):
            fp["version_id"] = info["VersionId"]
    return fp


def folder_states(path: UPath) -> dict[str, list[Any]]:
    """Return each file of a stored folder with its state (see :func:`fingerprint`).

    One listing; locally one ``stat`` a file. An empty dict when the folder is missing.
    """
    root = path.path.rstrip("/")
    try:
        found = path.fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    states: dict[str, list[Any]] = {}
    for name, info in found.items():
        rel = name[len(root) + 1:]
        size = int(info.get("size") or 0)
        if is_local(path):
            st = os.stat(name)
            states[rel] = [size, st.st_mtime_ns, st.st_ino]
        else:
            etag = info.get("ETag") or info.get("etag")
            states[rel] = [size, str(etag).strip('"') if etag else None]
    return states


def _download_file(src_fs: Any, src: str, dest: Path, expected: str | None,
                   cb: ProgressCallback, what: str, etag: str | None = None
                   ) -> tuple[str, int]:
    """Copy one file, hashing it on the way; return its ``(sha256, size)``.

    ``etag``: the S3 version recorded for it. s3fs sends every ranged GET with
    ``If-Match`` on the ETag it found at open, so the download stays on that version; that
    version must be the recorded one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with src_fs.open(src, "rb", block_size=BLOCK_SIZE) as fin, dest.open("wb") as fout:
            found = str((getattr(fin, "details", None) or {}).get("ETag", "")).strip('"')
            recorded = None if etag is None else etag.strip('"')
            if recorded is not None and found and found != recorded:
                msg = (f"{what}: the stored object {src} is no longer the version recorded "
                       f"(ETag {found[:12]}..., recorded {recorded[:12]}...); it was "
                       f"overwritten outside lamin-io: save it again as a new version")
                raise StorageModifiedError(msg)
            digest, n = hash_stream(fin, cb, sink=fout)
    except FileNotFoundError as exc:
        msg = f"{what}: stored file {src} is missing"
        raise CorruptArtifactError(msg) from exc
    except OSError as exc:
        if set(error_codes(exc)) & {"412", "PreconditionFailed"}:
            msg = (f"{what}: the stored object {src} changed while it was downloaded; the "
                   f"partial copy was dropped: try again, or save the new content as a new "
                   f"version")
            raise StorageModifiedError(msg) from exc
        raise
    if expected is not None and digest != expected:
        msg = (f"{what}: stored bytes at {src} no longer match the registry record "
               f"(sha256 {digest[:12]}... != {expected[:12]}...); the object was modified "
               f"behind the registry's back: save it again as a new version")
        raise StorageModifiedError(msg)
    return digest, n


def _swap_in(dest: Path, write: Callable[[Path], T]) -> T:
    """Have ``write`` fill a path beside ``dest``, then put it in ``dest``'s place.

    A ``write`` that fails leaves any previous ``dest`` untouched.
    """
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex}"
    try:
        out = write(tmp)
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # (a file is replaced in one step: never missing meanwhile)
        return out
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def download(src: UPath, dest: Path, *, sha256: str | None, manifest: Manifest | None,
             what: str, mute: bool = False,
             versions: str | dict[str, str] | None = None) -> None:
    """Download a file or folder to ``dest``, verifying every byte against the record.

    The copy is written beside ``dest`` and swapped in only when complete and verified, so
    a failed or mismatching download leaves any previous ``dest`` untouched. ``versions``:
    the S3 ETags recorded (a file's, or a folder's files' by relative path): each file's
    requests are pinned to its recorded version (``If-Match``), and an object found at
    another raises :class:`StorageModifiedError` before a byte is copied.
    """
    fs, root = src.fs, src.path.rstrip("/")

    def write(tmp: Path) -> None:
        with ProgressCallback(f"downloading {dest.name}", mute=mute) as cb:
            if manifest is None:
                cb.set_size(int(fs.info(root).get("size") or 0))
                _download_file(fs, root, tmp, sha256, cb, what,
                               versions if isinstance(versions, str) else None)
                return
            cb.set_size(manifest.size)
            tmp.mkdir(parents=True)
            pins = versions if isinstance(versions, dict) else {}
            for rel, _, digest in manifest.entries:
                _download_file(fs, f"{root}/{rel}", tmp / rel, digest, cb, what,
                               pins.get(rel))

    _swap_in(dest, write)


def download_hashed(src: UPath, dest: Path, *, what: str, mute: bool = False
                    ) -> tuple[str, Manifest | None]:
    """Download a file or folder no record describes yet, hashing every byte on the way.

    Returns ``(sha256, manifest)`` of what was downloaded: what :func:`hash_path` gives
    for ``src`` (manifest ``None`` for a file), from one read of it. ``dest`` is replaced
    only once the download is complete.
    """
    fs, root = src.fs, src.path.rstrip("/")
    files = folder_files(src)

    def write(tmp: Path) -> tuple[str, Manifest | None]:
        with ProgressCallback(f"downloading {dest.name}", mute=mute) as cb:
            if files is None:
                cb.set_size(int(fs.info(root).get("size") or 0))
                return _download_file(fs, root, tmp, None, cb, what)[0], None
            cb.set_size(sum(size for _, size in files))
            tmp.mkdir(parents=True)
            entries = [(rel, *_download_file(fs, f"{root}/{rel}", tmp / rel, None, cb, what))
                       for rel, _ in files]
        manifest = Manifest(tuple((rel, n, digest) for rel, digest, n in entries))
        return manifest_hash(manifest), manifest

    return _swap_in(dest, write)


def remove(path: UPath) -> None:
    """Delete a stored file or folder; a missing one is not an error."""
    fs = path.fs
    try:
        if path.is_dir():
            fs.rm(path.path.rstrip("/"), recursive=True)
        else:
            fs.rm_file(path.path)
    except FileNotFoundError:
        pass


def open_uploads(prefix: UPath) -> list[tuple[str, str, datetime]]:
    """Return the unfinished S3 multipart uploads under ``prefix``: path, id, start time.

    A save killed mid-upload leaves one (its parts are stored, and billed, until it is
    aborted). Local storage has none.
    """
    if is_local(prefix):
        return []
    fs = prefix.fs
    bucket, _, key_prefix = prefix.path.rstrip("/").partition("/")
    found: list[tuple[str, str, datetime]] = []
    markers: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket,
                          Prefix=f"{key_prefix}/" if key_prefix else "", **markers)
        found += [(f"{bucket}/{u['Key']}", u["UploadId"], u["Initiated"])
                  for u in page.get("Uploads", [])]
        if not page.get("IsTruncated"):
            return found
        markers = {"KeyMarker": page["NextKeyMarker"],
                   "UploadIdMarker": page["NextUploadIdMarker"]}


def abort_upload(prefix: UPath, path: str, upload_id: str) -> None:
    """Abort the multipart upload ``upload_id`` of ``path`` (``bucket/key``)."""
    bucket, _, key = path.partition("/")
    prefix.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
