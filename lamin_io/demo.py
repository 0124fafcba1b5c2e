"""A two-minute tour on the embedded default registry: ``python -m lamin_io.demo``.

Creates a small AnnData and a parquet table, saves both, lists what is registered and
loads one back. Run it twice: the second run finds the same content and adds nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def main() -> None:
    """Run the tour."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    import lamin_io as ln

    conn = ln.connect()
    print(f"registry: {conn.registry}\nstorage:  {conn.settings.root}\n")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        adata = ad.AnnData(
            rng.poisson(1.0, (100, 20)).astype(np.float32),
            obs=pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["B", "T"], 100))},
                             index=[f"cell{i}" for i in range(100)]),
        )
        h5ad = Path(tmp) / "pbmc.h5ad"
        adata.write_h5ad(h5ad)
        table = Path(tmp) / "qc.parquet"
        pd.DataFrame({"cell": adata.obs_names, "n_counts": adata.X.sum(1)}).to_parquet(table)

        ln.Artifact(h5ad, key="demo/pbmc.h5ad", description="demo cells").save()
        ln.Artifact(table, key="demo/qc.parquet", description="demo QC table").save()

    print("registered under demo/:")
    for artifact in ln.Artifact.filter(key__startswith="demo/", is_latest=True):
        print(f"  {artifact!r}")
    loaded = ln.Artifact.get(key="demo/pbmc.h5ad").load()
    print(f"\nloaded back: {loaded}")
    assert loaded.shape == (100, 20)  # noqa: S101


if __name__ == "__main__":
    main()
