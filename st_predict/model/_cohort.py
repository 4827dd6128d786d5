"""``predict_slides``: many whole slides in one call, on dask.distributed, resumable (issue 19)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from st_predict import _cohort
from st_predict._constants import PREDICTED_KEY


class CohortMixin:
    """:meth:`predict_slides`: a cohort of slides, one dask task per slide, with a manifest to resume from."""

    def predict_slides(
        self,
        slides,
        out_dir: str | os.PathLike,
        *,
        client=None,
        scheduler: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        progress: bool | None = None,
        key_added: str = PREDICTED_KEY,
        **kwargs,
    ) -> pd.DataFrame:
        """Predict expression over many whole slides, one ``dask.distributed`` task per slide.

        Each slide's prediction (what :meth:`predict_slide` returns: its table, tiles, tissue and image) is
        written to ``out_dir/<slide id>.zarr``, atomically; ``out_dir/manifest.csv`` records every slide's
        ``status`` (``done``, ``failed``, ``pending``), ``tiles``, ``seconds``, ``error`` and when it
        ``finished``. A slide that cannot be read or predicted fails alone: its error goes into the manifest
        and the summary printed at the end, and the other slides go on. Called again with the same
        ``out_dir`` (after a crash, a pre-emption, or to add slides), it skips the slides that are done and
        retries the failed ones.

        The model is saved once into a hidden folder of ``out_dir``; each worker loads it once and opens
        its own slides (no reader or model object is sent). Needs ``pip install 'st-predict[wsi]'`` on every
        worker, and every worker must see ``out_dir`` and the slides under the same paths.

        Parameters
        ----------
        slides
            Slide paths (anything :meth:`predict_slide` opens from a path), a DataFrame, or the path of a CSV
            file, with a ``slide`` column and optionally ``slide_id`` (default: the file name without its
            suffix, ``TCGA-A1.svs`` -> ``TCGA-A1``) and ``mpp`` (µm per level-0 pixel for slides whose
            metadata has none). Relative paths in a CSV are relative to the CSV's folder.
        out_dir
            Output folder (created); the outputs and the manifest go there.
        client
            A :class:`distributed.Client` of an existing cluster (e.g. a dask-jobqueue ``SLURMCluster``);
            default: a new :class:`distributed.LocalCluster`, closed at the end.
        scheduler
            Address of a running dask scheduler (``"tcp://host:8786"``), instead of ``client``.
        n_workers
            Worker processes of the local cluster (default: one per core), each predicting one slide at a
            time.
        threads_per_worker
            Torch threads in each worker (default on a local cluster: the cores divided among the workers;
            on an existing cluster: one, since dask starts its workers with ``OMP_NUM_THREADS=1``).
        progress
            A progress bar over slides (default: on a terminal or in a notebook).
        key_added
            Name of each output's table, as in :meth:`predict_slide`.
        **kwargs
            Passed to :meth:`predict_slide` (``mpp``, ``pitch_um``, ``tile_size_um``, ``batch_size``, ``tta``,
            ``tissue_method``, ``min_tissue_fraction``, ``image_mpp``, ``interval_level``, ``ensemble``...).
            Its tiles are read in the worker itself (``num_workers=0``).

        Returns
        -------
        The manifest rows of ``slides`` (a DataFrame); ``(manifest["status"] != "done").any()`` says whether
        some failed.

        Examples
        --------
        >>> manifest = model.predict_slides(["a.svs", "b.svs"], "predictions/")
        >>> sdata = spatialdata.read_zarr("predictions/a.zarr")
        """
        self._check_if_trained(warn=False)
        for bad in ("progress", "num_workers"):
            if bad in kwargs:
                raise TypeError(f"predict_slides() sets {bad} of predict_slide itself.")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob(".model-*"):  # left by a run that was killed
            shutil.rmtree(old, ignore_errors=True)
        folder = tempfile.mkdtemp(dir=out, prefix=".model-")  # seen by every worker that sees out_dir
        try:
            self.save(os.path.join(folder, "model"), save_anndata=False)
            device = getattr(self.module, "device", None)
            load = {"accelerator": "gpu" if device is not None and device.type == "cuda" else "cpu"}
            return _cohort.run(os.path.join(folder, "model"), slides, out, load_kwargs=load,
                               predict_kwargs={**kwargs, "key_added": key_added}, client=client, scheduler=scheduler,
                               n_workers=n_workers, torch_threads=threads_per_worker, progress=progress)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
