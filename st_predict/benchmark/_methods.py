"""Methods compared by the benchmark runner, all on the same genes, folds and trunk features.

Every method is a class with ``fit(fold)`` and ``predict(fold) -> (n_test, n_genes)`` where ``fold``
is a :class:`Fold`; nothing in ``fit`` may look at the test spots' expression.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from anndata import AnnData

from st_predict._utils import InputError
from st_predict.module import NetworkSettings
from st_predict.nn import info_nce
from st_predict.train import TrainingSettings


@dataclass
class Fold:
    """One leave-one-section-out fold."""

    test_section: str
    train: AnnData
    test: AnnData
    genes: list[str]
    y_train: np.ndarray  # normalised expression of the training spots
    groups: np.ndarray  # training spots' sections (for model selection inside the training set)
    feats_train: np.ndarray  # pooled frozen-trunk features (n_train, 512)
    feats_test: np.ndarray
    extra: dict = field(default_factory=dict)


#: added to each feature's standard deviation (as NH2ST's own input scaling): features that are
#: (nearly) constant on the training spots must not be blown up on the test spots
_SD_EPS = 1e-3


def _scaling(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return train.mean(0), train.std(0) + _SD_EPS


def _standardise(train: np.ndarray, *others: np.ndarray):
    mu, sd = _scaling(train)
    return [(x - mu) / sd for x in (train, *others)]


class MeanBaseline:
    """Per-gene mean of the training spots."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def fit(self, fold: Fold) -> None:
        self.mean_ = fold.y_train.mean(0)

    def predict(self, fold: Fold) -> np.ndarray:
        return np.tile(self.mean_, (fold.test.n_obs, 1))


class RidgeProbe:
    """Ridge regression on PCA-reduced frozen trunk embeddings (the HEST-Benchmark probe). The penalty
    is chosen by leave-one-section-out cross-validation within the training sections."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def __init__(self, n_components: int = 256, alphas=(1.0, 10.0, 100.0, 1000.0, 10000.0)):
        self.n_components, self.alphas = n_components, alphas

    def fit(self, fold: Fold) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge

        x, = _standardise(fold.feats_train)
        self.pca_ = PCA(min(self.n_components, x.shape[0] - 1, x.shape[1]), random_state=0).fit(x)
        z = self.pca_.transform(x)
        groups = np.asarray(fold.groups)
        scores = []
        for alpha in self.alphas:
            err = 0.0
            for g in np.unique(groups):
                tr, va = groups != g, groups == g
                if tr.sum() == 0:
                    continue
                pred = Ridge(alpha=alpha).fit(z[tr], fold.y_train[tr]).predict(z[va])
                err += ((pred - fold.y_train[va]) ** 2).sum()
            scores.append(err)
        self.alpha_ = self.alphas[int(np.argmin(scores))]
        self.ridge_ = Ridge(alpha=self.alpha_).fit(z, fold.y_train)
        self.mu_, self.sd_ = _scaling(fold.feats_train)

    def predict(self, fold: Fold) -> np.ndarray:
        z = self.pca_.transform((fold.feats_test - self.mu_) / self.sd_)
        return self.ridge_.predict(z)


class HESTProbe:
    """The HEST-Benchmark probe (Jaume et al. 2024, ``hest/bench``): the frozen embeddings standardised,
    PCA to 256 components, then one ridge regression of all genes with their fixed penalty
    ``alpha = 100 / (n_components * n_genes)``, ``lsqr`` solver and no intercept, as their code has it.
    Without an intercept the per-gene means are not fitted (their metric, PCC, ignores them), so its
    MSE is not comparable with the other rows'."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def __init__(self, n_components: int = 256, seed: int = 0):
        self.n_components, self.seed = n_components, seed

    def fit(self, fold: Fold) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = fold.feats_train
        k = min(self.n_components, x.shape[0] - 1, x.shape[1])
        self.reduce_ = make_pipeline(StandardScaler(), PCA(k, random_state=self.seed)).fit(x)
        z = self.reduce_.transform(x)
        alpha = 100.0 / (z.shape[1] * fold.y_train.shape[1])
        self.ridge_ = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000,
                            random_state=self.seed).fit(z, fold.y_train)

    def predict(self, fold: Fold) -> np.ndarray:
        return self.ridge_.predict(self.reduce_.transform(fold.feats_test))


