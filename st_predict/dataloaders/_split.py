"""Training / validation split of the spots: by section, or (one section only) by random spots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from st_predict._utils import InputError


def split_validation(
    libraries: Sequence[str],
    validation: str | Sequence[str] | None = None,
    train_size: float = 1.0,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """Indices of the training and validation spots, and a description of the split.

    Parameters
    ----------
    libraries
        Section (library) of every spot.
    validation
        ``None``: no validation set (unless ``train_size < 1``). ``"section"``: hold out the last
        section (in order of first appearance) of the training data. A section name or a list of
        them: hold those out. ``"random"``: a random ``1 - train_size`` of the spots (allowed only with
        one section: spots of one section sit next to the training spots, so this validation is
        optimistic, and the description says ``leaky``).
    train_size
        Fraction of the spots to train on with ``validation="random"``; ``train_size < 1`` with
        ``validation=None`` means ``"random"``.
    seed
        Seed of the random split.

    Returns
    -------
    ``(train_idx, val_idx, description)``; ``description`` is ``None`` without validation, else a dict
    with ``kind`` (``"section"``/``"random"``), ``sections`` (held out), ``n_spots`` and ``leaky``.
    """
    libraries = np.asarray(libraries).astype(str)
    n = len(libraries)
    sections = list(dict.fromkeys(libraries.tolist()))
    if not 0 < train_size <= 1:
        raise InputError(f"train_size must be in (0, 1], got {train_size}.")
    if validation is None and train_size < 1:
        validation = "random"
    if validation is None:
        return np.arange(n), np.array([], dtype=np.int64), None
    if isinstance(validation, str) and validation == "random":
        if len(sections) > 1:
            raise InputError(
                f"Random-spot validation would put validation spots right next to training spots of the same "
                f"sections, a leaky basis for choosing epochs or settings; with {len(sections)} sections use "
                "validation='section' (or name the sections to hold out)."
            )
        frac = train_size if train_size < 1 else 0.9
        perm = np.random.default_rng(seed).permutation(n)
        n_train = int(round(frac * n))
        if not 0 < n_train < n:
            raise InputError(f"train_size={frac} leaves no training or no validation spots of {n}.")
        desc = {"kind": "random", "sections": [], "n_spots": n - n_train, "leaky": True}
        return np.sort(perm[:n_train]), np.sort(perm[n_train:]), desc
    if isinstance(validation, str) and validation == "section":
        if len(sections) < 2:
            raise InputError(
                f"validation='section' needs at least two sections, the data has one ({sections[0]!r}); "
                "use validation='random' (leaky: validation spots sit next to training spots) or no validation."
            )
        held = [sections[-1]]
    else:
        held = [validation] if isinstance(validation, str) else [str(v) for v in validation]
        unknown = [s for s in held if s not in sections]
        if unknown:
            raise InputError(f"Validation sections {unknown} are not in the training data (sections: {sections}).")
        if len(set(held)) == len(sections):
            raise InputError(f"Holding out {held} for validation leaves no section to train on.")
    val = np.isin(libraries, held)
    desc = {"kind": "section", "sections": held, "n_spots": int(val.sum()), "leaky": False}
    return np.flatnonzero(~val), np.flatnonzero(val), desc
