"""Tables: every format x engine x storage x layout, checked against pandas in memory."""

from __future__ import annotations

import sys
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, upload

import lamin_io as ln
from lamin_io import errors
from lamin_io.accessors import open_many
from lamin_io.storage import polars_storage_options, pyarrow_filesystem, suffix_of, to_upath

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pl = pytest.importorskip("polars")

N = 240
#: One suffix per format; the other suffixes each format claims are checked separately.
FORMATS = [".parquet", ".csv", ".tsv", ".feather", ".ndjson", ".orc"]
EXTRA_SUFFIXES = [".pq", ".csv.gz", ".tsv.gz", ".arrow", ".ipc", ".json", ".jsonl"]
ENGINES = ["pyarrow", "polars"]
#: The spec: what polars cannot read (everything else must work).
POLARS_CANNOT = {".orc"}
POLARS_NO_HIVE = {".csv", ".tsv", ".ndjson"}


def _ipc(d: pd.DataFrame, p: Path) -> None:
    with pa.ipc.new_file(p, pa.Schema.from_pandas(d, preserve_index=False)) as w:
        w.write_table(pa.Table.from_pandas(d, preserve_index=False))


WRITERS: dict[str, Callable[[pd.DataFrame, Path], Any]] = {
    ".parquet": lambda d, p: d.to_parquet(p, index=False),
    ".pq": lambda d, p: d.to_parquet(p, index=False),
    ".csv": lambda d, p: d.to_csv(p, index=False),
    ".csv.gz": lambda d, p: d.to_csv(p, index=False),
    ".tsv": lambda d, p: d.to_csv(p, sep="\t", index=False),
    ".tsv.gz": lambda d, p: d.to_csv(p, sep="\t", index=False),
    ".feather": lambda d, p: d.to_feather(p),
    ".arrow": _ipc,
    ".ipc": _ipc,
    ".ndjson": lambda d, p: d.to_json(p, orient="records", lines=True),
    ".json": lambda d, p: d.to_json(p, orient="records", lines=True),
    ".jsonl": lambda d, p: d.to_json(p, orient="records", lines=True),
    ".orc": lambda d, p: d.to_orc(p, index=False),
}


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    i = np.arange(N)
    return pd.DataFrame({
        "id": i.astype("int64"),
        "name": [f"n{k % 7}" for k in i],
        "value": i / 4,  # exact in text formats too
        "flag": i % 3 == 0,
        "year": np.where(i < N // 2, 2023, 2024).astype("int64"),
    })


def write(df: pd.DataFrame, path: Path, suffix: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[suffix or suffix_of(path.name)](df.reset_index(drop=True), path)
    return path


def shards(df: pd.DataFrame, n: int = 3) -> list[pd.DataFrame]:
    return [df.iloc[idx] for idx in np.array_split(np.arange(len(df)), n)]


def build(layout: str, suffix: str, df: pd.DataFrame, base: Path) -> Path:
    """Write ``df`` as a file, a folder (with or without a suffix) or a hive folder."""
    if layout == "file":
        return write(df, base / f"t{suffix}")
    if layout == "hive":
        root = base / "hive"
        for year, part in df.groupby("year"):
            write(part.drop(columns="year"), root / f"year={year}" / f"part-0{suffix}")
    else:
        root = base / ("t" + suffix if layout == "named" else "sharded")
        for i, part in enumerate(shards(df)):
            # a Spark-style folder: part files without a suffix are allowed in named folders
            name = f"part-{i}" if (layout == "named" and i == 2) else f"part-{i}{suffix}"
            write(part, root / "sub" / name if i == 1 else root / name, suffix)
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-0.crc").write_bytes(b"not data")
    return root




def read(opened: Any, engine: str) -> pd.DataFrame:
    """Collect what open() gave: a pyarrow Dataset or a context manager yielding a LazyFrame."""
    if engine == "pyarrow":
        assert isinstance(opened, ds.Dataset)
        return opened.to_table().to_pandas()
    with opened as lf:
        assert isinstance(lf, pl.LazyFrame)
        return lf.collect().to_pandas()


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal up to row order, column order, and the integer width of partition columns."""
    assert sorted(got.columns) == sorted(want.columns)
    got = got[list(want.columns)].copy()
    if "year" in got:  # hive values: int32 from pyarrow, Int64 from polars
        got["year"] = got["year"].astype("int64")
    pd.testing.assert_frame_equal(got.sort_values("id").reset_index(drop=True),
                                  want.sort_values("id").reset_index(drop=True))


def where(local: Path, storage: str, request: pytest.FixtureRequest) -> Any:
    if storage == "local":
        return local
    return upload(local, request.getfixturevalue("s3_endpoint"))


# -- lamin_io.open on paths and URLs ----------------------------------------------------------


@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["file", "named", "sharded", "hive"])
@pytest.mark.parametrize("suffix", FORMATS)
def test_open_path(suffix, layout, engine, storage, truth, tmp_path, request) -> None:
    df = truth if layout == "hive" else truth.drop(columns="year")
    target = where(build(layout, suffix, df, tmp_path), storage, request)
    if engine == "polars" and (suffix in POLARS_CANNOT
                               or (layout == "hive" and suffix in POLARS_NO_HIVE)):
        with pytest.raises(errors.UnsupportedFormatError, match="pyarrow"):
            ln.open(target, engine=engine)
        return
    assert_same(read(ln.open(target, engine=engine), engine), df)


@pytest.mark.parametrize("suffix", EXTRA_SUFFIXES)
def test_every_suffix_opens_and_loads(suffix, truth, tmp_path) -> None:
    from lamin_io.accessors._tables import load_table

    df = truth.drop(columns="year")
    path = write(df, tmp_path / f"t{suffix}")
    for engine in ENGINES:
        assert_same(read(ln.open(path, engine=engine), engine), df)
    assert_same(load_table(to_upath(path)), df)


@pytest.mark.parametrize("layout", ["file", "hive"])
@pytest.mark.parametrize("suffix", FORMATS)
def test_load_reads_remote_paths(suffix, layout, truth, tmp_path, s3_endpoint) -> None:
    from lamin_io.accessors._tables import load_table

    df = truth if layout == "hive" else truth.drop(columns="year")
    remote = upload(build(layout, suffix, df, tmp_path), s3_endpoint)
    assert_same(load_table(remote), df)


@pytest.mark.parametrize("engine", ENGINES)
def test_url_with_storage_options(engine, truth, tmp_path, s3_endpoint) -> None:
    df = truth.drop(columns="year")
    remote = upload(write(df, tmp_path / "t.parquet"), s3_endpoint)
    opened = ln.open(f"s3://{remote.path}", engine=engine,
                     storage_options={"endpoint_url": s3_endpoint})
    assert_same(read(opened, engine), df)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["file", "sharded"])
@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".ndjson"])
def test_use_fsspec(suffix, layout, engine, truth, tmp_path, s3_endpoint) -> None:
    df = truth.drop(columns="year")
    remote = upload(build(layout, suffix, df, tmp_path), s3_endpoint)
    assert_same(read(ln.open(remote, engine=engine, use_fsspec=True), engine), df)


def test_use_fsspec_closes_handles(truth, tmp_path, s3_endpoint, monkeypatch) -> None:
    remote = upload(build("sharded", ".parquet", truth, tmp_path), s3_endpoint)
    fs_class = type(remote.fs)
    real_open, handles = fs_class.open, []

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        handles.append(real_open(self, *args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(fs_class, "open", spy)
    with ln.open(remote, engine="polars", use_fsspec=True) as lf:
        assert lf.select(pl.len()).collect().item() == N
        assert len(handles) == 3
        assert not any(h.closed for h in handles)
    assert all(h.closed for h in handles)


def test_engine_options_pass_through(truth, tmp_path) -> None:
    df = truth.drop(columns="year")
    path = write(df, tmp_path / "t.csv")
    schema = pa.schema([("id", pa.int32()), ("name", pa.string()), ("value", pa.float64()),
                        ("flag", pa.bool_())])
    assert ln.open(path, schema=schema).schema == schema
    with ln.open(path, engine="polars", n_rows=5) as lf:
        assert lf.collect().height == 5


def test_files_on_two_filesystems_combine(truth, tmp_path, s3_endpoint) -> None:
    df = truth.drop(columns="year")
    first, second = shards(df, 2)
    local = write(first, tmp_path / "a" / "t.parquet")
    remote = upload(write(second, tmp_path / "b" / "t.parquet"), s3_endpoint)
    for engine in ENGINES:
        assert_same(read(open_many([local, remote], engine=engine), engine), df)


def test_lazy_read_of_hive_partitions_prunes(truth, tmp_path) -> None:
    root = build("hive", ".parquet", truth, tmp_path)
    dataset = ln.open(root)
    got = dataset.to_table(filter=ds.field("year") == 2024, columns=["id", "year"]).to_pandas()
    assert_same(got, truth.loc[truth.year == 2024, ["id", "year"]])
    with ln.open(root, engine="polars") as lf:
        got = lf.filter(pl.col("year") == 2023).select("id", "year").collect().to_pandas()
    assert_same(got, truth.loc[truth.year == 2023, ["id", "year"]])


# -- through the registry ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_registry_artifacts(suffix, conn, truth, tmp_path) -> None:
    df = truth.drop(columns="year")
    parts = shards(df)
    files = [ln.Artifact(write(p, tmp_path / "in" / f"part-{i}{suffix}"),
                         key=f"sales/part-{i}{suffix}").save(mute=True)
             for i, p in enumerate(parts)]
    named = ln.Artifact(build("named", suffix, df, tmp_path / "named"),
                        key=f"folders/t{suffix}").save(mute=True)
    hive = ln.Artifact(build("hive", suffix, truth, tmp_path / "hv"),
                       key="folders/hive").save(mute=True)
    collection = ln.Collection(files, key="sales").save()
    query = ln.Artifact.filter(key__startswith="sales/")
    assert len(query) == 3
    polars_ok = suffix not in POLARS_CANNOT

    for artifact, part in zip(files, parts, strict=True):
        assert_same(artifact.load(), part)
    assert_same(named.load(), df)
    assert_same(hive.load(), truth)
    for engine in ENGINES if polars_ok else ["pyarrow"]:
        assert_same(read(files[0].open(engine=engine), engine), parts[0])
        assert_same(read(named.open(engine=engine), engine), df)
        assert_same(read(query.open(engine=engine), engine), df)
        assert_same(read(collection.open(engine=engine), engine), df)
        # a folder artifact and file artifacts of one format also read as one table
        both = ln.ArtifactSet([named, files[0]])
        assert_same(read(both.open(engine=engine), engine), pd.concat([df, parts[0]]))
        if engine == "pyarrow" or suffix not in POLARS_NO_HIVE:
            assert_same(read(hive.open(engine=engine), engine), truth)
    if not polars_ok:
        with pytest.raises(errors.UnsupportedFormatError, match="pyarrow"):
            query.open(engine="polars")


def test_registry_mixed_formats(conn, truth, tmp_path) -> None:
    df = truth.drop(columns="year")
    a = ln.Artifact(write(df, tmp_path / "a.parquet"), key="mix/a.parquet").save(mute=True)
    b = ln.Artifact(write(df, tmp_path / "b.csv"), key="mix/b.csv").save(mute=True)
    for engine in ENGINES:
        with pytest.raises(errors.UnsupportedFormatError, match="mixed formats"):
            ln.Artifact.filter(key__startswith="mix/").open(engine=engine)
        with pytest.raises(errors.UnsupportedFormatError, match="mixed formats"):
            ln.Collection([a, b], key="mix").save().open(engine=engine)
    with pytest.raises(errors.InvalidArgumentError, match="matched nothing"):
        ln.Artifact.filter(key__startswith="nothing/").open()


def test_load_warns_above_the_configured_size(conn, truth, tmp_path, monkeypatch) -> None:
    artifact = ln.Artifact(write(truth, tmp_path / "t.parquet"), key="t.parquet").save()
    monkeypatch.setenv("LAMIN_IO_LOAD_WARN_BYTES", str(artifact.size - 1))
    with pytest.warns(UserWarning, match="LAMIN_IO_LOAD_WARN_BYTES") as record:
        artifact.load()
    assert record[0].filename == __file__  # points at the caller's line
    for quiet in (str(artifact.size), "0"):
        monkeypatch.setenv("LAMIN_IO_LOAD_WARN_BYTES", quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            artifact.load()
    monkeypatch.setenv("LAMIN_IO_LOAD_WARN_BYTES", "ten gigabytes")
    with pytest.raises(errors.InvalidArgumentError, match="LAMIN_IO_LOAD_WARN_BYTES"):
        artifact.load()


# -- pushdown: a filtered, projected scan reads a small part of the object --------------------

ROWS, ROW_GROUP = 2_000_000, 50_000


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": np.arange(ROWS, dtype="int64")})  # sorted: row groups prune
    for name in ("a", "b", "c"):
        df[name] = rng.random(ROWS, dtype=np.float32)
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path,
                   row_group_size=ROW_GROUP, compression="snappy")
    return path, df


def test_pushdown_reads_a_small_fraction(big_parquet, s3_server, tmp_path) -> None:
    path, df = big_parquet
    ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}",
               endpoint_url=s3_server.endpoint)
    artifact = ln.Artifact(path, key="big.parquet").save(mute=True)
    lo, hi = 1_000_000, 1_060_000  # 3% of the rows, in two row groups
    want = df.loc[(df.id >= lo) & (df.id < hi), ["id", "a"]]

    s3_server.reset()
    with artifact.open(engine="polars") as lf:
        got = lf.filter((pl.col("id") >= lo) & (pl.col("id") < hi)).select("id", "a").collect()
    polars_bytes = s3_server.stats.bytes_sent
    assert_same(got.to_pandas(), want)

    s3_server.reset()
    dataset = artifact.open()
    got = dataset.to_table(filter=(ds.field("id") >= lo) & (ds.field("id") < hi),
                           columns=["id", "a"]).to_pandas()
    pyarrow_bytes = s3_server.stats.bytes_sent
    assert_same(got, want)

    fractions = {"polars": polars_bytes / artifact.size, "pyarrow": pyarrow_bytes / artifact.size}
    print(f"object {artifact.size} bytes; read fraction: "
          + ", ".join(f"{k} {v:.2%}" for k, v in fractions.items()))
    assert all(f < 0.2 for f in fractions.values()), fractions


# -- settings for the engines -----------------------------------------------------------------


def test_engine_settings_from_storage_options(s3_endpoint) -> None:
    path = to_upath(f"s3://{BUCKET}/x.parquet", {"endpoint_url": s3_endpoint, "key": "AKID",
                                                 "secret": "sEcReT", "token": "tOkEn"})
    options = polars_storage_options(path)
    assert options is not None
    assert options["aws_endpoint_url"] == s3_endpoint
    assert options["aws_allow_http"] == "true"  # the endpoint is http://
    assert (options["aws_access_key_id"], options["aws_secret_access_key"],
            options["aws_session_token"]) == ("AKID", "sEcReT", "tOkEn")
    assert options["aws_region"]
    anon = polars_storage_options(to_upath(f"s3://{BUCKET}/x.parquet",
                                           {"endpoint_url": s3_endpoint, "anon": True}))
    assert anon is not None
    assert anon["aws_skip_signature"] == "true"
    assert not {"aws_access_key_id", "aws_secret_access_key"} & set(anon)
    assert polars_storage_options(to_upath("/tmp/x.parquet")) is None
    assert type(pyarrow_filesystem(path)).__name__ == "S3FileSystem"
    assert type(pyarrow_filesystem(path, use_fsspec=True)).__name__ == "PyFileSystem"
    assert type(pyarrow_filesystem(to_upath("/tmp"))).__name__ == "LocalFileSystem"


@pytest.mark.parametrize("engine", ENGINES)
def test_anonymous_access(engine, truth, tmp_path, s3_endpoint) -> None:
    df = truth.drop(columns="year")
    remote = upload(write(df, tmp_path / "t.parquet"), s3_endpoint)
    remote.fs.chmod(remote.path, acl="public-read")  # readable without credentials
    anon = to_upath(f"s3://{remote.path}", {"endpoint_url": s3_endpoint, "anon": True})
    assert_same(read(ln.open(anon, engine=engine), engine), df)


def test_secrets_stay_out_of_reprs_errors_and_logs(truth, tmp_path, s3_endpoint,
                                                    caplog) -> None:
    secret = "sEcReT-" + uuid.uuid4().hex
    df = truth.drop(columns="year")
    remote = upload(write(df, tmp_path / "t.parquet"), s3_endpoint)
    options = {"endpoint_url": s3_endpoint, "key": "AKID", "secret": secret}
    url = f"s3://{remote.path}"
    shown: list[str] = []
    caplog.set_level("DEBUG", logger="lamin_io")
    dataset = ln.open(url, storage_options=options)
    shown += [repr(dataset), repr(dataset.filesystem), str(dataset.files)]
    scan = ln.open(url, engine="polars", storage_options=options)
    shown.append(repr(scan))
    with scan as lf:
        shown += [repr(lf), lf.explain()]
    for bad in ({"engine": "nope"}, {"engine": "polars", "use_fsspec": "yes"}):
        with pytest.raises(errors.LaminIOError) as info:
            ln.open(url, storage_options=options, **bad)
        shown.append(str(info.value))
    with pytest.raises(errors.PathNotFoundError) as missing:
        open_many([url + ".missing"], storage_options=options)
    shown.append(str(missing.value))
    shown.append(caplog.text)
    assert not [s for s in shown if secret in s]


# -- bad inputs get typed errors --------------------------------------------------------------


def test_unknown_engine(truth, tmp_path) -> None:
    path = write(truth, tmp_path / "t.parquet")
    with pytest.raises(errors.InvalidArgumentError, match="'pyarrow'.*'polars'"):
        ln.open(path, engine="duckdb")


def test_unsupported_pair_lists_what_works(truth, tmp_path) -> None:
    path = write(truth, tmp_path / "t.orc")
    with pytest.raises(errors.UnsupportedFormatError) as info:
        ln.open(path, engine="polars")
    assert "'pyarrow'" in str(info.value)
    assert "parquet" in str(info.value)  # what polars does open


def test_hive_csv_with_polars(truth, tmp_path) -> None:
    root = build("hive", ".csv", truth, tmp_path)
    with pytest.raises(errors.UnsupportedFormatError, match="hive"):
        ln.open(root, engine="polars")


def test_use_fsspec_with_hive_and_polars(truth, tmp_path, s3_endpoint) -> None:
    remote = upload(build("hive", ".parquet", truth, tmp_path), s3_endpoint)
    with pytest.raises(errors.InvalidArgumentError, match="use_fsspec"):
        ln.open(remote, engine="polars", use_fsspec=True)
    # pyarrow reads partition values from paths, through fsspec too
    assert_same(read(ln.open(remote, use_fsspec=True), "pyarrow"), truth)


def test_use_fsspec_must_be_a_bool(truth, tmp_path) -> None:
    path = write(truth, tmp_path / "t.parquet")
    with pytest.raises(errors.InvalidArgumentError, match="use_fsspec"):
        ln.open(path, use_fsspec="yes")


def test_mixed_folder(truth, tmp_path) -> None:
    write(truth, tmp_path / "mixed" / "a.parquet")
    write(truth, tmp_path / "mixed" / "b.csv")
    for engine in ENGINES:
        with pytest.raises(errors.UnsupportedFormatError, match="mixes table formats"):
            ln.open(tmp_path / "mixed", engine=engine)
    write(truth, tmp_path / "t.parquet" / "a.parquet")
    write(truth, tmp_path / "t.parquet" / "b.csv")
    with pytest.raises(errors.UnsupportedFormatError, match="named as parquet"):
        ln.open(tmp_path / "t.parquet")


def test_empty_and_unreadable_folders(truth, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / "_SUCCESS").write_bytes(b"")
    for name in ("empty", "only_hidden"):
        with pytest.raises(errors.UnsupportedFormatError, match="no data files"):
            ln.open(tmp_path / name)
    write(truth, tmp_path / "nosuffix" / "a.parquet")
    (tmp_path / "nosuffix" / "part-1").write_bytes(b"?")
    with pytest.raises(errors.UnsupportedFormatError, match="no suffix"):
        ln.open(tmp_path / "nosuffix")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(errors.UnsupportedFormatError, match="not tables"):
        ln.open(tmp_path / "notes")
    (tmp_path / "plain").write_bytes(b"no suffix")
    with pytest.raises(errors.UnsupportedFormatError, match="without a suffix") as info:
        ln.open(tmp_path / "plain")
    assert ".h5ad" in str(info.value)
    assert ".parquet" in str(info.value)


def test_open_many_rejects_non_tables(tmp_path) -> None:
    (tmp_path / "x.h5ad").write_bytes(b"")
    with pytest.raises(errors.UnsupportedFormatError, match="as a table"):
        open_many([tmp_path / "x.h5ad"])
    with pytest.raises(errors.InvalidArgumentError, match="at least one"):
        open_many([])
    with pytest.raises(errors.PathNotFoundError):
        open_many([tmp_path / "missing.parquet"])


def test_tables_are_read_only(truth, tmp_path) -> None:
    path = write(truth, tmp_path / "t.parquet")
    with pytest.raises(errors.WriteNotSupportedError):
        ln.open(path, mode="r+")


def test_missing_polars_names_the_extra(truth, tmp_path, monkeypatch) -> None:
    path = write(truth, tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "polars", None)
    with pytest.raises(errors.MissingDependencyError, match=r"lamin-io\[polars\]"):
        ln.open(path, engine="polars")


def test_a_keyword_the_table_does_not_fit_is_the_callers_mistake(conn, truth, tmp_path) -> None:
    """A reader's ValueError about the caller's keywords is not reported as damage."""
    df = truth.drop(columns="year")
    artifact = ln.Artifact(write(df, tmp_path / "t.csv"), key="t.csv").save(mute=True)
    with pytest.raises(errors.InvalidArgumentError, match="usecols="):
        artifact.load(usecols=["no_such_column"])
    assert_same(artifact.load(), df)  # the file itself reads
