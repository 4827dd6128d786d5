"""A trained NH2ST as a lazyslide-models tile-prediction model, for ``zs.tl.tile_prediction``."""

from __future__ import annotations

import numpy as np
import torch
from lazyslide_models import TilePredictionModel

from st_predict._utils import resize_patch


class NH2STTileModel(TilePredictionModel):
    """A trained :class:`~st_predict.NH2ST` for LazySlide: ``zs.tl.tile_prediction(wsi, tile_model)``
    writes one column per predicted gene into the tile table, the values :meth:`NH2ST.predict_slide`
    gives for the same tiles.

    Lay the tiles at the model's patch with :attr:`tile_kwargs` (``zs.pp.tile_tissues(wsi,
    **tile_model.tile_kwargs)``), or, for a slide scanned coarser than the model's tiles, with
    :meth:`tile_kwargs_for` (``tile_model.tile_kwargs_for(wsi)``): tiles of another physical size are resampled
    to the network's input but show another area of tissue than the model was trained on. Get one from
    :meth:`NH2ST.as_tile_model`.
    """

    def __init__(self, model, tta: bool | None = None):
        if model.module.context != "patch":
            from st_predict._utils import InputError

            raise InputError(
                "This model predicts each tile from its neighbourhood (context='neighbors'), but LazySlide's "
                "tile_prediction gives a model one batch of tiles at a time, without their neighbours: its "
                "predictions would be wrong. Use model.predict_slide(slide), which reads the neighbouring tiles, or "
                "train a model with context='patch' (each tile from its own pixels) for tile_prediction."
            )
        self.nh2st = model
        self.model = model.module  # what LazySlide moves with .to(device)
        self.tta = model.tta_ if tta is None else bool(tta)
        self.columns = tuple(model.genes_)
        self.image_size = int(model.module.image_size)

    @property
    def tile_kwargs(self) -> dict:
        """``tile_px`` and ``mpp`` for ``zs.pp.tile_tissues``: tiles of the model's patch in micrometres,
        read at the network's input size."""
        size_um = self.nh2st.patch_size_um_
        if size_um is None:
            raise ValueError("This model records no physical patch size: tile at its training patch yourself.")
        return {"tile_px": self.image_size, "mpp": float(size_um) / self.image_size}

    def tile_kwargs_for(self, wsi) -> dict:
        """:attr:`tile_kwargs` for one slide: on a slide scanned coarser than the model's tiles (where LazySlide's
        ``tile_tissues`` refuses to upsample), tiles of the slide's own pixels, which :meth:`get_transform`
        upsamples to the network's input as :meth:`NH2ST.predict_slide` does (it warns once, with both
        resolutions); a slide too coarse for that is refused."""
        from st_predict._utils import InputError

        from ._slide_checks import tile_reading

        size_um = self.nh2st.patch_size_um_
        slide_mpp = wsi.properties.mpp
        if size_um is None:
            raise InputError("This model records no physical patch size: tile at its training patch yourself.")
        if slide_mpp is None or not slide_mpp > 0:
            raise InputError("The slide records no micrometres per pixel: set it with wsi.set_mpp(...) first.")
        tile_px, mpp, _ = tile_reading(float(size_um), self.image_size, float(slide_mpp),
                                       str(getattr(wsi, "path", None) or "the slide"))
        return {"tile_px": tile_px, "mpp": mpp}

    def get_transform(self):
        size = self.image_size

        def to_patch(image) -> torch.Tensor:
            """An ``(H, W, 3)`` uint8 tile -> ``(3, size, size)`` uint8, resampled as st_predict's readers do."""
            return resize_patch(torch.from_numpy(np.ascontiguousarray(np.asarray(image)[..., :3])).permute(2, 0, 1),
                                size)

        return to_patch

    @torch.inference_mode()
    def predict(self, image) -> dict[str, np.ndarray]:
        """``{gene: (B,) array}`` of predicted expression (``log1p`` counts per 10k) for a tile batch."""
        module = self.model
        was = module.training
        module.eval()
        try:
            out = module.predict_expression({"patches": image.to(module.device)}, tta=self.tta)
        finally:
            module.train(was)
        values = out.float().cpu().numpy()
        return {gene: values[:, j] for j, gene in enumerate(self.columns)}
