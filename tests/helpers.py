"""Helpers shared by the tests (importable because pyproject sets pytest's pythonpath to tests/)."""

import os

import numpy as np
import pytest

HER2ST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "her2st")


def her2st_path():
    """The real HER2ST sections (../shared/data/her2st from the project root), or skip."""
    path = os.environ.get("ST_PREDICT_HER2ST", HER2ST_DIR)
    if not os.path.isdir(os.path.join(path, "counts")):
        pytest.skip(f"HER2ST sections not found at {os.path.abspath(path)} (set ST_PREDICT_HER2ST)")
    return path


SMALL = {"image_size": 32, "latent_dim": 64, "n_heads": 4, "encoder_weights": "random", "n_genes": 40}


def setup(adata, **kwargs):
    from st_predict import NH2ST

    kwargs.setdefault("library_key", "section")
    kwargs.setdefault("patch_size", 32)
    NH2ST.setup_anndata(adata, **kwargs)


def model_with_pixel_size(tissue, **kwargs):
    """A small model trained one epoch on S0 + S1 of ``tissue``, whose sections have a pixel size (0.5 um/px)."""
    from st_predict import NH2ST

    adata = tissue[tissue.obs["section"] != "S2"].copy()
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib].setdefault("metadata", {})["pixel_size_um"] = 0.5
    setup(adata)
    m = NH2ST(adata, **{**SMALL, **kwargs})
    m.train(max_epochs=1, progress=False)
    return m


def per_gene_pcc(pred, truth):
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    pc, tc = pred - pred.mean(0), truth - truth.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pc * tc).sum(0) / denom


# -- whole slides: tiled pyramidal TIFFs with tissue-like blobs on white --------------------------------
BLOBS = ((0.35, 0.40, 0.18), (0.70, 0.65, 0.12))  # (centre y, centre x, radius) as fractions of the side


def slide_tissue(size: int, seed: int = 0) -> np.ndarray:
    """White background, two round purple blobs with a fine texture (stripes every 16 px + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size, 3), 242, np.uint8)
    stripes = (np.sin(np.arange(size) * 2 * np.pi / 16) * 40).astype(np.int16)
    for cy, cx, r in BLOBS:
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        tex = np.array([150, 80, 160], np.int16) + stripes[None, :, None] + rng.integers(-20, 20, (size, size, 3))
        img[m] = tex[m].clip(0, 255).astype(np.uint8)
    return img


def write_slide(path, img: np.ndarray, mpp: float | None, levels: int = 3, mean: bool = False, step: int = 2) -> str:
    """Tiled, zlib-compressed pyramidal TIFF, levels as successive IFDs (how OpenSlide reads them).

    Each level is every ``step``-th pixel of the one above, or with ``mean`` the mean of each ``step x step`` block
    (as libvips and spatialdata make pyramids); ``step=4`` gives an SVS's levels."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        level = img
        for i in range(levels):
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * step**i),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(128, 128), compression="zlib", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **kw)
            if mean:
                h, w = level.shape[0] // step * step, level.shape[1] // step * step
                level = level[:h, :w].reshape(h // step, step, w // step, step, -1).mean((1, 3)).astype(np.uint8)
            else:
                level = level[::step, ::step]
    return str(path)


# -- a tiny timm ViT published as a Hugging Face Hub repo in a local HF cache, read offline ----------------
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
REPO = "testorg/tiny-vit"


def tiny_vit(seed: int):
    """A 2-block ViT-Ti for 32 px patches, random weights from ``seed``."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)


#: the command line's training options of the small model every CLI test shares
SMALL_TRAIN = ["--patch-size", "32", "--image-size", "32", "--weights", "random", "--n-genes", "30", "--epochs", "2",
               "--model-kwargs", '{"latent_dim": 64, "n_heads": 4}', "--quiet"]


def module_root(tmp_path_factory, cli_model, name: str):
    """A folder of its own for a test module's outputs, with ``model`` pointing at the shared CLI model."""
    root = tmp_path_factory.mktemp(name)
    (root / "model").symlink_to(cli_model[0], target_is_directory=True)
    return root, cli_model[1]
