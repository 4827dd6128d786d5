import os

import pytest

os.environ.setdefault("MPLBACKEND", "agg")

# `make test` runs the suite on pytest-xdist workers, one per core: each computes with its share of the cores
# (and so do the processes its tests start), so that the workers' threads never outnumber the cores
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from joblib import cpu_count

    _THREADS = str(max(1, int(cpu_count()) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = _THREADS


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

#: a test taking longer than this (setup + call) without a ``slow`` marker is named at the end of every run
SLOW_UNMARKED_S = 20.0
_DURATIONS: dict[str, float] = {}
_SLOW_MARKED: set[str] = set()


def pytest_runtest_logreport(report):
    # also on xdist's controller, which collects nothing itself: the marker comes with the report
    if report.when in ("setup", "call"):
        _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration
        if "slow" in report.keywords:
            _SLOW_MARKED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """The 20 slowest tests of the run (setup + call), and any test over SLOW_UNMARKED_S without a ``slow``
    marker, by name: the suite must stay fast as features are added."""
    if not _DURATIONS:
        return
    slowest = sorted(_DURATIONS.items(), key=lambda kv: -kv[1])[:20]
    terminalreporter.section("slowest tests (setup + call)")
    for nodeid, seconds in slowest:
        terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
    unmarked = [(n, d) for n, d in _DURATIONS.items() if d > SLOW_UNMARKED_S and n not in _SLOW_MARKED]
    if unmarked:
        terminalreporter.section(f"tests over {SLOW_UNMARKED_S:g} s without a slow marker")
        for nodeid, seconds in sorted(unmarked, key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}  <- mark it @pytest.mark.slow, or make it cheaper")


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory):
    """An .h5ad of three synthetic sections and a model trained on two of them by the command line (shared by
    the CLI and newcomer tests; read-only: write outputs elsewhere)."""
    from helpers import SMALL_TRAIN

    from st_predict.cli import main
    from st_predict.data import synthetic_tissue

    root = tmp_path_factory.mktemp("cli_model")
    data = root / "tissue.h5ad"
    synthetic_tissue(n_sections=3, n_rows=10, n_cols=10, n_genes=60).write_h5ad(data)
    assert main(["train", str(data), "--out", str(root / "model"), "--sections", "S0", "S1", *SMALL_TRAIN]) == 0
    return root / "model", data


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


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """``helpers.tiny_vit`` (seed 0) saved as the Hub repo testorg/tiny-vit in an HF cache, with
    HF_HUB_OFFLINE=1 and the encoder's own normalisation (mean 0.6/0.5/0.7, std 0.2/0.25/0.2)."""
    import timm
    from helpers import TINY_VIT, tiny_vit

    net = tiny_vit(0)
    repo = tmp_path / "hf" / "hub" / "models--testorg--tiny-vit"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    cfg = {**net.pretrained_cfg, "input_size": (3, 32, 32), "mean": (0.6, 0.5, 0.7), "std": (0.2, 0.25, 0.2)}
    cfg = {k: v for k, v in cfg.items() if k not in ("hf_hub_id", "url")}
    timm.models.save_for_hf(net, str(snapshot), model_config={"pretrained_cfg": cfg}, model_args=TINY_VIT,
                            safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    # huggingface_hub reads these once, at import
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return net


@pytest.fixture
def encoder_calls(monkeypatch):
    """The number of spots each call of the frozen-encoder path (``compute_fmaps`` in training and prediction)
    runs through the encoder, in order: a cache hit adds nothing."""
    import st_predict.model._training as training

    seen = []
    real = training.compute_fmaps

    def counting(module, read_patches, n_spots=None, **kwargs):
        seen.append(n_spots)
        return real(module, read_patches, n_spots, **kwargs)

    monkeypatch.setattr(training, "compute_fmaps", counting)
    return seen