class STNetRegressor:
    """ST-Net style: the same (frozen) trunk and a linear head trained with MSE (Adam)."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def __init__(self, epochs: int = 20, batch_size: int = 8, lr: float = 1e-4, seed: int = 0):
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        x, = _standardise(fold.feats_train)
        self.mu_, self.sd_ = _scaling(fold.feats_train)
        x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(fold.y_train)
        self.head_ = torch.nn.Linear(x.shape[1], y.shape[1])
        with torch.no_grad():
            self.head_.bias.copy_(y.mean(0))
        opt = torch.optim.Adam(self.head_.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), self.batch_size):
                idx = perm[s : s + self.batch_size]
                loss = F.mse_loss(self.head_(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

    @torch.no_grad()
    def predict(self, fold: Fold) -> np.ndarray:
        x = torch.as_tensor((fold.feats_test - self.mu_) / self.sd_, dtype=torch.float32)
        return self.head_(x).numpy()


class BLEEPRetrieval:
    """BLEEP style: image and expression projected into a shared space with a symmetric InfoNCE on the
    training spots; a test spot's prediction is the similarity-weighted mean expression of the ``k``
    training spots whose expression embeddings are closest to its image embedding."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def __init__(self, dim: int = 256, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                 temperature: float = 0.1, k: int = 50, seed: int = 0):
        self.dim, self.epochs, self.batch_size, self.lr = dim, epochs, batch_size, lr
        self.temperature, self.k, self.seed = temperature, k, seed

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        self.mu_, self.sd_ = _scaling(fold.feats_train)
        x = torch.as_tensor((fold.feats_train - self.mu_) / self.sd_, dtype=torch.float32)
        y = torch.as_tensor(fold.y_train)
        self.img_ = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.dim), torch.nn.GELU(), torch.nn.Linear(self.dim, self.dim))
        self.gene_ = torch.nn.Sequential(torch.nn.Linear(y.shape[1], self.dim), torch.nn.GELU(), torch.nn.Linear(self.dim, self.dim))
        opt = torch.optim.Adam([*self.img_.parameters(), *self.gene_.parameters()], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        bs = min(self.batch_size, len(x))
        for _ in range(self.epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x) - bs + 1, bs):
                idx = perm[s : s + bs]
                loss = info_nce(self.img_(x[idx]), self.gene_(y[idx]), self.temperature, symmetric=True)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            self.bank_ = F.normalize(self.gene_(y), dim=-1)
        self.y_ = y

    @torch.no_grad()
    def predict(self, fold: Fold) -> np.ndarray:
        q = F.normalize(self.img_(torch.as_tensor((fold.feats_test - self.mu_) / self.sd_, dtype=torch.float32)), dim=-1)
        sim = q @ self.bank_.T
        k = min(self.k, sim.shape[1])
        top, idx = sim.topk(k, dim=1)
        w = torch.softmax(top / self.temperature, dim=1)
        return (w.unsqueeze(-1) * self.y_[idx]).sum(1).numpy()


def with_patch(setup: dict, patch: dict | None) -> dict:
    """``setup`` (:meth:`~st_predict.NH2ST.setup_anndata` arguments) with the patch of ``patch``
    (``patch_size`` or ``patch_size_um``) in place of its own, if given."""
    if not patch or not ({"patch_size", "patch_size_um"} & set(patch)):
        return {**setup, **(patch or {})}
    base = {k: v for k, v in setup.items() if k not in ("patch_size", "patch_size_um")}
    return {**base, **patch}


