"""TileDB-SOMA stores (``.tiledbsoma``): open the object they hold, load it, write AnnData in.

``open_soma`` returns the ``tiledbsoma.Experiment``, ``Measurement`` or ``Collection`` itself,
opened with a ``SOMATileDBContext`` built from the path's storage settings (the same
endpoint, region and credentials fsspec uses; see :func:`lamin_io.storage.tiledb_config`).
``load_soma`` exports an experiment to AnnData with tiledbsoma's own ``to_anndata``, and
``write_experiment`` writes AnnData objects into a new or an existing experiment with
tiledbsoma's registration (``register_anndatas``), so appended cells and genes get new join
ids. tiledbsoma is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any

from lamin_io.accessors._formats import parameters
from lamin_io.errors import (
    CorruptArtifactError,
    InvalidArgumentError,
    MissingDependencyError,
    NameNotFoundError,
    UnsupportedFormatError,
    WriteNotSupportedError,
)
from lamin_io.storage import is_local, missing_path, storage_error, tiledb_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import ModuleType

    import anndata as ad
    import numpy as np
    import pandas as pd
    from upath import UPath

__all__ = [
    "SOMA_MODES",
    "WritableSOMA",
    "count_observations",
    "load_soma",
    "open_soma",
    "soma_context",
    "soma_keywords",
    "write_experiment",
]

logger = logging.getLogger(__name__)

#: The modes TileDB-SOMA objects open in (its ``"d"``, delete, is not offered).
SOMA_MODES = ("r", "w")


def _tiledbsoma() -> ModuleType:
    try:
        import tiledbsoma
        import tiledbsoma.io
    except ImportError as exc:
        msg = "TileDB-SOMA stores need tiledbsoma: pip install 'lamin-io[soma]'"
        raise MissingDependencyError(msg) from exc
    return tiledbsoma


#: Contexts kept per process and set of TileDB settings (see :func:`soma_context`).
_CONTEXTS = 16
_contexts: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}
_contexts_lock = threading.Lock()


def soma_context(path: UPath) -> Any:
    """Return a ``tiledbsoma.SOMATileDBContext`` that reaches ``path``.

    Local paths get a default context; ``s3://`` paths one configured from the path's
    storage settings (endpoint, region, credentials), as :func:`tiledb_config` spells them.

    One context is made per process and set of settings, and shared by every open with
    them: a context owns TileDB's thread pools and S3 client, which are costly to make and
    were seen to abort the process when many were dropped while others ran. At most
    :data:`_CONTEXTS` are kept per process (new credentials make a new set of settings);
    those a forked process inherits are kept, never torn down in it.
    """
    config = tiledb_config(path) or {}
    key = (os.getpid(), tuple(sorted(config.items())))
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = _tiledbsoma().SOMATileDBContext(tiledb_config=config)
            mine = [k for k in _contexts if k[0] == key[0]]
            if len(mine) >= _CONTEXTS:
                del _contexts[mine[0]]  # (the oldest: dicts keep insertion order)
            _contexts[key] = context
    return context


def _uri(path: UPath) -> str:
    return str(path.path) if is_local(path) else str(path)


@contextlib.contextmanager
def _soma_errors(path: UPath) -> Iterator[None]:
    """Translate tiledbsoma's failures to read a store into lamin-io errors naming the path.

    "Nothing there" is a missing path or an :class:`UnsupportedFormatError`; any other
    failure of TileDB to read what is there (a fragment that is truncated, missing or
    cannot be decoded) a :class:`CorruptArtifactError`.
    """
    tiledbsoma = _tiledbsoma()
    try:
        yield
    except tiledbsoma.DoesNotExistError as exc:
        if not path.exists():
            raise missing_path(path, "write an experiment with lamin_io."
                               "save_tiledbsoma_experiment or tiledbsoma.io.from_anndata"
                               ) from exc
        msg = f"{path} holds no TileDB-SOMA object (no TileDB group or array metadata)"
        raise UnsupportedFormatError(msg) from exc
    except tiledbsoma.SOMAError as exc:
        typed = storage_error(exc, str(path), dict(path.storage_options).get("endpoint_url"))
        if typed is not None:  # (S3 unreachable, refusing or failing: not the store's fault)
            raise typed from exc
        reason = "" if is_local(path) else ", or the storage did not answer as TileDB expects"
        msg = (f"{path} cannot be read as a TileDB-SOMA store ({exc}); it is damaged or "
               f"incomplete{reason}: restore it from its source")
        raise CorruptArtifactError(msg) from exc


def soma_keywords(what: str, suffix: str, kwargs: Mapping[str, Any], *,
                  folder: bool | None = None) -> frozenset[str] | None:
    """Return what ``open()``/``load()`` hand to tiledbsoma (the format table's hook).

    ``open()``: ``tiledbsoma.open``'s keywords but the mode and context lamin-io gives;
    ``load()``: ``tiledbsoma.io.to_anndata``'s.
    """
    if what == "open":
        return parameters("tiledbsoma:open", skip=("mode", "context"))
    return parameters("tiledbsoma.io:to_anndata", skip=("measurement_name",))


def open_soma(path: UPath, *, mode: str = "r", on_close: Callable[[], Any] | None = None,
              **kwargs: Any) -> Any:
    """Open the SOMA object stored at ``path`` (the format table's opener).

    Parameters
    ----------
    path
        A ``.tiledbsoma`` folder, local or on S3.
    mode
        ``"r"`` or ``"w"``. SOMA has no ``"r+"``: an object opened with ``"w"`` is written
        to, and read again after reopening it with ``"r"``.
    on_close
        Called once after a ``"w"`` object is closed; given one, the object comes wrapped in
        a :class:`WritableSOMA` (the registry saves a new artifact version this way).
    **kwargs
        Passed to ``tiledbsoma.open`` (``soma_type``, ``tiledb_timestamp``).

    Returns
    -------
    tiledbsoma.Experiment | tiledbsoma.Measurement | tiledbsoma.Collection | WritableSOMA
        The stored object, a context manager.
    """
    if mode not in SOMA_MODES:
        msg = (f"cannot open {path} in mode {mode!r}: TileDB-SOMA objects open in mode 'r' "
               f"(read) or 'w' (write); there is no 'r+': write with 'w', then reopen "
               f"with 'r' to read what was written")
        raise WriteNotSupportedError(msg)
    tiledbsoma = _tiledbsoma()
    with _soma_errors(path):
        obj = tiledbsoma.open(_uri(path), mode, context=soma_context(path), **kwargs)
    if on_close is None or mode == "r":
        return obj
    return WritableSOMA(obj, on_close)


def _open_experiment(path: UPath, what: str) -> Any:
    tiledbsoma = _tiledbsoma()
    with _soma_errors(path):
        obj = tiledbsoma.open(_uri(path), "r", context=soma_context(path))
    if not isinstance(obj, tiledbsoma.Experiment):
        kind = type(obj).__name__
        obj.close()
        msg = (f"{what} needs a SOMA Experiment; {path} holds a {kind}: open it with "
               f"lamin_io.open() and read its members instead")
        raise UnsupportedFormatError(msg)
    return obj


def load_soma(path: UPath, *, measurement_name: str = "RNA", **kwargs: Any) -> ad.AnnData:
    """Read a whole SOMA experiment into an AnnData (the format table's loader).

    Uses ``tiledbsoma.io.to_anndata``; obs and var names come back as they were written.

    Parameters
    ----------
    path
        A ``.tiledbsoma`` experiment folder.
    measurement_name
        The measurement whose ``X``, var, obsm, ... become the AnnData's.
    **kwargs
        Passed to ``tiledbsoma.io.to_anndata`` (``X_layer_name``, ``obs_id_name``, ...).
    """
    tiledbsoma = _tiledbsoma()
    with _open_experiment(path, "load()") as exp:
        if measurement_name not in exp.ms:
            names = ", ".join(repr(k) for k in exp.ms) or "none"
            msg = (f"{path} has no measurement {measurement_name!r} (measurements: {names}); "
                   f"pass measurement_name=")
            raise NameNotFoundError(msg)
        with _soma_errors(path):
            return tiledbsoma.io.to_anndata(exp, measurement_name, **kwargs)


def count_observations(path: UPath) -> int | None:
    """Return the number of cells (obs rows) of the experiment at ``path``; ``None`` if none."""
    tiledbsoma = _tiledbsoma()
    with _soma_errors(path), tiledbsoma.open(_uri(path), "r",
                                             context=soma_context(path)) as obj:
        if not isinstance(obj, tiledbsoma.Experiment) or "obs" not in obj:
            return None
        return int(obj.obs.count)


def _ids(df: pd.DataFrame, name: str, axis: str, i: int) -> pd.Index:
    """Return the ids of an obs/var frame: column ``name``, else an index of that name."""
    import pandas as pd

    if name in df.columns:
        return pd.Index(df[name])
    if df.index.name in (name, "index", None):
        return df.index
    msg = (f"AnnData #{i} has no {axis} column {name!r} and its {axis} index is named "
           f"{df.index.name!r}: pass {axis}_id_name= naming the {axis} column (or index) "
           f"that holds unique ids; {axis} columns: {', '.join(map(str, df.columns))}")
    raise InvalidArgumentError(msg)


def _check_ids(adatas: Sequence[ad.AnnData], obs_id_name: str, var_id_name: str) -> None:
    """Check that every AnnData names its obs and var ids as asked, and obs ids are unique."""
    seen = []
    for i, adata in enumerate(adatas):
        seen.append(_ids(adata.obs, obs_id_name, "obs", i))
        _ids(adata.var, var_id_name, "var", i)
    every = seen[0].append(seen[1:]) if len(seen) > 1 else seen[0]
    duplicated = every[every.duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(map(repr, duplicated[:5].tolist()))
        msg = (f"{len(duplicated)} obs ids occur more than once across the AnnData given "
               f"(e.g. {shown}): every cell needs a unique {obs_id_name!r}")
        raise InvalidArgumentError(msg)


def _stored_measurement(uri: str, context: Any, measurement_name: str) -> Any:
    """Return the measurement ``measurement_name`` of the experiment at ``uri`` (open), or None."""
    tiledbsoma = _tiledbsoma()
    if not tiledbsoma.Experiment.exists(uri, context=context):
        return None
    exp = tiledbsoma.Experiment.open(uri, "r", context=context)
    if measurement_name not in exp.ms:
        exp.close()
        return None
    return exp


def _check_appendable(adatas: Sequence[ad.AnnData], first_appended: int,
                      stored: Any, measurement_name: str) -> None:
    """Refuse up front what appending cannot carry: obsp/varp, obsm/varm of another width.

    ``first_appended``: the index of the first AnnData appended (0 when the experiment
    exists, 1 when the first AnnData creates it).
    """
    for i in range(first_appended, len(adatas)):
        for attr in ("obsp", "varp"):
            keys = list(getattr(adatas[i], attr).keys())
            if keys:
                msg = (f"adatas[{i}] has {attr} {', '.join(map(repr, keys))}: appending to a "
                       f"TileDB-SOMA experiment cannot carry obsp or varp (tiledbsoma writes "
                       f"them only when it creates the experiment); drop them (del "
                       f"adata.{attr}[...]) or save that AnnData as an experiment of its own")
                raise InvalidArgumentError(msg)
    widths: dict[tuple[str, str], tuple[int, str]] = {}
    if stored is not None:
        ms = stored.ms[measurement_name]
        for attr in ("obsm", "varm"):
            if attr in ms:
                for key in ms[attr]:
                    widths[attr, key] = (int(ms[attr][key].shape[1]), "the experiment")
    for i, adata in enumerate(adatas):
        for attr in ("obsm", "varm"):
            for key, value in getattr(adata, attr).items():
                width = int(value.shape[1]) if len(value.shape) > 1 else 1
                first = widths.setdefault((attr, key), (width, f"adatas[{i}]"))
                if first[0] != width:
                    msg = (f"adatas[{i}]: {attr} {key!r} has {width} columns, {first[1]} has "
                           f"{first[0]}; a TileDB-SOMA experiment stores one width per "
                           f"{attr} key: give it the same columns, or another key")
                    raise InvalidArgumentError(msg)


def _dense(value: Any) -> np.ndarray:
    import numpy as np

    return np.asarray(value.toarray() if hasattr(value, "toarray") else value)


def _stored_varm(stored: Any, measurement_name: str, var_id_name: str,
                 genes: pd.Index) -> dict[str, tuple[pd.Index, np.ndarray]]:
    """Return ``{varm key: (gene ids, rows)}`` the experiment holds for ``genes``."""
    import numpy as np
    import pandas as pd

    ms = stored.ms[measurement_name]
    if "varm" not in ms or not len(ms.varm):
        return {}
    var = ms.var.read(column_names=["soma_joinid", var_id_name]).concat().to_pandas()
    var = var[var[var_id_name].isin(genes)]
    joinids = var["soma_joinid"].to_numpy()
    row_of = pd.Series(np.arange(len(var)), index=joinids)
    out = {}
    for key in ms.varm:
        arr = ms.varm[key]
        rows = np.zeros((len(var), int(arr.shape[1])),
                        dtype=arr.schema.field("soma_data").type.to_pandas_dtype())
        if len(joinids):  # absent cells are zeros (written from a dense matrix)
            coo = arr.read(coords=(joinids,)).tables().concat()
            rows[row_of[coo["soma_dim_0"].to_numpy()].to_numpy(),
                 coo["soma_dim_1"].to_numpy()] = coo["soma_data"].to_numpy()
        out[key] = (pd.Index(var[var_id_name]), rows)
    return out


def _keep_first_varm(adatas: Sequence[ad.AnnData], stored: Any, measurement_name: str,
                     var_id_name: str) -> list[ad.AnnData]:
    """Return the AnnData to write, varm rows of genes already written set to the first ones.

    tiledbsoma writes one varm row per gene and an appended AnnData overwrites the rows of
    the genes it shares with what is stored. The policy here: the first values stay (those
    stored, else those of the first AnnData that has the gene); an AnnData whose rows
    differ is written from a copy holding the first values (the caller's object is never
    changed), with a ``UserWarning`` naming it, the key and the genes.
    """
    import numpy as np

    genes = [_ids(a.var, var_id_name, "var", i) for i, a in enumerate(adatas)]
    first: dict[str, tuple[pd.Index, np.ndarray]] = {}
    if stored is not None:
        every = genes[0].append(genes[1:]) if len(genes) > 1 else genes[0]
        first = _stored_varm(stored, measurement_name, var_id_name, every.unique())
    out = []
    for i, adata in enumerate(adatas):
        fixed = {}
        for key, value in adata.varm.items():
            rows = _dense(value)
            known, known_rows = first.get(key, (genes[i][:0], rows[:0]))
            pos = known.get_indexer(genes[i])
            shared = np.flatnonzero(pos >= 0)
            old, new = known_rows[pos[shared]], rows[shared]
            same = (old == new) | (np.isnan(old) & np.isnan(new)) if rows.dtype.kind == "f" \
                else old == new
            differ = shared[~same.all(axis=tuple(range(1, same.ndim)))]
            if len(differ):
                rows = rows.copy()
                rows[differ] = known_rows[pos[differ]]
                fixed[key] = rows
                shown = ", ".join(map(repr, genes[i][differ][:5].tolist()))
                warnings.warn(
                    f"adatas[{i}]: varm {key!r} differs for {len(differ)} gene(s) written "
                    f"before (e.g. {shown}); the experiment keeps their first values (one "
                    f"varm row per gene)", UserWarning, stacklevel=4)
            new_genes = np.flatnonzero(pos < 0)
            first[key] = (known.append(genes[i][new_genes]),
                          np.concatenate([known_rows, rows[new_genes]]))
        out.append(_with_varm(adata, fixed) if fixed else adata)
    return out


def _with_varm(adata: ad.AnnData, varm: dict[str, np.ndarray]) -> ad.AnnData:
    """Return an AnnData sharing ``adata``'s elements but with ``varm`` entries replaced."""
    import anndata as ad

    return ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, uns=dict(adata.uns),
                      obsm=dict(adata.obsm), varm={**adata.varm, **varm},
                      layers=dict(adata.layers), obsp=dict(adata.obsp),
                      varp=dict(adata.varp), raw=adata.raw)


def write_experiment(path: UPath, adatas: Sequence[ad.AnnData], *,
                     measurement_name: str = "RNA", obs_id_name: str = "obs_id",
                     var_id_name: str = "var_id", append_obsm_varm: bool = True,
                     **kwargs: Any) -> None:
    """Write AnnData objects into the experiment at ``path``: create it, or append to it.

    A new experiment is written from the first AnnData; every further one (and every one,
    when the experiment exists) is appended through ``tiledbsoma.io.register_anndatas``:
    cells get new join ids, genes are matched by ``var_id_name`` and new ones added, and
    new categories extend the stored ones.

    Appending carries ``obsm`` and ``varm``, with one policy for ``varm`` (TileDB-SOMA
    stores one row per gene, and tiledbsoma would overwrite the rows of genes an appended
    AnnData shares): the first values written stay, and an AnnData whose rows differ gets a
    ``UserWarning``. Checked before anything is written: ``obsm``/``varm`` keys keep one
    width, and appended AnnData carry no ``obsp``/``varp`` (appending cannot write them).

    Parameters
    ----------
    path
        The ``.tiledbsoma`` folder to write.
    adatas
        In-memory AnnData objects (never modified).
    measurement_name
        The measurement ``X`` and var go to.
    obs_id_name, var_id_name
        The obs/var column holding unique ids; without such a column, the index if it is
        unnamed or has that name.
    append_obsm_varm
        Append ``obsm``/``varm`` (tiledbsoma's opt-in, on by default); ``False`` refuses
        appended AnnData that carry them, as tiledbsoma does.
    **kwargs
        Passed to ``tiledbsoma.io.from_anndata`` (``X_layer_name``, ``uns_keys``, ...).

    Raises
    ------
    InvalidArgumentError
        An id column is missing, obs ids repeat, appended AnnData carry ``obsp``/``varp``,
        an ``obsm``/``varm`` key changes width, or tiledbsoma refuses the data (obs ids
        already in the experiment, incompatible columns).
    """
    tiledbsoma = _tiledbsoma()
    if not adatas:
        msg = "no AnnData to write: give at least one"
        raise InvalidArgumentError(msg)
    _check_ids(adatas, obs_id_name, var_id_name)
    uri, context = _uri(path), soma_context(path)
    names = {"obs_id_name": obs_id_name, "var_id_name": var_id_name, **kwargs}
    exists = tiledbsoma.Experiment.exists(uri, context=context)
    stored = _stored_measurement(uri, context, measurement_name) if exists else None
    try:
        _check_appendable(adatas, 0 if exists else 1, stored, measurement_name)
        pending = (_keep_first_varm(adatas, stored, measurement_name, var_id_name)
                   if append_obsm_varm else list(adatas))
    finally:
        if stored is not None:
            stored.close()
    try:
        if not exists:
            tiledbsoma.io.from_anndata(uri, pending.pop(0), measurement_name,
                                       context=context, **names)
        if not pending:
            return
        mapping = tiledbsoma.io.register_anndatas(
            uri, pending, measurement_name=measurement_name, obs_field_name=obs_id_name,
            var_field_name=var_id_name, append_obsm_varm=append_obsm_varm, context=context)
        mapping.prepare_experiment(uri, context=context)
        for adata in pending:
            tiledbsoma.io.from_anndata(uri, adata, measurement_name, context=context,
                                       registration_mapping=mapping, **names)
    except (tiledbsoma.SOMAError, ValueError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        msg = f"cannot write the AnnData into the experiment at {path}: {exc}"
        raise InvalidArgumentError(msg) from exc


class WritableSOMA:
    """A SOMA object opened for writing whose closing also runs a callback.

    ``artifact.open("w")`` returns one: it works on a private copy of the registered store
    (the registered version never changes), and :meth:`close`, or leaving a ``with`` block
    without an error, closes the SOMA object and then saves the copy as a new version of the
    artifact. Leaving the block with an error closes the object and saves nothing.

    Attributes and items pass through to the SOMA object (``exp.obs``, ``exp.ms["RNA"]``,
    ``exp.metadata``, ``exp.uri``); :attr:`soma` is the object itself, for functions that
    check its type (``tiledbsoma.io.update_obs(exp.soma, ...)``).

    Examples
    --------
    >>> with artifact.open("w") as exp:                                   # doctest: +SKIP
    ...     exp.metadata["qc"] = "passed"
    >>> exp.result                    # the new artifact version
    """

    def __init__(self, obj: Any, on_close: Callable[[], Any]) -> None:
        self._obj = obj
        self._on_close = on_close
        self._result: Any = None
        self._done = False

    @property
    def soma(self) -> Any:
        """The ``tiledbsoma`` object itself."""
        return self._obj

    @property
    def result(self) -> Any:
        """What the close callback returned (the new artifact version); ``None`` before."""
        return self._result

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._done

    def close(self) -> None:
        """Close the SOMA object, then run the callback once (save the new version)."""
        if self._done:
            return
        self._done = True
        self._obj.close()
        self._result = self._on_close()

    def discard(self) -> None:
        """Close the SOMA object without running the callback: nothing is saved."""
        if self._done:
            return
        self._done = True
        self._obj.close()
        logger.warning("%s was closed after an error; what was written is not saved",
                       self._obj.uri)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_obj", "_on_close", "_result", "_done"):
            raise AttributeError(name)
        return getattr(self._obj, name)

    def __getitem__(self, key: str) -> Any:
        return self._obj[key]

    def __contains__(self, key: object) -> bool:
        return key in self._obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._obj)

    def __len__(self) -> int:
        return len(self._obj)

    def __enter__(self) -> WritableSOMA:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __repr__(self) -> str:
        state = "closed" if self._done else "open"
        return f"WritableSOMA({self._obj!r}, {state})"
