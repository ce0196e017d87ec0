"""The SST-2 benchmarks' data: a seeded sample of SST-2 train, all of SST-2 dev, and a seeded
sample of IMDB (out of domain). Shared so that every benchmark compares on the same examples."""
from __future__ import annotations

import torch

from lmadapt.tasks import get_task


def sst2_split(n_train: int, n_ood: int, seed: int = 0):
    """-> (train, dev, ood) example lists."""
    g = torch.Generator().manual_seed(seed)
    full = get_task("sst2").load("train")
    train = [full[i] for i in torch.randperm(len(full), generator=g)[:n_train].tolist()]
    dev = get_task("sst2").load("dev")
    ood_all = get_task("imdb").load("dev")
    ood = [ood_all[i] for i in torch.randperm(len(ood_all), generator=g)[:n_ood].tolist()]
    return train, dev, ood
