"""A small, complete synthetic 10x Space Ranger **Visium HD** output folder: try :func:`read_visium_hd` and the
HD workflow without HD data (the tests and the tutorial use it).

Layout, as Space Ranger >= 3 writes it and spatialdata-io's ``visium_hd`` reader reads it::

    root/feature_slice.h5                         # only its ``metadata_json`` attribute is read
    root/binned_outputs/square_016um/filtered_feature_bc_matrix.h5   # in-tissue bins (10x h5)
    root/binned_outputs/square_016um/raw_feature_bc_matrix.h5        # every bin of the grid
    root/binned_outputs/square_016um/spatial/tissue_positions.parquet
    root/binned_outputs/square_016um/spatial/scalefactors_json.json
    root/binned_outputs/square_016um/spatial/tissue_hires_image.png, tissue_lowres_image.png
    (the same for square_008um, and square_002um when asked)
    root/tissue_image.btf                         # the full-resolution H&E (tiled BigTIFF), with fullres=True

Counts are drawn for the finest bins and summed into the coarser ones (a 16 um bin is the sum of its 2 x 2
8 um bins and sits at their mean centre), as Space Ranger bins its 2 um squares. The tissue is a purple
textured ellipse on white whose colour follows a smooth "tumour" field that also drives the expression,
so a model can learn something from the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from st_predict._utils import InputError

MICRONS_PER_PIXEL = 0.5  #: full-resolution pixel size of the written slide
HIRES_SCALEF, LOWRES_SCALEF = 0.5, 0.125
ORIGIN = (37.5, 21.25)  #: (x, y) full-resolution pixels of the grid's top-left corner (not centred on purpose)
MARGIN = 40  #: full-resolution pixels right of / below the grid
N_GENES = 30
GENES = [f"GENE{i:02d}" for i in range(N_GENES - 1)] + ["GENE27"]  # a repeated symbol, as in real 10x matrices


def bin_side_px(bin_size_um: int) -> float:
    return bin_size_um / MICRONS_PER_PIXEL


def barcode(bin_size_um: int, row: int, col: int) -> str:
    return f"s_{bin_size_um:03d}um_{row:05d}_{col:05d}-1"


def _grid_shape(n: int) -> tuple[int, int]:
    """Rows x columns of the coarsest grid (not square, so swapped axes show)."""
    return n, n + max(1, n // 4)


def _image_size(n: int, coarsest: int) -> tuple[int, int]:
    rows, cols = _grid_shape(n)
    side = bin_side_px(coarsest)
    return int(np.ceil(ORIGIN[1] + rows * side + MARGIN)), int(np.ceil(ORIGIN[0] + cols * side + MARGIN))


def _fields(x, y, height, width):
    """Tissue mask and tumour fraction (0..1) at full-resolution pixel positions ``x``, ``y``."""
    ex, ey, rx, ry = ORIGIN[0] + 0.52 * (width - ORIGIN[0] - MARGIN), ORIGIN[1] + 0.5 * (height - ORIGIN[1] - MARGIN), \
        0.42 * (width - ORIGIN[0] - MARGIN), 0.40 * (height - ORIGIN[1] - MARGIN)
    tissue = ((x - ex) / rx) ** 2 + ((y - ey) / ry) ** 2 < 1.0
    tx, ty = ex - 0.35 * rx, ey + 0.25 * ry  # the tumour sits left of and below the centre
    tumour = 1.0 / (1.0 + np.exp((np.hypot(x - tx, y - ty) - 0.45 * rx) / (0.08 * rx)))
    return tissue, tumour


def _slide(height: int, width: int, rng) -> np.ndarray:
    """White background; tissue pink (stroma) to dark purple (tumour), with a fine texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue, tumour = _fields(xx, yy, height, width)
    stroma, dense = np.array([225, 150, 200], np.float32), np.array([110, 50, 150], np.float32)
    colour = stroma + tumour[..., None] * (dense - stroma)
    texture = 25 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 4.0)[..., None] + rng.normal(0, 12, (height, width, 1))
    img = np.full((height, width, 3), 242, np.float32)
    img[tissue] = (colour + texture)[tissue]
    return img.clip(0, 255).astype(np.uint8)


