"""Section batches, per-section standardised targets, stain jitter, precision and micrometre patches."""

import numpy as np
import pytest
import torch
from helpers import SMALL, setup

from st_predict import NH2ST
from st_predict.model._runtime import resolve_precision
from st_predict.nn._augment import dihedral_views, stain_jitter
from st_predict.pp import PatchGeometry, section_pixel_sizes
from st_predict.train import NH2STDataModule, SectionBatchSampler

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")


def test_section_batches_hold_one_section_and_cover_every_spot():
    groups = np.array(["A"] * 70 + ["B"] * 45 + ["C"] * 9)
    indices = np.arange(100, 100 + len(groups))
    sampler = SectionBatchSampler(indices, groups, batch_size=16, seed=3)
    batches = list(sampler)
    assert all(len(b) == 16 for b in batches)
    lookup = dict(zip(indices.tolist(), groups.tolist(), strict=True))
    mixed = [b for b in batches if len({lookup[i] for i in b}) > 1]
    # 70 = 4*16 + 6 and 45 = 2*16 + 13: 6 full batches of one section; the 6 + 13 + 9 = 28 left over
    # make one mixed batch (the last 12 are dropped)
    assert len(batches) - len(mixed) == 6 and len(mixed) == 1
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 6 * 16 + 16
    assert set(seen) <= set(indices.tolist())
    assert len(sampler) == len(batches)
    # a new epoch shuffles differently, the same seed reproduces
    again = SectionBatchSampler(indices, groups, batch_size=16, seed=3)
    assert list(again) == batches
    assert list(sampler) != batches


def test_datamodule_uses_section_batches_when_given_groups():
    groups = np.array(["A"] * 40 + ["B"] * 40)
    dm = NH2STDataModule(np.arange(80), None, collate=lambda idx: list(idx), batch_size=8, train_groups=groups)
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    for b in batches:
        assert len({groups[i] for i in b}) == 1
    plain = NH2STDataModule(np.arange(80), None, collate=lambda idx: list(idx), batch_size=8)
    assert any(len({groups[i] for i in b}) > 1 for b in plain.train_dataloader())


def test_per_section_standardisation_removes_section_offsets(split):
    train, _ = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    data = model._training_data()
    model.fit_scales(np.arange(train.n_obs))
    assert model.training_targets(False) is data.targets
    centred = model.training_targets(True)
    z = model.module.standardize(centred)
    for lib in np.unique(data.libraries):
        sel = torch.from_numpy(data.libraries == lib)
        torch.testing.assert_close(z[sel].mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
        sd = z[sel].std(0)
        torch.testing.assert_close(sd[data.targets[sel].std(0) > 1e-6], torch.ones(int((data.targets[sel].std(0) > 1e-6).sum())),
                                   atol=1e-4, rtol=0)
        # within a section the order of the spots is unchanged, gene by gene
        a, b = data.targets[sel], centred[sel]
        corr = [np.corrcoef(a[:, g], b[:, g])[0, 1] for g in range(a.shape[1]) if a[:, g].std() > 0]
        np.testing.assert_allclose(corr, 1.0, atol=1e-5)
    model.train(max_epochs=1, progress=False)  # the default recipe trains on them
    assert model.train_settings_["center_sections"] is True and model.train_settings_["batches"] == "mixed"


def test_stain_jitter_matches_scikit_image_deconvolution_and_stays_uint8():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(30, 250, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    assert stain_jitter(x, 0.0) is x
    out = stain_jitter(x, 0.1, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, stain_jitter(x, 0.1, torch.Generator().manual_seed(1)))
    # the Ruifrok-Johnston stain vectors, as scikit-image's rgb2hed / hed2rgb use them
    from skimage.color import hed_from_rgb, rgb_from_hed

    from st_predict.nn._augment import _HED_FROM_RGB, _RGB_FROM_HED

    np.testing.assert_allclose(_RGB_FROM_HED.numpy(), rgb_from_hed, atol=1e-12)
    np.testing.assert_allclose(_HED_FROM_RGB.numpy(), hed_from_rgb, atol=1e-9)
    # a vanishing change of the stain amounts gives back the image (deconvolution and recomposition invert)
    tiny = stain_jitter(x, 1e-6, torch.Generator().manual_seed(2))
    assert (tiny.int() - x.int()).abs().max() <= 1
    # a stronger jitter moves the colours further
    strong = stain_jitter(x, 0.3, torch.Generator().manual_seed(1))
    assert (strong.float() - x.float()).abs().mean() > (out.float() - x.float()).abs().mean()
    with pytest.raises(TypeError, match="uint8"):
        stain_jitter(x.float(), 0.1)


def test_dihedral_views_are_the_eight_distinct_transforms():
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    flat = {tuple(v[0].flatten().tolist()) for v in views}
    assert len(flat) == 8


def test_precision_auto_depends_on_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("32-true", cpu) == "32-true"
    monkeypatch.setattr("st_predict.model._runtime._cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16-mixed"
    monkeypatch.setattr("st_predict.model._runtime._cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "32-true"


def test_patch_size_in_micrometres_follows_each_sections_pixel_size(split):
    train, _ = split
    train = train.copy()
    libs = train.obs["section"].astype(str).to_numpy()
    def pixels(**kw):
        sizes = section_pixel_sizes(train, libs)
        return PatchGeometry.from_pixel_sizes(sizes, **kw).pixels(sizes)

    assert pixels(patch_size=32) == {"S0": 32.0, "S1": 32.0}
    with pytest.raises(ValueError, match="pixel_size_um"):
        pixels(patch_size_um=50)
    train.uns["spatial"]["S0"]["metadata"] = {"pixel_size_um": 0.5}
    with pytest.raises(ValueError, match="S1"):
        pixels(patch_size_um=50)
    train.uns["spatial"]["S1"]["metadata"] = {"pixel_size_um": 1.0}
    assert pixels(patch_size_um=16) == {"S0": 32.0, "S1": 16.0}
    # the model crops the same physical patch in both sections
    setup(train, patch_size_um=16)
    model = NH2ST(train, **SMALL)
    boxes = model._training_data().reader.boxes
    side = boxes[:, 2] - boxes[:, 0]
    assert set(side[libs == "S0"]) == {32} and set(side[libs == "S1"]) == {16}
    assert model.patch_size_um_ == 16.0
    assert model.spot_pitch_um_ is not None and model.spot_pitch_um_ > 0


def test_model_trains_on_batches_of_one_section_when_asked(split, monkeypatch):
    from st_predict.train import NH2STCollate

    train, _ = split
    torch.manual_seed(0)
    setup(train)
    model = NH2ST(train, **SMALL)
    libs = train.obs["section"].astype(str).to_numpy()
    seen = []
    original = NH2STCollate.__call__

    def spy(self, indices):
        if self.augment != "none":
            seen.append({libs[i] for i in indices})
        return original(self, indices)

    monkeypatch.setattr(NH2STCollate, "__call__", spy)
    model.train(max_epochs=1, batch_size=16, batches="section", progress=False)
    # 100 spots per section: 6 batches of one section each, and one mixed batch of the 2 x 4 left over
    # (8 < 16: dropped)
    assert len(seen) == 12 and all(len(s) == 1 for s in seen)
    seen.clear()
    model.train(max_epochs=1, batch_size=16, batches="mixed", progress=False)
    assert any(len(s) == 2 for s in seen)
