"""Is a new section unlike the calibration sections? A distance on image features, with a threshold fixed by
leave-one-section-out on the training sections.

Each sampled patch is described by its pathology latent (the translator's input, reduced to its first
:data:`N_COMPONENTS` principal components) and by its stain (mean and SD of the optical density of each RGB
channel), every coordinate standardised on the reference spots. A section's score is the median, over its
sampled spots, of the mean distance to the :data:`NEIGHBOURS` nearest reference spots. At training, each
training section is scored against the others in the space of the fold model that never saw it; the threshold is
:data:`MARGIN` times the largest of these scores (the margin was fixed before any measurement). A new section is
scored in the full model's space against all training sections."""

from __future__ import annotations

import numpy as np
import torch

#: patches sampled per section
SPOTS = 128
#: reference spots a sampled spot is compared with
NEIGHBOURS = 10
#: principal components of the latent kept
N_COMPONENTS = 8
#: the threshold, in units of the largest leave-one-section-out score of the training sections
MARGIN = 1.5


def sample_rows(libraries: np.ndarray, n: int = SPOTS, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``n`` spot positions per section (sorted), drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    libraries = np.asarray(libraries).astype(str)
    out = {}
    for s in dict.fromkeys(libraries):
        idx = np.flatnonzero(libraries == s)
        out[s] = np.sort(rng.choice(idx, n, replace=False)) if len(idx) > n else idx
    return out


def colour_statistics(patches: torch.Tensor) -> np.ndarray:
    """``(m, 6)``: the mean and SD of each RGB channel's optical density ``-log((x + 1) / 256)`` per patch."""
    od = -torch.log((patches.to(torch.float32) + 1.0) / 256.0).flatten(2)
    return torch.cat([od.mean(2), od.std(2)], dim=1).numpy().astype(np.float64)


@torch.inference_mode()
def latents(module, patches: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """The module's pathology latents of uint8 ``patches`` ``(m, 3, S, S)``, in eval mode."""
    was = module.training
    module.eval()
    try:
        out = [module.latent({"patches": patches[i: i + batch_size].to(module.device)}).float().cpu()
               for i in range(0, len(patches), batch_size)]
    finally:
        module.train(was)
    return torch.cat(out).numpy().astype(np.float64)


def fit_space(latent: np.ndarray, colour: np.ndarray) -> dict:
    """The standardised descriptor space of the reference rows: the latent's centre and principal axes, and
    each coordinate's centre and scale."""
    centre = latent.mean(0)
    _, _, vt = np.linalg.svd(latent - centre, full_matrices=False)
    axes = vt[: min(N_COMPONENTS, len(vt))]
    raw = np.concatenate([(latent - centre) @ axes.T, colour], axis=1)
    return {"centre": centre, "axes": axes, "mean": raw.mean(0), "scale": np.maximum(raw.std(0), 1e-8)}


def project(space: dict, latent: np.ndarray, colour: np.ndarray) -> np.ndarray:
    raw = np.concatenate([(latent - space["centre"]) @ space["axes"].T, colour], axis=1)
    return (raw - space["mean"]) / space["scale"]


def score(query: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> float:
    """The median over ``query`` rows of the mean distance to their ``k`` nearest ``reference`` rows."""
    from scipy.spatial import cKDTree

    k = min(k, len(reference))
    dist, _ = cKDTree(reference).query(query, k=k)
    return float(np.median(np.asarray(dist).reshape(len(query), -1).mean(1)))


def loso_scores(module, patches: dict[str, torch.Tensor], colours: dict[str, np.ndarray],
                held: list[str]) -> dict[str, float]:
    """Each section of ``held`` against the sections not held out, in the space of ``module`` (the fold model
    that never saw ``held``)."""
    lat = {s: latents(module, p) for s, p in patches.items()}
    others = [s for s in patches if s not in held]
    space = fit_space(np.concatenate([lat[s] for s in others]), np.concatenate([colours[s] for s in others]))
    ref = project(space, np.concatenate([lat[s] for s in others]), np.concatenate([colours[s] for s in others]))
    return {s: score(project(space, lat[s], colours[s]), ref) for s in held}


def reference(module, patches: dict[str, torch.Tensor], colours: dict[str, np.ndarray], loso: dict[str, float]) -> dict:
    """What the model keeps to score new sections: the full model's space and reference rows, the training
    sections' leave-one-section-out scores and the threshold."""
    lat = np.concatenate([latents(module, p) for p in patches.values()])
    col = np.concatenate(list(colours.values()))
    space = fit_space(lat, col)
    return {"space": space, "rows": project(space, lat, col).astype(np.float32),
            "loso_scores": {str(s): float(v) for s, v in loso.items()},
            "threshold": float(MARGIN * max(loso.values())), "margin": MARGIN, "spots_per_section": SPOTS}


def section_flags(module, ref: dict, patches_of: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per section (its sampled uint8 patches): ``score``, ``threshold`` and ``unlike_calibration``."""
    out = {}
    for s, patches in patches_of.items():
        value = score(project(ref["space"], latents(module, patches), colour_statistics(patches)), ref["rows"])
        out[str(s)] = {"score": value, "threshold": ref["threshold"], "unlike_calibration": bool(value > ref["threshold"])}
    return out
