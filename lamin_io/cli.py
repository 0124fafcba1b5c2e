"""The ``lamin-io`` command line.

Exit codes: 0 success, 1 a lamin-io error (message on stderr), 2 bad usage, 3 nothing
found (unknown key, missing path or bucket), 4 storage or registry temporarily unreachable
or locked (retry).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from lamin_io import errors

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from lamin_io.registry import Artifact

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_RETRY = 1, 2, 3, 4

_EPILOG = ("Exit codes: 0 ok, 1 error, 2 bad usage, 3 not found, "
           "4 unreachable or locked (retry).")


def _exit_code(exc: errors.LaminIOError) -> int:
    if isinstance(exc, errors.ArtifactNotFoundError | errors.PathNotFoundError
                  | errors.BucketNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, errors.StorageUnreachableError | errors.StorageServiceError
                  | errors.RegistryLockedError
                  | errors.RegistryUnreachableError):
        return EXIT_RETRY
    return EXIT_ERROR


def _run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn lamin-io errors into a one-line message and an exit code a shell can act on."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.LaminIOError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(_exit_code(exc))

    return wrapper


class _Size(click.ParamType):
    """A size in bytes, or with a unit: ``10MB``, ``1.5 GB`` (powers of 1000), ``2GiB``."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {
        "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
        "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in self._UNITS:
            self.fail(f"{value!r} is no size: write bytes (1000000) or with a unit (10MB, "
                      f"1.5GB, 2GiB)", param, ctx)
        return int(float(match.group(1)) * self._UNITS[unit])


_SIZE = _Size()


def _get(key: str, version: str | None) -> Artifact:
    from lamin_io.registry import Artifact

    if len(key) == 16 and "/" not in key and "." not in key:
        found = Artifact.filter(uid=key)
        if found:
            return found[0]
    return Artifact.get(key=key, version=version)


