"""Network faults (issue 25, item 4): every S3 client lamin-io uses, through a fault proxy.

A :class:`lamin_io.testing.FaultProxy` sits between each client and the real S3 server on
loopback (moto); no client is mocked. The clients, told apart by the requests they send:

- ``botocore``: an h5ad opened lazily (``HEAD`` by botocore's client, ranged ``GET`` s signed
  by botocore and sent by urllib3, pinned to the version opened);
- ``s3fs``: a zarr store opened lazily (zarr's ``FsspecStore`` over s3fs and aiobotocore);
- ``pyarrow``: a parquet file opened as a ``pyarrow.dataset`` (pyarrow's own S3 client);
- ``polars``: the same file scanned by polars, collected inside the ``with`` block;
- ``tiledbsoma``: a ``.tiledbsoma`` experiment opened and its obs read (TileDB's S3 client).

For each: up to 3 transient errors, resets or cut answers, then the right data; a
persistent 503 is a :class:`~lamin_io.errors.StorageServiceError` naming the endpoint and
the S3 error code, after the retry budget (4 attempts a request); an endpoint that stops
answering (requests read and never answered, or connections never accepted) is a
:class:`~lamin_io.errors.StorageTimeoutError` at the default settings, well before the 45 s
hang guard (the budgets in :mod:`lamin_io.storage._options` make it 30 s at most). The same
for saves and downloads, and for the loaders mid-epoch: a fault is retried (the epoch is
complete and right) or fails the iterator with a typed error, never a hang or a short epoch.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import BUCKET, snapshot, write_bytes

import lamin_io as ln
from lamin_io import errors
from lamin_io.storage import reset_clients, to_upath
from lamin_io.testing import FaultProxy, ProxyRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: Rows read from the AnnData stores (every third: several ranges, several chunks).
ROWS = np.arange(0, 300, 3)
#: Seconds after which an operation that has not returned counts as hung. The defaults
#: bound a black hole to 30 s (see ``lamin_io.storage._options``); the rest is slack for a
#: loaded machine running five clients at once.
HANG_GUARD = 45.0


# -- what is stored ------------------------------------------------------------------------------


@dataclass
class Stored:
    """The test objects, stored once per module, and what they hold."""

    prefix: str
    adata: ad.AnnData
    table: pa.Table

    def url(self, name: str) -> str:
        return f"s3://{BUCKET}/{self.prefix}/{name}"


def _adata(n_obs: int = 300, n_vars: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    obs = pd.DataFrame({"cid": np.arange(n_obs, dtype=np.float64) + 1000 * seed,
                        "g": pd.Categorical(rng.choice(list("abc"), n_obs))},
                       index=[f"c{seed}-{i}" for i in range(n_obs)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))


@pytest.fixture(scope="module")
def stored(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    """An h5ad, a zarr store, a parquet file and a TileDB-SOMA experiment in the bucket."""
    import tiledbsoma.io

    folder = tmp_path_factory.mktemp("network-faults")
    adata = _adata()
    adata.write_h5ad(folder / "a.h5ad", compression=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(folder / "a.zarr")
    table = pa.table({"x": np.arange(5000), "y": np.arange(5000) * 0.5})
    pq.write_table(table, folder / "t.parquet", row_group_size=1000)
    tiledbsoma.io.from_anndata(str(folder / "s.tiledbsoma"), adata, measurement_name="RNA")
    stored = Stored(uuid.uuid4().hex, adata, table)
    for name in ("a.h5ad", "a.zarr", "t.parquet", "s.tiledbsoma"):
        remote = to_upath(stored.url(name), {"endpoint_url": s3_endpoint})
        remote.fs.put(str(folder / name), remote.path, recursive=(folder / name).is_dir())
    return stored


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of the S3 server; every client made anew for it."""
    reset_clients()  # no client keeps connections, or a spent retry quota, from before
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy
        proxy.clear()
    reset_clients()


# -- the clients ---------------------------------------------------------------------------------


def _x_rows(acc: Any) -> np.ndarray:
    x = acc[ROWS].X
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def _check_rows(got: Any, stored: Stored) -> None:
    np.testing.assert_array_equal(got, stored.adata.X[ROWS].toarray())


def _polars_rows(scan: Any) -> pa.Table:
    with scan as lf:
        return lf.collect().to_arrow()


def _soma_obs(experiment: Any) -> pd.DataFrame:
    with experiment:
        return experiment.obs.read().concat().to_pandas()


