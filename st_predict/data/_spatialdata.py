"""SpatialData front end: an image element + a table of spots -> an AnnData with a lazy image."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import InputError, MissingKeyError


def _image_array(element):
    """Full-resolution level of an image element as a lazy ``(y, x, c)`` dask array."""
    try:
        from xarray import DataTree
    except ImportError:  # pragma: no cover
        DataTree = ()
    if isinstance(element, DataTree):
        first = sorted(element.children)[0]
        node = element[first]
        element = next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node
    dims = tuple(element.dims)
    if set(dims) != {"c", "y", "x"}:
        raise InputError(f"Expected a 2D image element with dims (c, y, x), got {dims}.")
    return element.transpose("y", "x", "c").data


def _affine_xy(element, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    tr = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def from_spatialdata(
    sdata,
    image_key: str | Mapping[str, str] | None = None,
    table_key: str = "table",
    coordinate_system: str | None = None,
    uns_image_key: str = "hires",
) -> ad.AnnData:
    """An AnnData view of a SpatialData object's spots for :class:`~st_predict.NH2ST`.

    The table's rows are matched to their shapes (circles or points) by ``instance_key``; spot centres
    are expressed in ``coordinate_system`` (for spatialdata-io's Visium reader, ``"global"`` = full-
    resolution pixels) into ``obsm["spatial"]``. Each region's H&E image is put in
    ``uns["spatial"][region]["images"][uns_image_key]`` as a **lazy dask array** (never loaded whole;
    patches read only the chunks they cover) with ``tissue_<uns_image_key>_scalef`` taken from the
    image's transformation (a scale without rotation or shear). ``obs["region"]`` (the table's
    ``region_key``) names each spot's region: pass it as ``library_key``. For circles the spot
    diameter goes to ``scalefactors["spot_diameter_fullres"]`` (what squidpy's plots use).

    The SpatialData object is not modified; expression matrices are shared with its table, not copied.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData`.
    image_key
        The image element (one name for all regions, or ``{region: image name}``). ``None``: the only
        image of the object.
    table_key
        The table of spots.
    coordinate_system
        Shared coordinate system of shapes and image (``None``: the only one they share, preferring
        ``"global"``).
    uns_image_key
        Key of the image inside ``uns["spatial"][region]["images"]``.
    """
    if table_key not in sdata.tables:
        raise MissingKeyError(f"SpatialData has no table {table_key!r} (tables: {list(sdata.tables)}).")
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs")
    if not attrs:
        raise InputError(f"Table {table_key!r} has no uns['spatialdata_attrs'] (region, region_key, instance_key).")
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    regions = [str(r) for r in pd.unique(table.obs[region_key].astype(str))]
    coords = np.full((table.n_obs, 2), np.nan)
    uns = {}
    for region in regions:
        if region not in sdata.shapes and region not in sdata.points:
            raise MissingKeyError(f"Region {region!r} of table {table_key!r} is not a shapes/points element.")
        shapes = sdata.shapes[region] if region in sdata.shapes else sdata.points[region].compute()
        if isinstance(image_key, Mapping):
            img_name = image_key.get(region)
        elif image_key is not None:
            img_name = image_key
        else:
            from spatialdata.transformations import get_transformation

            element = sdata.shapes[region] if region in sdata.shapes else sdata.points[region]
            own = set(get_transformation(element, get_all=True))
            candidates = [n for n, im in sdata.images.items() if own & set(get_transformation(im, get_all=True))]
            if len(candidates) != 1:
                raise InputError(
                    f"Region {region!r} shares a coordinate system with {len(candidates)} images {candidates}; "
                    "pass image_key= (a name or a {region: name} mapping) to pick its H&E image."
                )
            img_name = candidates[0]
        if img_name not in sdata.images:
            raise MissingKeyError(f"Image {img_name!r} for region {region!r} is not in the SpatialData (images: {list(sdata.images)}).")
        image = sdata.images[img_name]
        from spatialdata import get_centroids
        from spatialdata.transformations import get_transformation

        shared = set(get_transformation(sdata.shapes[region] if region in sdata.shapes else sdata.points[region],
                                        get_all=True)) & set(get_transformation(image, get_all=True))
        cs = coordinate_system
        if cs is None:
            if not shared:
                raise InputError(f"Region {region!r} and image {img_name!r} share no coordinate system.")
            cs = "global" if "global" in shared else sorted(shared)[0]
        elif cs not in shared:
            raise InputError(f"Region {region!r} and image {img_name!r} are not both in coordinate system {cs!r}.")
        element = sdata.shapes[region] if region in sdata.shapes else sdata.points[region]
        a_pts = _affine_xy(element, cs)
        a_img = _affine_xy(image, cs)
        # image pixel = inv(a_img) @ cs point; only a pure scale can be written as a Visium scale factor
        inv = np.linalg.inv(a_img)
        if not (np.allclose(inv[0, 1], 0) and np.allclose(inv[1, 0], 0) and np.allclose(inv[:2, 2], 0)
                and np.isclose(inv[0, 0], inv[1, 1])):
            raise InputError(
                f"Image {img_name!r} maps to {cs!r} by more than an isotropic scale ({a_img.tolist()}); "
                "this is not supported yet."
            )
        # the spots' centres in the coordinate system (circles, polygons or points), by spatialdata itself
        with warnings.catch_warnings():  # spatialdata parses its centroids as points and warns about their order
            warnings.filterwarnings("ignore", message="The index of the dataframe is not monotonic increasing")
            centres = get_centroids(element, coordinate_system=cs).compute()
        pos = pd.DataFrame(centres[["x", "y"]].to_numpy(dtype=np.float64), index=centres.index.astype(str),
                           columns=["x", "y"])
        sel = (table.obs[region_key].astype(str) == region).to_numpy()
        ids = table.obs.loc[sel, instance_key].astype(str)
        absent = ids[~ids.isin(pos.index)]
        if len(absent):
            raise MissingKeyError(f"{len(absent)} table rows of region {region!r} have no shape, e.g. {list(absent[:3])}.")
        coords[sel] = pos.loc[ids.to_numpy()].to_numpy()
        scalefactors = {f"tissue_{uns_image_key}_scalef": float(inv[0, 0])}
        if "radius" in getattr(shapes, "columns", []):
            # circles (Visium spots): their diameter in the coordinate system, as squidpy's plots expect
            scale = float(np.sqrt(abs(np.linalg.det(a_pts[:2, :2]))))
            scalefactors["spot_diameter_fullres"] = float(2 * np.median(shapes["radius"]) * scale)
        uns[region] = {
            "images": {uns_image_key: _image_array(image)},
            "scalefactors": scalefactors,
            "metadata": {"spatialdata_image": img_name, "coordinate_system": cs},
        }
    out = ad.AnnData(X=table.X, obs=table.obs.copy(), var=table.var.copy(), layers=dict(table.layers))
    out.obs[region_key] = pd.Categorical(out.obs[region_key].astype(str), categories=regions)
    out.obsm["spatial"] = coords
    out.uns["spatial"] = uns
    return out
