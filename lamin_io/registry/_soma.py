"""Save AnnData into a TileDB-SOMA experiment artifact, and append to one as a new version.

The experiment is written in a private local staging folder and then saved like any other
folder with :meth:`Artifact.save` (hashed into a manifest, uploaded with the crash-safe
protocol). Appending never touches the registered store: the previous version is copied
into staging, appended to there, and saved as a new version of its family. The staging
folder is removed whatever happens, so a failure leaves registry and storage as they were.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lamin_io.errors import InvalidArgumentError, PathNotFoundError
from lamin_io.registry._artifact import Artifact, existing_path
from lamin_io.registry._connection import current
from lamin_io.registry._keys import validate_key
from lamin_io.storage import storage_errors, suffix_of, to_upath

if TYPE_CHECKING:
    import anndata as ad

    from lamin_io.storage import PathLike

__all__ = ["save_tiledbsoma_experiment"]

SUFFIX = ".tiledbsoma"


def _as_anndata(item: Any, i: int) -> ad.AnnData:
    """Return an AnnData given as an object or as a path to a file or store."""
    import anndata as ad

    from lamin_io.accessors import format_for

    if isinstance(item, ad.AnnData):
        return item
    if not isinstance(item, str | os.PathLike) and not hasattr(item, "protocol"):
        msg = (f"adatas[{i}] is a {type(item).__name__}: give AnnData objects or paths to "
               f".h5ad/.zarr files")
        raise InvalidArgumentError(msg)
    try:
        path = existing_path(item)
    except PathNotFoundError as exc:
        exc.add_note(f"while reading adatas[{i}]")
        raise
    with storage_errors(str(path), current().settings.endpoint_url):
        loaded = format_for(suffix_of(path.name), path).resolve("load")(path)
    if not isinstance(loaded, ad.AnnData):
        msg = (f"adatas[{i}]: {path} holds a {type(loaded).__name__}, not an AnnData: give "
               f".h5ad or .zarr AnnData files")
        raise InvalidArgumentError(msg)
    return loaded


def save_tiledbsoma_experiment(
    adatas: ad.AnnData | PathLike | Sequence[ad.AnnData | PathLike],
    *,
    key: str | None = None,
    description: str | None = None,
    revises: Artifact | None = None,
    measurement_name: str = "RNA",
    obs_id_name: str = "obs_id",
    var_id_name: str = "var_id",
    append_obsm_varm: bool = True,
    mute: bool = False,
    **kwargs: Any,
) -> Artifact:
    """Write AnnData objects into a TileDB-SOMA experiment and register it as an artifact.

    Without ``revises`` a new experiment holds the given AnnData (concatenated along obs).
    With ``revises`` they are appended to a copy of that experiment, saved as its next
    version (the previous version stays readable as it was). Genes are matched across
    inputs by ``var_id_name`` and new ones added; categories are merged. The artifact
    records the experiment's number of cells as :attr:`Artifact.n_observations`.

    Appending carries ``obsm`` and ``varm``. TileDB-SOMA stores one ``varm`` row per gene,
    so for genes that are already written (stored in ``revises``, or in an earlier AnnData
    of ``adatas``) the first values stay: an AnnData whose ``varm`` rows differ for such
    genes gets a ``UserWarning`` naming it, the key and the genes (your AnnData objects are
    never modified). ``obsm``/``varm`` of another width than what is written under the same
    key, and ``obsp``/``varp`` on an appended AnnData (appending cannot write them), are
    refused before anything is written.

    Parameters
    ----------
    adatas
        One or several AnnData objects, or paths (local or URL) to ``.h5ad``/``.zarr``
        AnnData files; files are read into memory to be written.
    key
        The artifact's key, ending in ``.tiledbsoma``; default: that of ``revises``.
    description
        Free text; default: that of ``revises``.
    revises
        A saved ``.tiledbsoma`` artifact to append to.
    measurement_name
        The measurement ``X`` and var are written to.
    obs_id_name, var_id_name
        The obs/var column holding unique cell/gene ids, stored as a column of that name.
        Where an AnnData has no such column, its obs/var names are used if its index is
        unnamed or has that name; otherwise a missing column is an error.
    append_obsm_varm
        Append ``obsm``/``varm`` (default); ``False`` refuses appended AnnData that carry
        them (tiledbsoma's opt-in ``append_obsm_varm``).
    mute
        Hide progress bars.
    **kwargs
        Passed to ``tiledbsoma.io.from_anndata`` (``X_layer_name``, ``uns_keys``, ...).

    Returns
    -------
    Artifact
        The saved experiment (a new version of ``revises``, if given).

    Raises
    ------
    InvalidKeyError
        ``key`` is unsafe or does not end in ``.tiledbsoma``.
    InvalidArgumentError
        No AnnData, an item that is no AnnData, a missing id column, repeated obs ids (also
        against the experiment appended to), ``obsp``/``varp`` on an appended AnnData,
        ``obsm``/``varm`` of another width under a key, or ``revises`` that is no saved
        ``.tiledbsoma`` artifact.

    Examples
    --------
    >>> import lamin_io as ln                                              # doctest: +SKIP
    >>> v1 = ln.save_tiledbsoma_experiment([adata1], key="atlas/pbmc.tiledbsoma")
    >>> v2 = ln.save_tiledbsoma_experiment([adata2], revises=v1)
    >>> with v2.open() as exp:
    ...     query = exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(
    ...         value_filter="cell_type == 'B'"))
    ...     bcells = query.to_anndata(X_name="data")
    """
    from lamin_io.accessors._soma import write_experiment

    items: list[Any] = (list(adatas) if isinstance(adatas, Sequence)
                        and not isinstance(adatas, str) else [adatas])
    if not items:
        msg = "adatas is empty: give at least one AnnData or path"
        raise InvalidArgumentError(msg)
    if revises is not None:
        if not isinstance(revises, Artifact) or revises._row is None:
            msg = "revises= must be a saved Artifact (for example Artifact.get(key=...))"
            raise InvalidArgumentError(msg)
        if revises.suffix.lower() != SUFFIX:
            msg = (f"revises= is {revises._what()} with suffix {revises.suffix!r}: appending "
                   f"needs a {SUFFIX} experiment artifact")
            raise InvalidArgumentError(msg)
        key = revises.key if key is None else key
        description = revises.description if description is None else description
    if key is not None:
        validate_key(key, suffix=SUFFIX)
    if not isinstance(measurement_name, str) or not measurement_name:
        msg = f"measurement_name must be a non-empty string, got {measurement_name!r}"
        raise InvalidArgumentError(msg)
    loaded = [_as_anndata(item, i) for i, item in enumerate(items)]

    staging = Path(tempfile.mkdtemp(prefix="lamin-io-soma-"))
    try:
        store = staging / (PurePosixPath(key).name if key else f"experiment{SUFFIX}")
        if revises is not None:
            shutil.copytree(revises.cache(mute=mute), store)
        write_experiment(to_upath(store), loaded, measurement_name=measurement_name,
                         obs_id_name=obs_id_name, var_id_name=var_id_name,
                         append_obsm_varm=append_obsm_varm, **kwargs)
        return Artifact(store, key=key, description=description, revises=revises).save(
            mute=mute)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
