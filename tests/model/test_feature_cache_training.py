"""train(feature_cache=) for a frozen trunk (issue 16, part): the trunk's maps go to disk once per section,
another model with the same trunk reads them back without running the trunk, and training from the cache
gives the model that training without it gives."""

import numpy as np
import pytest
import torch
from helpers import SMALL, setup

from st_predict import NH2ST

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def _model(adata, seed=0, patch_size=32):
    setup(adata, patch_size=patch_size)
    torch.manual_seed(seed)
    return NH2ST(adata, trunk="frozen", **SMALL)


def _train(model, cache):
    torch.manual_seed(1)
    model.train(max_epochs=2, progress=False, feature_cache=cache)
    return model


def test_a_second_model_reads_the_trunk_maps_from_disk(split, tmp_path, encoder_calls):
    train, test = split
    first = _train(_model(train), tmp_path)
    assert encoder_calls == [int((train.obs["section"] == s).sum()) for s in ("S0", "S1")]  # one entry per section
    assert len(list(tmp_path.rglob("*.pt"))) == 2

    encoder_calls.clear()
    second = _train(_model(train), tmp_path)  # a new model, same trunk weights and data
    assert encoder_calls == []
    torch.testing.assert_close(second._data.fmaps, first._data.fmaps, rtol=0, atol=0)

    fresh = _train(_model(train), None)  # no cache: computed in memory
    assert sum(encoder_calls) == train.n_obs
    torch.testing.assert_close(second._data.fmaps, fresh._data.fmaps, rtol=0, atol=0)
    np.testing.assert_array_equal(
        second.get_predicted_expression(test).to_numpy(), fresh.get_predicted_expression(test).to_numpy()
    )


def test_another_patch_size_or_trunk_recomputes(split, tmp_path, encoder_calls):
    train, _ = split
    _train(_model(train), tmp_path)
    encoder_calls.clear()
    _train(_model(train, patch_size=40), tmp_path)
    assert sum(encoder_calls) == train.n_obs
    encoder_calls.clear()
    _train(_model(train, seed=5), tmp_path)  # other (random) trunk weights
    assert sum(encoder_calls) == train.n_obs
    assert len(list(tmp_path.rglob("*.pt"))) == 6