def fold_geometry(fold: Fold, setup: dict | None = None):
    """The patch of a fold: the runner's (``fold.extra["geometry"]``) unless ``setup`` gives another size."""
    from st_predict.pp import PatchGeometry, spot_libraries

    setup = fold.extra["setup"] if setup is None else setup
    keys = ("patch_size", "patch_size_um")
    if "geometry" in fold.extra and all(setup.get(k) == fold.extra["setup"].get(k) for k in keys):
        return fold.extra["geometry"]
    return PatchGeometry.resolve(fold.train, spot_libraries(fold.train, setup["library_key"]), setup.get("patch_size"),
                                 setup.get("patch_size_um"))


def _fold_patches(fold: Fold, adata: AnnData, setup: dict, out_size: int) -> torch.Tensor:
    """uint8 patches ``(n, 3, out_size, out_size)`` of every spot of ``adata``: the runner's patch (resolved once
    on every section), or another one that ``setup`` asks for, resolved on the fold's training sections (as a
    model set up on them would)."""
    from st_predict.pp import make_patch_reader, spot_libraries

    geometry = fold_geometry(fold, setup)
    libs = spot_libraries(adata, setup["library_key"])
    reader = make_patch_reader(adata, setup["spatial_key"], setup["image_key"], setup["library_key"],
                               geometry.pixels_for(adata, libs), out_size)
    return reader.read(np.arange(adata.n_obs))