def _write_10x_h5(path: Path, counts: sparse.csr_matrix, barcodes, library_id: str) -> None:
    """The 10x feature-barcode matrix h5 (Space Ranger >= 3): genes x barcodes in CSC."""
    m = sparse.csr_matrix(counts)  # barcodes x genes, i.e. the 10x genes x barcodes matrix in CSC
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library_id], dtype="S")
        f.attrs["chemistry_description"] = "Visium HD v1"
        f.attrs["software_version"] = "spaceranger-3.1.1"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([m.shape[1], m.shape[0]], dtype=np.int32))
        feat = g.create_group("features")
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}" for i in range(m.shape[1])], dtype="S"))
        feat.create_dataset("name", data=np.array(GENES[: m.shape[1]], dtype="S"))
        feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * m.shape[1], dtype="S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * m.shape[1], dtype="S"))
        feat.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def write_synthetic_visium_hd(root, bin_sizes=(8, 16), n: int = 12, seed: int = 0, library_id: str = "HD1",
                              fullres: bool = False) -> dict:
    """Write a synthetic Visium HD ``outs`` folder at ``root`` (0.5 um per full-resolution pixel, 30 genes) and
    return what was written (the truth to compare a reader or a prediction with).

    ``n``: rows of the coarsest bin grid (it has ``n + n // 4`` columns); every bin size must divide the
    coarsest. Returns ``{"root", "library_id", "image", "fullres_image_file", "genes", "bins": {size: {"barcodes",
    "counts" (CSR, every bin of the grid), "in_tissue", "array_row", "array_col", "x", "y"}}}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = sorted({int(s) for s in bin_sizes})
    finest, coarsest = sizes[0], sizes[-1]
    if any(coarsest % s for s in sizes):
        raise InputError(f"bin sizes {sizes} must all divide the coarsest, {coarsest}")
    rows, cols = _grid_shape(n)
    height, width = _image_size(n, coarsest)
    image = _slide(height, width, rng)

    # the finest bins: tissue from the coarse bin around them (so every level keeps the same bins in tissue)
    f = coarsest // finest
    fr, fc = np.meshgrid(np.arange(rows * f), np.arange(cols * f), indexing="ij")
    fr, fc = fr.ravel(), fc.ravel()
    side = bin_side_px(finest)
    fx, fy = ORIGIN[0] + (fc + 0.5) * side, ORIGIN[1] + (fr + 0.5) * side
    cx = ORIGIN[0] + (fc // f + 0.5) * bin_side_px(coarsest)
    cy = ORIGIN[1] + (fr // f + 0.5) * bin_side_px(coarsest)
    fine_tissue = _fields(cx, cy, height, width)[0]
    tumour = _fields(fx, fy, height, width)[1]
    base = rng.gamma(2.0, 1.0, N_GENES) * (finest / 8.0) ** 2
    effect = rng.normal(0.0, 1.2, N_GENES)
    rate = base[None, :] * np.exp(effect[None, :] * (tumour[:, None] - 0.5))
    rate = np.where(fine_tissue[:, None], rate, 0.03)
    fine_counts = sparse.csr_matrix(rng.poisson(rate).astype(np.int64))

    out = {"root": root, "library_id": library_id, "image": image, "genes": list(GENES), "bins": {}}
    for size in sizes:
        k = size // finest
        r, c = fr // k, fc // k
        nr, nc = rows * (coarsest // size), cols * (coarsest // size)
        idx = r * nc + c  # the bin (row-major) each finest bin falls in
        agg = sparse.csr_matrix((np.ones(len(idx)), (idx, np.arange(len(idx)))), shape=(nr * nc, len(idx)))
        counts = (agg @ fine_counts).tocsr().astype(np.int64)
        in_tissue = (agg @ fine_tissue.astype(float)) > 0
        br, bc = np.divmod(np.arange(nr * nc), nc)
        x = (agg @ fx) / k**2  # the mean centre of the finest bins = the bin's own centre
        y = (agg @ fy) / k**2
        barcodes = [barcode(size, a, b) for a, b in zip(br, bc, strict=True)]
        out["bins"][size] = {"barcodes": barcodes, "counts": counts, "in_tissue": in_tissue.astype(int),
                             "array_row": br, "array_col": bc, "x": x, "y": y}

        folder = root / "binned_outputs" / f"square_{size:03d}um"
        spatial = folder / "spatial"
        spatial.mkdir(parents=True, exist_ok=True)
        _write_10x_h5(folder / "raw_feature_bc_matrix.h5", counts, barcodes, library_id)
        keep = np.flatnonzero(in_tissue)
        _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts[keep], [barcodes[i] for i in keep], library_id)
        # Space Ranger's column order (spatialdata-io checks it); the parquet lists every bin, in and out
        pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(np.int32), "array_row": br.astype(np.int32),
                      "array_col": bc.astype(np.int32), "pxl_row_in_fullres": y,
                      "pxl_col_in_fullres": x}).to_parquet(spatial / "tissue_positions.parquet", index=False)
        sf = {"spot_diameter_fullres": bin_side_px(size), "bin_size_um": float(size),
              "microns_per_pixel": MICRONS_PER_PIXEL, "regist_target_img_scalef": HIRES_SCALEF,
              "tissue_lowres_scalef": LOWRES_SCALEF, "fiducial_diameter_fullres": 4.0 * bin_side_px(size),
              "tissue_hires_scalef": HIRES_SCALEF}
        (spatial / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
        for name, scalef in (("hires", HIRES_SCALEF), ("lowres", LOWRES_SCALEF)):
            small = Image.fromarray(image).resize((round(width * scalef), round(height * scalef)), Image.BILINEAR)
            small.save(spatial / f"tissue_{name}_image.png")

    # feature_slice.h5: spatialdata-io reads its metadata_json attribute (the HD layout's file format)
    layout = {"file_format": "1.0", "transform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}
    with h5py.File(root / "feature_slice.h5", "w") as fs:
        fs.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout), "transform_matrices": {}})
    out["fullres_image_file"] = None
    if fullres:
        import tifffile

        out["fullres_image_file"] = root / "tissue_image.btf"
        tifffile.imwrite(out["fullres_image_file"], image, photometric="rgb", tile=(64, 64), bigtiff=True)
    return out