@dataclass(frozen=True)
class Client:
    """One S3 client: how to open and read with it, and which requests are its own."""

    name: str
    stored: str
    #: Which requests the client sends (faults hit those only).
    mine: Callable[[ProxyRequest], bool]
    #: ``open(url, storage_options)``: what ``lamin_io.open`` does before any lazy read
    #: (for the clients that are not ``lazy``: nothing, the read opens).
    open: Callable[[str, dict[str, Any]], Any]
    #: ``read(opened)``: the lazy read; the whole operation for clients whose reads after
    #: ``open()`` are the engine's own objects (pyarrow's Dataset, TileDB-SOMA's Experiment).
    read: Callable[[Any], Any]
    check: Callable[[Any, Stored], None]
    #: Whether its reads after ``open()`` go through lamin-io (typed errors): the others
    #: are checked on ``open()`` itself, which reads through the same client.
    lazy: bool = True
    #: The S3 error code a persistent 503 carries (TileDB retries ``SlowDown`` 100 times,
    #: about 150 s, whatever it is configured to do).
    code: str = "SlowDown"
    #: How often a request answered 503 each time is sent: 4 attempts (a first and 3
    #: retries, the default budget), except where a layer above the client sends it again.
    attempts: int = 4


CLIENTS = {
    "botocore": Client(
        "botocore", "a.h5ad",
        lambda r: r.user_agent.startswith(("python-urllib3", "Botocore")),
        lambda url, options: ln.open(url, storage_options=options), _x_rows, _check_rows,
        attempts=5),  # (one direct GET, then the client's 4: see lamin_io.storage._pinned)
    "s3fs": Client(
        "s3fs", "a.zarr", lambda r: "aiobotocore" in r.user_agent and ".zarr/" in r.path,
        lambda url, options: ln.open(url, storage_options=options), _x_rows, _check_rows),
    "pyarrow": Client(
        "pyarrow", "t.parquet",
        lambda r: "aws-sdk-cpp" in r.user_agent and ".parquet" in r.path,
        lambda url, options: (url, options),
        lambda at: ln.open(at[0], storage_options=at[1]).to_table(),
        lambda got, stored: _assert_table(got, stored.table), lazy=False),
    "polars": Client(
        "polars", "t.parquet", lambda r: r.user_agent.startswith("polars"),
        lambda url, options: ln.open(url, engine="polars", storage_options=options),
        _polars_rows, lambda got, stored: _assert_table(got, stored.table),
        attempts=8),  # (polars reads a failed range once more itself: twice object_store's 4)
    "tiledbsoma": Client(
        "tiledbsoma", "s.tiledbsoma",
        lambda r: "aws-sdk-cpp" in r.user_agent and "tiledbsoma" in r.path,
        lambda url, options: (url, options),
        lambda at: _soma_obs(ln.open(at[0], storage_options=at[1])),
        lambda got, stored: np.testing.assert_array_equal(
            got.set_index("obs_id").loc[stored.adata.obs_names, "cid"],
            stored.adata.obs["cid"]), lazy=False, code="ServiceUnavailable"),
}


def _assert_table(got: pa.Table, truth: pa.Table) -> None:
    assert got.sort_by("x").equals(truth)


