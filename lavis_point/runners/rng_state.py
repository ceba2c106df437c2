"""A process's random state (torch, numpy, Python, CUDA) as plain data (tensors, ints, floats), so a
checkpoint carries it and still loads with ``weights_only=True``; and back.

Why a resumed run needs it: the data order (the sampler's seed, drawn from torch's generator when
an epoch's iterator starts), DataLoader worker seeds, the caption each item draws (numpy), the
augmentation (numpy) and the matching loss's negatives (torch) all come from these streams. Restored,
the first step after a resume sees the batch, augmentation and negatives the uninterrupted run saw.
"""
import random

import numpy as np
import torch
import torch.distributed as dist

from lavis_point.models.losses import world


def capture() -> dict:
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["keys"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def capture_all_ranks() -> list:
    """[state of rank 0, rank 1, ...]; every rank must call it (a collective under torchrun)."""
    _, size = world()
    if size == 1:
        return [capture()]
    states = [None] * size
    dist.all_gather_object(states, capture())
    return states
