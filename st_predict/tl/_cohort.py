"""Many slides in one call: one ``dask.distributed`` task per slide, a manifest to resume from (issue 19).

The client (this process) sends each worker only plain values: the saved model's folder, the slide's
path and the settings. A worker loads the model once (kept for its next slides), opens its own slide,
predicts it with :meth:`~st_predict.NH2ST.predict_slide` and writes ``<out>/<slide id>.zarr``
atomically (a hidden folder renamed into place). Whatever goes wrong with one slide is caught in the
task and returned as that slide's error; a worker that dies (out of memory, a crash in a reader) fails
only its slide. The client records every result in ``<out>/manifest.csv`` as it arrives (atomically),
so a run that is killed leaves a manifest of the slides it finished, and a rerun skips them.

The same code runs on a laptop (a :class:`distributed.LocalCluster` sized to its cores), on an
existing scheduler (``scheduler="tcp://host:8786"`` or ``client=``), or on Slurm/PBS through
dask-jobqueue (``docs/user_guide/cohorts.md``). Every worker must see the model folder, the slides and
the output folder under the same paths (a shared file system).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from st_predict._utils import (
    PREDICTED_KEY,
    PRETRAINED_KEY,
    InputError,
    InputWarning,
    MissingFileError,
    staged_file,
    staged_folder,
)

#: The manifest's file name in the output folder, and its columns.
MANIFEST = "manifest.csv"
COLUMNS = ("slide_id", "slide", "status", "tiles", "seconds", "error", "warning", "finished")
#: columns a manifest of an earlier version may lack (filled with "")
_ADDED_COLUMNS = ("warning",)
#: Statuses in the manifest: written, failed (with its error), or not (yet) done.
DONE, FAILED, PENDING = "done", "failed", "pending"

# double suffixes of slide files, stripped whole to name a slide
_DOUBLE_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr")


def slide_id(path: str | os.PathLike) -> str:
    """A slide's id: its file name without the format's suffix (``TCGA-A1.svs`` -> ``TCGA-A1``)."""
    name = Path(os.fspath(path).rstrip("/\\")).name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    stem, ext = os.path.splitext(name)
    return stem if ext and stem else name


def slide_table(slides) -> pd.DataFrame:
    """The slides to predict as a table with columns ``slide`` (absolute path), ``slide_id`` and ``mpp``
    (NaN: the slide's own), from a list of paths, a DataFrame or the path of a CSV with a ``slide``
    column (and optionally ``slide_id``, ``mpp``; relative paths are relative to the CSV's folder)."""
    base = Path.cwd()
    if isinstance(slides, str | os.PathLike) and os.fspath(slides).lower().endswith(".csv"):
        csv = Path(slides)
        if not csv.is_file():
            raise MissingFileError(f"Slide manifest {csv} does not exist.")
        slides, base = pd.read_csv(csv, dtype={"slide": str, "slide_id": str}), csv.resolve().parent
    elif isinstance(slides, str | os.PathLike):
        slides = [slides]
    if isinstance(slides, pd.DataFrame):
        if "slide" not in slides.columns:
            raise InputError(f"The slide table needs a 'slide' column (the slide files); it has {list(slides.columns)}.")
        table = slides.reset_index(drop=True).copy()
    elif isinstance(slides, Iterable):
        table = pd.DataFrame({"slide": [os.fspath(s) for s in slides]})
    else:
        raise InputError(f"slides must be paths, a DataFrame or a CSV file, got {type(slides).__name__}.")
    if len(table) == 0:
        raise InputError("No slides to predict.")
    if table["slide"].isna().any():
        raise InputError(f"{int(table['slide'].isna().sum())} rows of the slide table have no slide path.")
    table["slide"] = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in table["slide"].astype(str)]
    if "slide_id" not in table or table["slide_id"].isna().all():
        table["slide_id"] = [slide_id(p) for p in table["slide"]]
    table["slide_id"] = table["slide_id"].astype(str)
    bad = [s for s in table["slide_id"] if not s or s.startswith(".") or "/" in s or "\\" in s]
    if bad:
        raise InputError(f"Slide ids must be plain file names (no '/', not starting with '.'): {bad[:5]}.")
    dup = table["slide_id"][table["slide_id"].duplicated()].unique()
    if len(dup):
        raise InputError(f"Slide ids must be unique (each names its output <id>.zarr); repeated: {list(dup[:5])}; "
                         "give a slide_id column.")
    table["mpp"] = pd.to_numeric(table["mpp"], errors="raise") if "mpp" in table else np.nan
    return table[["slide_id", "slide", "mpp"]]


def read_manifest(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest of an output folder (empty when there is none yet)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    df = pd.read_csv(path, dtype={"slide_id": str, "slide": str, "status": str, "error": str, "warning": str,
                                  "finished": str}, keep_default_na=False)
    for col in _ADDED_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise InputError(f"{path} is not a manifest written by st_predict (no columns {sorted(missing)}).")
    df["tiles"] = pd.to_numeric(df["tiles"], errors="coerce").fillna(0).astype(int)
    df["seconds"] = pd.to_numeric(df["seconds"], errors="coerce")
    return df[list(COLUMNS)]


def write_manifest(out_dir: str | os.PathLike, manifest: pd.DataFrame) -> None:
    """Write the manifest atomically (a reader never sees half a file)."""
    with staged_file(Path(out_dir) / MANIFEST) as tmp:
        manifest[list(COLUMNS)].to_csv(tmp, index=False)


def write_prediction(sdata, key_added: str, out: str | os.PathLike) -> None:
    """Write what ``predict_slide`` returned as a SpatialData zarr at ``out``: its table, the tile and tissue
    shapes and the slide image ``f"{key_added}_image"``, atomically (an existing store is replaced only once
    the new one is complete)."""
    import spatialdata

    image_key = f"{key_added}_image"
    images = {image_key: sdata.images[image_key]} if image_key in sdata.images else {}
    result = spatialdata.SpatialData(images=images, shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    with staged_folder(out, replace=True, create=False) as staging, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's notice of a future default, not ours
        result.write(staging)


# -- the task a worker runs ----------------------------------------------------------------------
_MODELS: dict[tuple, object] = {}  # in each worker process: the models it loaded, by folder and file time


#: what a saved model's folder holds: NH2ST's weights, or a pretrained predictor's reference to its weights
SAVED_FILES = ("model.pt", "pretrained.json")


def saved_model_file(model_dir: str | os.PathLike) -> Path:
    """The file that makes ``model_dir`` a saved model (NH2ST's ``model.pt`` or a pretrained predictor's
    ``pretrained.json``); an error names both when there is neither."""
    for name in SAVED_FILES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    raise MissingFileError(f"No saved model at {model_dir} (expected {Path(model_dir) / SAVED_FILES[0]} of NH2ST or "
                           f"{Path(model_dir) / SAVED_FILES[1]} of a pretrained predictor).")


def _model(model_dir: str, load_kwargs: dict):
    path = saved_model_file(model_dir)
    key = (model_dir, path.name, path.stat().st_mtime_ns, tuple(sorted(load_kwargs.items())))
    if key not in _MODELS:
        from st_predict import NH2ST, Pretrained

        _MODELS.clear()  # one model per worker process
        _MODELS[key] = (Pretrained if path.name == "pretrained.json" else NH2ST).load(model_dir, **load_kwargs)
    return _MODELS[key]


def default_key(model) -> str:
    """The table a model's slide predictions go to by default: ``"nh2st"``, or ``"pretrained"`` for a pretrained
    predictor."""
    from ._slide_pretrained import is_pretrained

    return PRETRAINED_KEY if is_pretrained(model) else PREDICTED_KEY


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def predict_one(model_dir: str, load_kwargs: dict, slide: str, out: str, predict_kwargs: dict,
                torch_threads: int | None = None) -> dict:
    """Predict one slide into ``out`` (run on a worker). Never raises: an error is returned as the slide's."""
    start = time.perf_counter()
    try:
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        import dask

        model = _model(model_dir, load_kwargs)
        key = predict_kwargs.get("key_added") or default_key(model)
        # the slide readers' dask arrays are computed here, in this task: with dask's default in a worker they
        # would go to the cluster, and the task, waiting, would let the worker start another slide (three at
        # once in one worker here: slower, and more memory)
        with dask.config.set(scheduler="synchronous"), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("default")
            sdata = model.predict_slide(slide, progress=False, num_workers=0, **{**predict_kwargs, "key_added": key})
            write_prediction(sdata, key, out)
        tiles = int(sdata.tables[key].n_obs)
        del sdata
        # st_predict's own warnings about this slide (an upsampled coarse scan, ...), which a worker cannot show
        ours = [_one_line(w.message) for w in said if issubclass(w.category, InputWarning)]
        return {"status": DONE, "tiles": tiles, "seconds": time.perf_counter() - start, "error": "",
                "warning": " | ".join(dict.fromkeys(ours))}
    except Exception as err:  # noqa: BLE001 - one slide's failure is that slide's, recorded in the manifest
        return {"status": FAILED, "tiles": 0, "seconds": time.perf_counter() - start, "error": _one_line(err),
                "warning": ""}


# -- the client's side ---------------------------------------------------------------------------
def _clean_staging(out_dir: Path) -> None:
    """Remove what a killed run left half-written (hidden staging folders and files; never outputs)."""
    for p in out_dir.glob(".*"):
        if ".staging-" in p.name or p.name.startswith(f".{MANIFEST}."):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def plan(table: pd.DataFrame, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest to start from (the earlier run's rows, this run's slides added as pending) and the slides
    still to predict: every slide not recorded as done with its output in place."""
    earlier = read_manifest(out_dir)
    old = earlier[~earlier["slide_id"].isin(table["slide_id"])]  # other slides' rows are kept
    prev = earlier.set_index("slide_id")
    rows = []
    for r in table.itertuples(index=False):
        done = (r.slide_id in prev.index and prev.at[r.slide_id, "status"] == DONE
                and (out_dir / f"{r.slide_id}.zarr").is_dir())
        if done:
            rows.append({**prev.loc[r.slide_id].to_dict(), "slide_id": r.slide_id})
        else:
            rows.append({"slide_id": r.slide_id, "slide": r.slide, "status": PENDING, "tiles": 0, "seconds": np.nan,
                         "error": "", "warning": "", "finished": ""})
    manifest = pd.DataFrame(rows, columns=list(COLUMNS))
    if len(old):
        manifest = pd.concat([old, manifest], ignore_index=True)
    todo = table[manifest.set_index("slide_id").loc[table["slide_id"], "status"].to_numpy() != DONE]
    return manifest, todo


@contextlib.contextmanager
def _dask_client(client, scheduler: str | None, n_workers: int | None, threads: int | None):
    """The client to submit to, and the torch threads per task: ``client``, else one connected to ``scheduler``,
    else a new :class:`~distributed.LocalCluster` of ``n_workers`` one-task processes (closed on exit)."""
    if client is not None:
        yield client, threads
        return
    from distributed import Client

    if scheduler is not None:
        with Client(scheduler) as c:
            yield c, threads
        return
    import dask
    from distributed import LocalCluster

    from st_predict._utils import available_cores

    cores = available_cores()
    n = max(1, min(cores, n_workers or cores))
    threads = threads or max(1, cores // n)
    # a slide that kills its worker is failed, not retried on the next worker (and killing that one too)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=40) as cluster, Client(cluster) as c:
        yield c, threads


def run(model_dir: str | os.PathLike, slides, out_dir: str | os.PathLike, *, load_kwargs: dict | None = None,
        predict_kwargs: dict | None = None, client=None, scheduler: str | None = None, n_workers: int | None = None,
        torch_threads: int | None = None, progress: bool | None = None, echo=print) -> pd.DataFrame:
    """Predict every slide of ``slides`` not yet done in ``out_dir`` (see :meth:`NH2ST.predict_slides`)."""
    from st_predict._utils import interactive

    model_dir = os.path.abspath(os.fspath(model_dir))
    saved_model_file(model_dir)
    table = slide_table(slides)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_staging(out_dir)
    manifest, todo = plan(table, out_dir)
    write_manifest(out_dir, manifest)
    skipped = len(table) - len(todo)
    predict_kwargs = dict(predict_kwargs or {})
    if len(todo):
        progress = interactive() if progress is None else bool(progress)
        where = manifest.set_index("slide_id").index
        with _dask_client(client, scheduler, n_workers, torch_threads) as (c, threads):
            from distributed import as_completed

            futures = {}
            for r in todo.itertuples(index=False):
                kw = dict(predict_kwargs)
                if np.isfinite(r.mpp):
                    kw["mpp"] = float(r.mpp)
                fut = c.submit(predict_one, model_dir, dict(load_kwargs or {}), r.slide,
                               str(out_dir / f"{r.slide_id}.zarr"), kw, threads, pure=False,
                               key=f"st-predict-{r.slide_id}-{os.urandom(4).hex()}")
                futures[fut] = r.slide_id
            done = as_completed(futures)
            if progress:
                from tqdm.auto import tqdm

                done = tqdm(done, total=len(futures), desc="Predicting slides", unit="slide")
            for fut in done:
                sid = futures[fut]
                try:
                    res = fut.result()
                except Exception as err:  # noqa: BLE001 - the task never returned (its worker died, e.g. out of
                    # memory, or could not run it): this slide failed
                    res = {"status": FAILED, "tiles": 0, "seconds": np.nan,
                           "error": f"the task did not return: {_one_line(err)}", "warning": ""}
                i = where.get_loc(sid)
                for col in ("status", "tiles", "seconds", "error", "warning"):
                    manifest.iat[i, manifest.columns.get_loc(col)] = res[col]
                manifest.iat[i, manifest.columns.get_loc("finished")] = time.strftime("%Y-%m-%dT%H:%M:%S")
                write_manifest(out_dir, manifest)
    rows = manifest[manifest["slide_id"].isin(table["slide_id"])]
    failed = rows[rows["status"] != DONE]
    echo(f"{len(table)} slides: {len(rows) - len(failed)} done ({skipped} by an earlier run), {len(failed)} failed; "
         f"manifest {out_dir / MANIFEST}")
    for r in failed.itertuples(index=False):
        echo(f"  failed {r.slide_id}: {r.error}")
    for r in rows[(rows["status"] == DONE) & (rows["warning"] != "")].itertuples(index=False):
        echo(f"  warning {r.slide_id}: {r.warning}")
    return rows.reset_index(drop=True)


def predict_slides(
    model,
    slides,
    out_dir: str | os.PathLike,
    *,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool | None = None,
    key_added: str | None = None,
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
    model
        A trained :class:`~st_predict.NH2ST` or a :class:`~st_predict.Pretrained` predictor
        (``model.predict_slides(slides, out_dir)`` calls this). A pretrained predictor is saved as a reference to
        its weights, which every worker must find (the same ``model_path``, or the same Hugging Face cache), with
        its ``feature_cache`` folder.
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
        Name of each output's table, as in :meth:`predict_slide` (default ``"nh2st"``, or ``"pretrained"`` for a
        pretrained predictor).
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
    from ._slide_pretrained import is_pretrained

    pretrained = is_pretrained(model)
    if pretrained:
        load = _pretrained_load_kwargs(model)
    else:
        model._check_if_trained(warn=False)
        device = getattr(model.module, "device", None)
        load = {"accelerator": "gpu" if device is not None and device.type == "cuda" else "cpu"}
    for bad in ("progress", "num_workers"):
        if bad in kwargs:
            raise TypeError(f"predict_slides() sets {bad} of predict_slide itself.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".model-*"):  # left by a run that was killed
        shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(dir=out, prefix=".model-")  # seen by every worker that sees out_dir
    try:
        model.save(os.path.join(folder, "model"), save_anndata=False)
        return run(os.path.join(folder, "model"), slides, out, load_kwargs=load,
                   predict_kwargs={**kwargs, "key_added": key_added or default_key(model)}, client=client,
                   scheduler=scheduler, n_workers=n_workers, torch_threads=threads_per_worker, progress=progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pretrained_load_kwargs(model) -> dict:
    """How a worker loads a pretrained predictor as ``model`` is: with its feature cache folder (its encoder is
    named, so the worker builds it again; a module cannot be sent)."""
    import torch

    if isinstance(model.encoder_arg, torch.nn.Module):
        raise InputError("predict_slides() loads the predictor again in each worker, which cannot rebuild a user "
                         "encoder module: give the encoder by name (an st_predict encoder spec), or call "
                         "predict_slide() per slide.")
    cache = model._cache()
    return {} if cache is None else {"feature_cache": str(cache.root)}
