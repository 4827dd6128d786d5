import os

import pytest

os.environ.setdefault("MPLBACKEND", "agg")

@pytest.fixture(scope="session")
def tissue():
    """Three 10 x 10 synthetic sections, 60 genes, 32 px spot spacing (read-only: copy before use)."""
    from st_predict.data import synthetic_tissue

    return synthetic_tissue(n_sections=3, n_rows=10, n_cols=10, n_genes=60, seed=0)


@pytest.fixture
def split(tissue):
    """(train = S0 + S1, test = S2) copies of the synthetic tissue."""
    train = tissue[tissue.obs["section"] != "S2"].copy()
    test = tissue[tissue.obs["section"] == "S2"].copy()
    return train, test