class SmallCNN:
    """A small CNN trained from scratch (the recipe of ``../shared/DESIGN.md`` section 6): 4 conv blocks
    (32-64-128-256 channels; 3x3 conv, BatchNorm, ReLU, 2x2 max-pool), global average pool, dropout
    0.2, a zero-initialised linear layer; patches resampled to 64 px and standardised per channel;
    per-gene standardised targets; Adam (lr 1e-3, one-cycle with 10 %% warm-up, weight decay 1e-4),
    batch 32, 20 epochs; a random 90-degree rotation per batch and a random horizontal flip per
    patch; MSE."""

    sees_context = False  # predicts each spot from its own patch (or features) alone

    def __init__(self, image_size: int = 64, epochs: int = 20, batch_size: int = 32, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0, patch_size: float | None = None):
        self.image_size, self.epochs, self.batch_size = image_size, epochs, batch_size
        self.patch_size = patch_size  # None: the runner's
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed

    @staticmethod
    def network(n_genes: int) -> torch.nn.Module:
        from torch import nn

        layers, c = [], 3
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        head = nn.Linear(c, n_genes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), head)

    def _setup(self, fold: Fold) -> dict:
        return with_patch(fold.extra["setup"], None if self.patch_size is None else {"patch_size": self.patch_size})

    def _input(self, patches: torch.Tensor) -> torch.Tensor:
        return ((patches.float() / 255.0 - self.cmean_) / self.cstd_).contiguous(memory_format=torch.channels_last)

    def fit(self, fold: Fold) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        x = _fold_patches(fold, fold.train, self._setup(fold), self.image_size)
        y = torch.as_tensor(fold.y_train, dtype=torch.float32)
        self.mu_, sd = y.mean(0), y.std(0)
        self.sd_ = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
        z = (y - self.mu_) / self.sd_
        xf = x.float() / 255.0
        self.cmean_ = xf.mean((0, 2, 3)).view(1, 3, 1, 1)
        self.cstd_ = xf.std((0, 2, 3)).view(1, 3, 1, 1) + 1e-6
        del xf
        self.net_ = self.network(y.shape[1]).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps_per_epoch = len(x) // self.batch_size
        if steps_per_epoch == 0:
            raise InputError(f"{len(x)} training spots are fewer than one batch of {self.batch_size}.")
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.epochs * steps_per_epoch,
                                                    pct_start=0.1)
        self.net_.train()
        for _ in range(self.epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(steps_per_epoch):
                idx = perm[s * self.batch_size : (s + 1) * self.batch_size]
                xb = torch.rot90(x[idx], int(torch.randint(0, 4, (), generator=gen)), (2, 3))
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
                loss = F.mse_loss(self.net_(self._input(xb)), z[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()

    @torch.no_grad()
    def predict(self, fold: Fold) -> np.ndarray:
        x = _fold_patches(fold, fold.test, self._setup(fold), self.image_size)
        self.net_.eval()
        out = torch.cat([self.net_(self._input(x[s : s + 256])) for s in range(0, len(x), 256)])
        return (out * self.sd_ + self.mu_).numpy()


def _inner_fold(fold: Fold, val_section: str) -> Fold:
    """The fold's training sections split into training and one validation section."""
    from st_predict.data import select_sections

    key = fold.extra["setup"]["library_key"]
    val = fold.groups == val_section
    keep = [s for s in dict.fromkeys(fold.groups.tolist()) if s != val_section]
    mask = torch.from_numpy(val)
    return Fold(
        test_section=val_section, train=select_sections(fold.train, keep, key),
        test=select_sections(fold.train, [val_section], key), genes=fold.genes, y_train=fold.y_train[~val],
        groups=fold.groups[~val], feats_train=fold.feats_train[~val], feats_test=fold.feats_train[val],
        extra={**fold.extra, "fmaps_train": fold.extra["fmaps_train"][~mask], "fmaps_test": fold.extra["fmaps_train"][mask]},
    )


class NH2STMethod:
    """NH2ST (or an ablation: any :class:`~st_predict.NH2ST` keyword, e.g. ``recipe="paper"``) trained
    through the public model API on the fold's training sections.

    With ``trunk="frozen"`` it shares the runner's trunk: its weights (``weights=`` state dict) and its
    feature maps of the fold's spots (``train(trunk_features=...)``,
    ``get_predicted_expression(trunk_features=...)``).

    ``train_kwargs`` go to :meth:`~st_predict.NH2ST.train` (``None`` values: the recipe's); ``setup``
    overrides :meth:`~st_predict.NH2ST.setup_anndata` arguments of the runner (e.g. ``patch_size``).
    ``select={"weight_decay": [0.0, 1e-2]}`` chooses one setting (a model keyword, a training setting,
    or ``"max_epochs"``) by the mean per-gene PCC on the last training section after training on the
    others, then refits on all training sections: model selection that never sees the held-out
    section. The choice is kept in ``selected_``.

    ``inner_loso=True``: before fitting, score this configuration on the leave-one-section-out splits of
    the fold's *training* sections (train on all but one, per-gene PCC on that one, for each), kept in
    ``inner_`` (``{"sections": [...], "pcc": [...], "mean": ...}``); the runner records it per fold, and
    :func:`~st_predict.benchmark.nested_selection` compares candidates on it: a fully nested selection.
    """

    def __init__(self, epochs: int | None = None, batch_size: int | None = None, seed: int = 0,
                 train_kwargs: dict | None = None, select: dict | None = None, setup: dict | None = None,
                 inner_loso: bool = False, **model_kwargs):
        self.seed, self.model_kwargs, self.setup = seed, model_kwargs, dict(setup or {})
        self.train_kwargs = {"max_epochs": epochs, "batch_size": batch_size, **(train_kwargs or {})}
        if select is not None and len(select) != 1:
            raise InputError(f"select takes one setting to choose, got {list(select)}.")
        if select is not None and inner_loso:
            raise InputError("Give select= (one validation section) or inner_loso=True (every training section), "
                             "not both.")
        self.select = select
        self.inner_loso = inner_loso
        self.inner_ = None

    @property
    def sees_context(self) -> bool:
        """Whether the fitted model looks beyond each spot's own patch at inference (``context="neighbors"``)."""
        model = getattr(self, "model_", None)
        if model is not None:
            return model.module.context != "patch"
        from st_predict.module import NetworkSettings

        return self.model_kwargs.get("context", NetworkSettings().context) != "patch"

    def _with(self, name: str, value) -> NH2STMethod:
        train_kwargs, model_kwargs = dict(self.train_kwargs), dict(self.model_kwargs)
        if name in TrainingSettings.names():
            train_kwargs[name] = value
        else:
            model_kwargs[name] = value
        return NH2STMethod(seed=self.seed, train_kwargs=train_kwargs, setup=self.setup, **model_kwargs)

    def _score_inner(self, fold: Fold) -> None:
        """``inner_``: this configuration's per-gene PCC on each leave-one-section-out split of the fold's
        training sections (nothing of the held-out section is read)."""
        from st_predict.metrics import evaluate

        sections = list(dict.fromkeys(fold.groups.tolist()))
        if len(sections) < 2:
            raise InputError("inner_loso needs at least two training sections.")
        scores = []
        for val in sections:
            inner = _inner_fold(fold, val)
            candidate = NH2STMethod(seed=self.seed, train_kwargs=self.train_kwargs, setup=self.setup,
                                    **self.model_kwargs)
            candidate.fit(inner)
            scores.append(float(evaluate(candidate.predict(inner), fold.y_train[fold.groups == val])["pcc"]))
        self.inner_ = {"sections": sections, "pcc": scores, "mean": float(np.mean(scores))}

    def fit(self, fold: Fold) -> None:
        if self.inner_loso:
            self._score_inner(fold)
        if self.select:
            from st_predict.metrics import evaluate

            ((name, values),) = self.select.items()
            sections = list(dict.fromkeys(fold.groups.tolist()))
            if len(sections) < 2:
                raise InputError("Selecting a setting needs at least two training sections.")
            inner = _inner_fold(fold, sections[-1])
            y_val = fold.y_train[fold.groups == sections[-1]]
            scores = {}
            for value in values:
                candidate = self._with(name, value)
                candidate.fit(inner)
                scores[value] = evaluate(candidate.predict(inner), y_val)["pcc"]
            best = max(values, key=lambda v: np.nan_to_num(scores[v], nan=-np.inf))
            self.selected_ = {"setting": name, "value": best, "validation_section": sections[-1],
                              "validation_pcc": scores}
            final = self._with(name, best)
            final.fit(fold)
            self.model_ = final.model_
            return
        self._fit(fold)

    @property
    def frozen(self) -> bool:
        return self.model_kwargs.get("trunk") == "frozen"

    def _fit(self, fold: Fold) -> None:
        import scvi

        from st_predict import NH2ST

        scvi.settings.seed = self.seed
        torch.manual_seed(self.seed)
        setup = with_patch(fold.extra["setup"], self.setup)
        if self.setup and self.frozen:
            raise InputError("A frozen NH2ST shares the runner's trunk features: its setup cannot differ.")
        train = fold.train.copy() if fold.train.is_view else fold.train
        NH2ST.setup_anndata(train, **setup)
        kwargs = {"encoder_weights": "random", **self.model_kwargs, "genes": fold.genes}
        features = None
        spec = fold.extra.get("encoder_spec")
        if self.frozen:
            # the runner's encoder module itself (built once for the run) and its cached feature maps of these spots
            kwargs.update(encoder=fold.extra["trunk"], image_size=fold.extra["image_size"])
            kwargs.pop("encoder_weights")
            features = fold.extra["fmaps_train"]
        elif spec is not None and spec.name != NetworkSettings().encoder:
            raise InputError(f"Only frozen methods use the runner's encoder ({spec.name!r}): an end-to-end NH2ST here "
                             "would train its own default encoder instead. Use benchmark.frozen_methods().")
        self.model_ = NH2ST(train, **kwargs)
        # None in train_kwargs: the recipe's value (epochs=None, batch_size=None by default)
        self.model_.train(progress=False, trunk_features=features,
                          **{k: v for k, v in self.train_kwargs.items() if v is not None})

    def uncertainty(self, fold: Fold) -> dict | None:
        """With ``train_kwargs={"reliability": True}``: the model and its fold models' predictions of the held-out
        spots (for :func:`~st_predict.benchmark.reliability_metrics`); otherwise ``None``."""
        model = self.model_
        if not model.has_reliability:
            return None
        return {"model": model, "folds": model.fold_predictions(lambda: self.predict(fold))}

    def predict(self, fold: Fold) -> np.ndarray:
        if self.frozen and fold.extra.get("fmaps_test") is not None:
            # the same frozen trunk already embedded the held-out spots: skip the second forward pass
            return self.model_.get_predicted_expression(fold.test, trunk_features=fold.extra["fmaps_test"],
                                                        return_numpy=True)
        return self.model_.get_predicted_expression(fold.test, return_numpy=True)