def _run(operation: Callable[[], Any], guard: float = HANG_GUARD) -> tuple[Any, float]:
    """Run ``operation`` in a thread; return its result or exception and the seconds taken.

    Fails the test when it has not returned within ``guard`` seconds (a hang).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = operation()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(guard)
    took = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"no answer after {guard:g} s: the operation hangs")
    return outcome.get("error", outcome.get("value")), took


def _opened(client: Client, stored: Stored, endpoint: str) -> Any:
    return client.open(stored.url(client.stored), {"endpoint_url": endpoint})


# -- transient faults: retried -------------------------------------------------------------------

FAULTS = {
    "500": lambda proxy, when: proxy.fail(3, code="InternalError", when=when),
    "503": lambda proxy, when: proxy.fail(3, code="SlowDown", when=when),
    "reset": lambda proxy, when: proxy.reset(3, when=when),
    "cut": lambda proxy, when: proxy.cut(3, when=lambda r: r.method == "GET" and when(r)),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", CLIENTS)
def test_up_to_three_transient_faults_then_the_right_data(name: str, fault: str,
                                                          stored: Stored,
                                                          proxy: FaultProxy) -> None:
    client = CLIENTS[name]
    opened = _opened(client, stored, proxy.endpoint)
    FAULTS[fault](proxy, client.mine)
    got, _ = _run(lambda: client.read(opened))
    assert not isinstance(got, BaseException), f"{name}, 3 x {fault}: {got!r}"
    client.check(got, stored)
    assert proxy.stats.faults == 3, proxy.stats.log  # each one met, and retried past
    assert proxy.stats.requests > 3


@pytest.mark.parametrize("name", ["botocore", "s3fs"])
def test_a_tuned_retry_budget_holds_for_cut_answers(name: str, stored: Stored,
                                                    proxy: FaultProxy) -> None:
    """With no retries in the storage options, one answer cut short fails the read, typed.

    (The lazy readers ask a cut answer again themselves: they follow the same budget.)
    """
    client = CLIENTS[name]
    options = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 0}}}
    opened = client.open(stored.url(client.stored), options)
    proxy.cut(1, when=lambda r: r.method == "GET" and client.mine(r))
    error, _ = _run(lambda: client.read(opened))
    assert isinstance(error, errors.StorageUnreachableError), repr(error)
    assert proxy.stats.faults == 1


# -- a persistent 503: a typed error naming the endpoint and the code ----------------------------


@pytest.mark.parametrize("name", CLIENTS)
def test_persistent_503_is_a_typed_error_naming_endpoint_and_code(
        name: str, stored: Stored, proxy: FaultProxy) -> None:
    client = CLIENTS[name]
    opened = _opened(client, stored, proxy.endpoint)
    # (an error answer to a HEAD has no body, so no S3 error code: see the test below)
    proxy.fail(code=client.code, when=lambda r: client.mine(r) and r.method != "HEAD")
    error, took = _run(lambda: client.read(opened), guard=30)
    print(f"{name}: {took:.1f} s to the typed error")  # (a figure for the README)
    assert isinstance(error, errors.StorageServiceError), repr(error)
    assert isinstance(error, ConnectionError)
    text = str(error)
    assert proxy.endpoint in text
    assert f"503 {client.code}" in text
    # the budget was spent and no more (within 10 s by the backoff; not timed here)
    failed = Counter((method, path, byte_range) for method, path, outcome, byte_range
                     in proxy.stats.log if outcome == "status 503")
    assert set(failed.values()) == {client.attempts}, failed


def test_persistent_503_to_a_head_is_typed_too(stored: Stored, proxy: FaultProxy) -> None:
    """An error answer to a HEAD has no body: the status alone names what failed."""
    client = CLIENTS["pyarrow"]  # (its read starts with a HEAD of its own)
    opened = _opened(client, stored, proxy.endpoint)
    proxy.fail(code="SlowDown", when=lambda r: client.mine(r) and r.method == "HEAD")
    error, _ = _run(lambda: client.read(opened), guard=30)
    assert isinstance(error, errors.StorageServiceError), repr(error)
    assert proxy.endpoint in str(error)
    assert "S3 error 503" in str(error)
    assert proxy.stats.count("status 503", "HEAD") == client.attempts


# -- a black hole: a typed timeout at the default settings ---------------------------------------


@pytest.mark.parametrize("connections", [False, True], ids=["requests", "connections"])
def test_black_hole_is_a_typed_timeout_at_default_settings(
        connections: bool, stored: Stored, s3_server: Any, tmp_path: Path) -> None:
    """Every client at once, each behind a proxy of its own that stops answering.

    ``requests``: requests are read and never answered (a hung server: read timeouts);
    ``connections``: new connections are never accepted either (SYNs dropped: connect
    timeouts). Reads that were lazy wait on an endpoint opened while it answered.
    """
    reset_clients()
    proxies = {name: FaultProxy(s3_server.endpoint).start() for name in [*CLIENTS, "loader"]}
    try:
        opened = {name: _opened(client, stored, proxies[name].endpoint)
                  for name, client in CLIENTS.items()}
        loader, _ = _block_loader(tmp_path, proxies["loader"].endpoint)
        batches = iter(loader)
        next(batches)  # mid-epoch
        operations = {name: (lambda c=client, o=opened[name]: c.read(o))
                      for name, client in CLIENTS.items()}
        operations["loader"] = lambda: list(batches)
        for proxy in proxies.values():
            proxy.black_hole(connections=connections)
        outcomes: dict[str, Any] = {}
        start = time.monotonic()
        took: dict[str, float] = {}
        threads = [threading.Thread(target=_into, args=(outcomes, took, start, name, op),
                                    daemon=True) for name, op in operations.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, HANG_GUARD - (time.monotonic() - start)))
        hung = sorted(set(operations) - set(outcomes))
        assert not hung, f"no answer after {HANG_GUARD:g} s from {hung}"
        print("seconds to the typed error:",  # (a figure for the README, not asserted)
              {name: round(seconds, 1) for name, seconds in sorted(took.items())})
        for name, outcome in outcomes.items():
            assert isinstance(outcome, errors.StorageTimeoutError), (name, repr(outcome))
            assert isinstance(outcome, TimeoutError)
            assert proxies[name].endpoint in str(outcome), name
    finally:
        for proxy in proxies.values():
            proxy.stop()
        reset_clients()


def _into(outcomes: dict[str, Any], took: dict[str, float], start: float, name: str,
          operation: Callable[[], Any]) -> None:
    try:
        outcomes[name] = operation()
    except BaseException as exc:  # noqa: BLE001 (handed to the test)
        outcomes[name] = exc
    took[name] = time.monotonic() - start


# -- saves and downloads -------------------------------------------------------------------------


def _writes(r: ProxyRequest) -> bool:
    return r.method in ("PUT", "POST")


def test_save_retries_transient_faults(proxy: FaultProxy, tmp_path: Path) -> None:
    conn = ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}",
                      endpoint_url=proxy.endpoint)
    data = os.urandom(200_000)
    source = write_bytes(tmp_path / "blob.bin", data)
    proxy.fail(3, code="InternalError", when=_writes)
    artifact = ln.Artifact(source, key="blob.bin").save(mute=True)
    assert proxy.stats.faults == 3
    proxy.reset(3, when=lambda r: r.method == "GET")
    assert artifact.cache(mute=True).read_bytes() == data  # a download, reset 3 times
    assert proxy.stats.faults == 6
    assert len(snapshot(conn)[0]) == 1


def test_persistent_503_fails_a_save_typed_and_leaves_no_record(proxy: FaultProxy,
                                                                  tmp_path: Path) -> None:
    conn = ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}",
                      endpoint_url=proxy.endpoint)
    source = write_bytes(tmp_path / "blob.bin", os.urandom(50_000))
    before = snapshot(conn)
    proxy.fail(code="SlowDown", when=_writes)
    error, _ = _run(lambda: ln.Artifact(source, key="blob.bin").save(mute=True), guard=30)
    assert isinstance(error, errors.StorageServiceError), repr(error)
    assert proxy.endpoint in str(error)
    assert "503 SlowDown" in str(error)
    proxy.clear()
    assert snapshot(conn) == before  # no record, pending or ready; no object left


def test_persistent_503_fails_a_download_typed(proxy: FaultProxy, tmp_path: Path) -> None:
    ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}",
               endpoint_url=proxy.endpoint)
    artifact = ln.Artifact(write_bytes(tmp_path / "t.csv", b"a\n1\n2\n"), key="t.csv").save(
        mute=True)
    proxy.fail(code="InternalError", when=lambda r: r.method == "GET")
    error, _ = _run(lambda: artifact.load(), guard=30)
    assert isinstance(error, errors.StorageServiceError), repr(error)
    assert "500 InternalError" in str(error)
    proxy.clear()
    assert artifact.load()["a"].tolist() == [1, 2]


# -- the loaders, mid-epoch ----------------------------------------------------------------------


def _collection(tmp_path: Path, endpoint: str) -> tuple[Any, list[ad.AnnData]]:
    """Two h5ad artifacts saved through ``endpoint``, and a collection of them."""
    ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=endpoint)
    adatas = [_adata(120, 30, seed=1), _adata(80, 30, seed=2)]
    artifacts = []
    for i, adata in enumerate(adatas):
        path = tmp_path / f"part{i}.h5ad"
        adata.write_h5ad(path, compression=None)
        artifacts.append(ln.Artifact(path, key=f"atlas/part{i}.h5ad").save(mute=True))
    return ln.Collection(artifacts, key="atlas").save(), adatas


def _block_loader(tmp_path: Path, endpoint: str) -> tuple[Any, list[ad.AnnData]]:
    collection, adatas = _collection(tmp_path, endpoint)
    loader = collection.loader(batch_size=10, stream=True, obs_keys=["cid"],
                               encode_labels=False, block_size=5, fetch_factor=1)
    return loader, adatas


def _truth(adatas: list[ad.AnnData]) -> dict[float, np.ndarray]:
    return {float(cid): np.asarray(a.X[i].toarray()).ravel()
            for a in adatas for i, cid in enumerate(a.obs["cid"])}


def _check_epoch(batches: list[dict[str, Any]], adatas: list[ad.AnnData]) -> None:
    """Every cell once, with its own row: no short epoch, no wrong read."""
    truth = _truth(adatas)
    seen = [float(c) for b in batches for c in np.asarray(b["cid"]).ravel()]
    assert sorted(seen) == sorted(truth)
    for batch in batches:
        for cid, row in zip(np.asarray(batch["cid"]).ravel(), np.asarray(batch["X"]),
                            strict=True):
            np.testing.assert_array_equal(row, truth[float(cid)])


def _pinned_gets(r: ProxyRequest) -> bool:
    return r.method == "GET" and r.path.endswith(".h5ad")


def _mapped_batches(dataset: Any) -> Iterator[dict[str, Any]]:
    import torch
    from torch.utils.data import DataLoader

    from lamin_io.loaders import collate

    return iter(DataLoader(dataset, batch_size=10, shuffle=True, collate_fn=collate,
                           generator=torch.Generator().manual_seed(0)))


def _batches(loader: str, collection: Any) -> Iterator[dict[str, Any]]:
    """An epoch of ``collection.mapped()`` in a DataLoader, or of ``collection.loader()``."""
    if loader == "mapped":
        return _mapped_batches(collection.mapped(obs_keys=["cid"], encode_labels=False,
                                                 stream=True))
    return iter(collection.loader(batch_size=10, stream=True, obs_keys=["cid"],
                                  encode_labels=False, block_size=5, fetch_factor=1))


@pytest.mark.parametrize("loader", ["mapped", "loader"])
def test_a_transient_fault_mid_epoch_is_retried(loader: str, proxy: FaultProxy,
                                                tmp_path: Path) -> None:
    collection, adatas = _collection(tmp_path, proxy.endpoint)
    batches = _batches(loader, collection)
    got = [next(batches), next(batches)]
    proxy.reset_stats()
    proxy.fail(3, code="InternalError", when=_pinned_gets)
    rest, _ = _run(lambda: list(batches))
    assert not isinstance(rest, BaseException), repr(rest)
    assert proxy.stats.faults == 3  # met mid-epoch, and retried past
    _check_epoch(got + rest, adatas)


@pytest.mark.parametrize("loader", ["mapped", "loader"])
def test_a_persistent_fault_mid_epoch_fails_the_iterator_typed(loader: str, proxy: FaultProxy,
                                                               tmp_path: Path) -> None:
    collection, _ = _collection(tmp_path, proxy.endpoint)
    batches = _batches(loader, collection)
    delivered = [next(batches), next(batches)]
    proxy.fail(code="SlowDown", when=_pinned_gets)
    error, _ = _run(lambda: delivered.extend(batches), guard=30)
    assert isinstance(error, errors.StorageServiceError), repr(error)
    assert proxy.endpoint in str(error)
    assert "503 SlowDown" in str(error)
    assert len(delivered) < 20  # the epoch did not end as if it were complete


# -- anonymous writes: a typed permission error --------------------------------------------------

#: Variables through which botocore, pyarrow or polars could find credentials.
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def test_anonymous_writes_get_a_typed_permission_error(proxy: FaultProxy, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       s3_endpoint: str) -> None:
    """A bucket anonymous users may read but not write (issue 25, item 6).

    moto's own authentication answers unsigned requests with a 500, so the proxy plays
    the bucket's policy: unsigned writes get S3's ``403 AccessDenied``.
    """
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    public = to_upath(f"{prefix}/public.parquet", {"endpoint_url": s3_endpoint})
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, tmp_path / "public.parquet")
    public.fs.pipe(public.path, (tmp_path / "public.parquet").read_bytes(), ACL="public-read")
    for name in _CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    empty = write_bytes(tmp_path / "empty-aws-file", b"")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    reset_clients()
    proxy.deny_unsigned(when=lambda r: r.method in ("PUT", "POST", "DELETE"))
    conn = ln.connect(tmp_path / "r.db", prefix, endpoint_url=proxy.endpoint, anon=True)
    anon = {"endpoint_url": proxy.endpoint, "anon": True}
    assert ln.open(f"{prefix}/public.parquet", storage_options=anon).to_table().equals(table)
    before = snapshot(conn)
    with pytest.raises(errors.StoragePermissionError) as info:
        ln.Artifact(write_bytes(tmp_path / "t.csv", b"a\n1\n"), key="t.csv").save(mute=True)
    assert isinstance(info.value, PermissionError)
    assert proxy.endpoint in str(info.value)
    assert "AccessDenied" in str(info.value)
    assert proxy.stats.count("denied") >= 1
    assert snapshot(conn) == before  # no record left, and nothing stored