@click.group(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="lamin-io")
def cli(verbose: bool) -> None:  # noqa: FBT001
    """Register, find and fetch scientific files, locally and on S3."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")


@cli.command(epilog=_EPILOG)
@click.option("--registry", help="SQLite file or postgresql:// URL.")
@click.option("--storage", help="Local directory or s3://bucket/prefix for uploads.")
@click.option("--endpoint-url", help="S3-compatible endpoint (e.g. http://127.0.0.1:9000).")
@click.option("--anon", is_flag=True, help="Anonymous S3 access (public buckets).")
@_run
def connect(registry: str | None, storage: str | None, endpoint_url: str | None,
            anon: bool) -> None:  # noqa: FBT001
    """Connect to a registry and storage, and remember them for later commands.

    A password in a postgresql:// URL is used for this connection but never saved: later
    commands take it from PGPASSWORD or ~/.pgpass, or from a full URL in LAMIN_IO_REGISTRY.
    """
    from lamin_io.registry import connect as _connect
    from lamin_io.registry._connection import save_settings, url_without_password

    conn = _connect(registry, storage, endpoint_url=endpoint_url, anon=anon)
    saved_url, dropped = url_without_password(conn.db.url)
    path = save_settings({"registry": saved_url, "storage": conn.settings.root,
                          "endpoint_url": conn.settings.endpoint_url, "anon": anon})
    click.echo(f"registry: {conn.registry}\nstorage:  {conn.settings.root}\n"
               f"saved to {path}")
    if dropped:
        click.echo("note: the registry password was not saved; later commands read it from "
                   "PGPASSWORD or ~/.pgpass (or set the full URL in LAMIN_IO_REGISTRY)",
                   err=True)


@cli.command(epilog=_EPILOG)
@click.argument("path")
@click.option("--key", help="Registry key, e.g. project/pbmc.h5ad (suffix must match).")
@click.option("--description", help="Free text.")
@click.option("--revises", help="Key of the artifact this is a new version of (its key is "
              "the default --key; another --key moves the family to that key).")
@click.option("--mute", is_flag=True, help="No progress bars.")
@_run
def save(path: str, key: str | None, description: str | None, revises: str | None,
         mute: bool) -> None:  # noqa: FBT001
    """Hash, upload and register PATH (a file, a folder, or an s3:// URL).

    With --revises and a different --key, the new version is saved under --key: the
    family's key changes (a warning says so), and the old key keeps the earlier versions.
    """
    from lamin_io.registry import Artifact

    previous = Artifact.get(key=revises) if revises else None
    artifact = Artifact(path, key=key, description=description, revises=previous)
    artifact.save(mute=mute)
    click.echo(repr(artifact))


@cli.command("ls", epilog=_EPILOG)
@click.argument("prefix", required=False, default="")
@click.option("--all-versions", is_flag=True, help="Show every version, not only the latest.")
@click.option("--description", "description", help="Only those whose description contains "
              "this text.")
@click.option("--suffix", help="Only this suffix, e.g. .h5ad.")
@click.option("--min-size", type=_SIZE, help="At least this size: bytes, or 10MB, 1.5GB.")
@click.option("--max-size", type=_SIZE, help="At most this size.")
@click.option("--since", type=click.DateTime(), help="Created at or after (2026-01-31, or "
              "with a time; UTC).")
@click.option("--until", type=click.DateTime(), help="Created before this time (UTC).")
@click.option("--run", "run_uid", help="Only those saved by this run (uid).")
@click.option("--transform", help="Only those saved by a run of this transform (name or uid).")
@click.option("--order-by", "order_by", multiple=True,
              help="A field to sort by, '-' first for descending (repeat; e.g. -size).")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --limit: which page of that many.")
@_run
def ls(prefix: str, all_versions: bool, description: str | None, suffix: str | None,  # noqa: FBT001, PLR0913
       min_size: int | None, max_size: int | None, since: datetime | None,
       until: datetime | None, run_uid: str | None, transform: str | None,
       order_by: tuple[str, ...], limit: int | None, page: int) -> None:
    """List artifacts whose key starts with PREFIX."""
    from rich.console import Console
    from rich.table import Table

    from lamin_io.registry import Artifact
    from lamin_io.registry._artifact import format_size

    lookups: dict[str, Any] = {"key__startswith": prefix} if prefix else {}
    if not all_versions:
        lookups["is_latest"] = True
    chosen = {"description__contains": description, "suffix": suffix, "size__gte": min_size,
              "size__lte": max_size, "run": run_uid, "transform": transform,
              "created_at__gte": None if since is None else since.replace(tzinfo=UTC),
              "created_at__lt": None if until is None else until.replace(tzinfo=UTC)}
    lookups.update({k: v for k, v in chosen.items() if v is not None})
    if page > 1 and limit is None:
        msg = "--page needs --limit"
        raise click.UsageError(msg)
    found = Artifact.filter(order_by=list(order_by) or None, limit=limit,
                            offset=(page - 1) * (limit or 0), **lookups)
    table = Table("key", "version", "size", "suffix", "uid", "created", box=None)
    for a in found:
        table.add_row(a.key or "-", a.version, format_size(a.size), a.suffix or "-", a.uid,
                      f"{a.created_at:%Y-%m-%d %H:%M}")
    Console(width=200).print(table)
    click.echo(f"{len(found)} artifact(s)", err=True)


@cli.command(epilog=_EPILOG)
@click.argument("key")
@click.option("--version", "version", help="Version label (default: latest).")
@click.option("--collection", "is_collection", is_flag=True,
              help="KEY names a collection (default: an artifact, else a collection).")
@click.option("--depth", type=click.IntRange(min=0), help="How many runs upstream to follow.")
@click.option("--image", type=click.Path(dir_okay=False),
              help="Also draw the graph into this .svg/.png/.pdf/.dot file (graphviz).")
@_run
def lineage(key: str, version: str | None, is_collection: bool, depth: int | None,  # noqa: FBT001
            image: str | None) -> None:
    """Show where the artifact (or collection) KEY came from: runs, transforms, inputs."""
    from lamin_io.errors import ArtifactNotFoundError
    from lamin_io.registry import Collection

    record: Any
    if is_collection:
        record = Collection.get(key=key, version=version)
    else:
        try:
            record = _get(key, version)
        except ArtifactNotFoundError:
            try:
                record = Collection.get(key=key, version=version)
            except ArtifactNotFoundError:
                msg = (f"no artifact or collection has key (or uid) {key!r}; list them with "
                       f"`lamin-io ls`")
                raise ArtifactNotFoundError(msg) from None
    record.view_lineage(image=image, depth=depth)
    if image:
        click.echo(f"drew {image}", err=True)


@cli.command(epilog=_EPILOG)
@click.argument("key")
@click.option("--version", "version", help="Version label (default: latest).")
@_run
def describe(key: str, version: str | None) -> None:
    """Describe the artifact KEY (or uid)."""
    _get(key, version).describe()


@cli.command(epilog=_EPILOG)
@click.argument("key")
@click.option("--version", "version", help="Version label (default: latest).")
@click.option("--mute", is_flag=True, help="No progress bars.")
@_run
def cache(key: str, version: str | None, mute: bool) -> None:  # noqa: FBT001
    """Download KEY into the local cache (once) and print its local path."""
    click.echo(str(_get(key, version).cache(mute=mute)))


@cli.command(epilog=_EPILOG)
@click.argument("key")
@click.option("--version", "version", help="Version label (default: latest).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_run
def delete(key: str, version: str | None, yes: bool) -> None:  # noqa: FBT001
    """Delete the artifact KEY: its record and, if lamin-io uploaded it, its object."""
    artifact = _get(key, version)
    if not yes:
        if not sys.stdin.isatty():
            click.echo("error: refusing to delete without --yes when not on a terminal",
                       err=True)
            sys.exit(EXIT_USAGE)
        click.confirm(f"delete {artifact!r}?", abort=True)
    # read before delete(): the record is gone afterwards
    name, label, uid = artifact.key or artifact.uid, artifact.version, artifact.uid
    artifact.delete()
    click.echo(f"deleted {name} (version {label}, uid {uid})")


@cli.command(epilog=_EPILOG)
@click.option("--older-than", default=3600.0, show_default=True, type=float,
              help="Seconds: leave younger pending saves alone.")
@click.option("--dry-run", is_flag=True, help="Only report.")
@_run
def gc(older_than: float, dry_run: bool) -> None:  # noqa: FBT001
    """Remove what killed saves and deletes left behind."""
    from lamin_io.registry import gc as _gc

    report = _gc(older_than=older_than, dry_run=dry_run)
    for line in report.records + report.objects:
        click.echo(("would remove " if dry_run else "removed ") + line)
    click.echo(str(report))


@cli.command(epilog=_EPILOG)
@click.argument("collection")
@click.argument("key")
@click.option("--seed", default=0, show_default=True, type=int, help="The shuffle's seed.")
@click.option("--obs-key", "obs_keys", multiple=True,
              help="An obs column to keep (repeat; default: those every file has).")
@click.option("--shard-mb", default=256, show_default=True, type=click.IntRange(min=1),
              help="A shard's rows in memory, in MiB: sets the number of shards.")
@click.option("--tmp-dir", type=click.Path(exists=True, file_okay=False),
              help="Local folder for the spilled rows (about X's size; default: system tmp).")
@click.option("--mute", is_flag=True, help="No progress bar.")
@_run
def preshuffle(collection: str, key: str, seed: int, obs_keys: tuple[str, ...],
               shard_mb: int, tmp_dir: str | None, mute: bool) -> None:  # noqa: FBT001
    """Rewrite COLLECTION's cells in a random order as zarr shards, saved as collection KEY.

    The shards are AnnData zarr stores (KEY/part-00000.zarr, ...) that the block loader
    reads fastest; memory stays near --shard-mb, whatever the collection's size.
    """
    from lamin_io.registry import Collection

    shuffled = Collection.get(key=collection).preshuffle(
        key, seed=seed, obs_keys=list(obs_keys) or None, shard_bytes=shard_mb * 2**20,
        tmp_dir=tmp_dir, mute=mute)
    click.echo(f"{shuffled!r}: {len(shuffled.artifacts)} shard(s)")


@cli.command(epilog=_EPILOG)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--mute", is_flag=True, help="No progress bars.")
@_run
def export(directory: str, mute: bool) -> None:  # noqa: FBT001
    """Write the registry to DIRECTORY: one parquet file per table and a manifest.

    Read from one consistent snapshot while others go on saving; saves in flight are left
    out. The bytes stay in storage: the records point at them by storage root and key.
    """
    from lamin_io.registry import export_registry

    click.echo(str(export_registry(directory, mute=mute)))


def _storage_map(entries: tuple[str, ...], roots: list[str]) -> dict[str, str]:
    """Return ``OLD=NEW`` entries as a dict.

    Each is split at the ``=`` that ends a root of ``roots`` (a path may hold ``=``
    itself), else at the first.
    """
    from lamin_io.registry._connection import _normalize_root

    def is_root(text: str) -> bool:
        try:
            return _normalize_root(text) in known
        except (errors.InvalidArgumentError, OSError, RuntimeError):  # no root at all
            return False

    known = set(roots)
    moves = {}
    for entry in entries:
        splits = [(entry[:i], entry[i + 1:]) for i, c in enumerate(entry) if c == "="]
        splits = [(old, new) for old, new in splits if old and new]
        if not splits:
            msg = f"--storage-map takes OLD=NEW (two storage roots), got {entry!r}"
            raise click.UsageError(msg)
        named = [(old, new) for old, new in splits if is_root(old)]
        if len(named) > 1:
            msg = (f"--storage-map {entry!r} can be split after {named[0][0]!r} or after "
                   f"{named[1][0]!r}, both storage roots of the export: pass "
                   f"storage_map={{old: new}} to lamin_io.import_registry() instead")
            raise click.UsageError(msg)
        old, new = (named or splits)[0]
        moves[old] = new
    return moves


@cli.command("import", epilog=_EPILOG)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--if-exists", type=click.Choice(["fail", "replace", "append"]), default="fail",
              show_default=True, help="When the registry holds records: refuse, delete them "
              "first, or merge (same uid and content: skipped; other content: refused).")
@click.option("--dry-run", is_flag=True, help="Check and import, then roll back: only report.")
@click.option("--storage-map", "storage_map", multiple=True, metavar="OLD=NEW",
              help="Re-point records of storage root OLD to NEW, where the bytes were moved "
              "(repeat; split at the '=' that ends a storage root of the export).")
@click.option("--mute", is_flag=True, help="No progress bars.")
@_run
def import_(directory: str, if_exists: str, dry_run: bool, storage_map: tuple[str, ...],  # noqa: FBT001
            mute: bool) -> None:  # noqa: FBT001
    """Load the export in DIRECTORY into the registry, in one transaction.

    The export is checked whole first (a damaged or newer one writes nothing); ids are
    re-mapped, and counts and checksums compared after loading.
    """
    from lamin_io.registry import import_registry
    from lamin_io.registry._export_check import export_roots

    roots = export_roots(Path(directory).expanduser()) if storage_map else []
    moves = _storage_map(storage_map, roots)
    report = import_registry(directory, if_exists, storage_map=moves, dry_run=dry_run,
                             mute=mute)
    for line in report.renumbered:
        click.echo(("would place " if dry_run else "placed ") + line)
    click.echo(str(report))


def main() -> None:
    """Entry point of the ``lamin-io`` script."""
    cli()


if __name__ == "__main__":
    main()
