"""Random-weight stand-ins for the registry's pretrained predictors, written where their loaders read them: a local
Hugging Face cache laid out as the Hub's (read with HF_HUB_OFFLINE=1), or files for ``model_path=`` /
``gene_voc_path=``. Random weights give no meaningful PCC: the tests measure loading, shapes, caching and calibration."""

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

SNAPSHOT = "0" * 40


def hub_file(hub: Path, repo: str, filename: str) -> Path:
    """The path of ``repo``'s ``filename`` in the HF cache ``hub`` (``.../hub``), its folders and ``refs/main`` made."""
    root = hub / f"models--{repo.replace('/', '--')}"
    target = root / "snapshots" / SNAPSHOT / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    return target


class TinyCTransPath(nn.Module):
    """(B, 3, 224, 224) -> (B, 768), CTransPath's input and output, in one strided convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 32, stride=32)
        self.fc = nn.Linear(8, 768)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def export(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``net`` as a ``torch.export`` program with a dynamic batch, saved where the registry loads it."""
    batch = torch.export.Dim("batch", min=1, max=100000)
    program = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def write_path2space(hub: Path, genes, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """CTransPath (LazySlide-models-gpl) and Path2Space (LazySlide-models: program and gene list) in ``hub``."""
    torch.manual_seed(seed)
    ctrans = TinyCTransPath().eval()
    export(ctrans, torch.zeros(2, 3, 224, 224), hub_file(hub, "RendeiroLab/LazySlide-models-gpl",
                                                         "CTransPath/CTransPath_exported.pt2"))
    head = nn.Sequential(nn.Linear(768, 16), nn.ReLU(), nn.Linear(16, len(genes))).eval()
    export(head, torch.zeros(2, 768), hub_file(hub, "RendeiroLab/LazySlide-models", "Path2Space/Path2Space_exported.pt2"))
    hub_file(hub, "RendeiroLab/LazySlide-models", "Path2Space/Path2Space_genes.txt").write_text("\n".join(genes) + "\n")
    return ctrans, head


def write_stpath(folder: Path, genes, seed: int = 0) -> tuple[Path, Path]:
    """STPath's files for ``model_path=`` and ``gene_voc_path=``: random weights of its architecture (stored in
    half precision to halve the file) and a vocabulary of the released size, ``genes`` among its symbols."""
    from lazyslide_models.feature_prediction.stpath._constants import N_ORGANS, N_TECH
    from lazyslide_models.feature_prediction.stpath._model import STFM
    from lazyslide_models.feature_prediction.stpath._vocab import N_UNIQUE_GENES

    vocab = {f"SYM{i}": f"ENSG{i:011d}" for i in range(N_UNIQUE_GENES)}
    for i, g in enumerate(genes):
        vocab[g] = f"ENSG{i:011d}"
    voc = folder / "symbol2ensembl.json"
    voc.write_text(json.dumps(vocab))
    torch.manual_seed(seed)
    net = STFM(n_genes=N_UNIQUE_GENES + 2, n_tech=N_TECH, n_organs=N_ORGANS)
    weights = folder / "stfm.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, weights)
    return weights, voc


class Counting(nn.Module):
    """A user encoder for feature predictors: (B, 3, S, S) -> (B, dim), counting the tiles it embeds."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.fc = nn.Linear(8, dim)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@contextlib.contextmanager
def offline_hub(root: Path, genes):
    """Path2Space and its CTransPath (random, :func:`write_path2space`) in an HF cache under ``root``, read offline
    while the context lasts; yields ``(hub folder, (ctranspath, head))``."""
    import huggingface_hub.constants as hc
    import pytest

    nets = write_path2space(root / "hub", genes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hc, "HF_HUB_OFFLINE", True)
        mp.setattr(hc, "HF_HUB_CACHE", str(root / "hub"))
        yield root / "hub", nets
