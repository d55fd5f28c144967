"""scikit-learn's digits: 1,797 real 8x8 handwritten digits, 10 classes, shipped offline with the package."""

from __future__ import annotations

import torch

SPLITS = ('train', 'test', 'all')


def load_digits(split: str = 'train', test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 8, 8] in [-1, 1], labels [N]) for a deterministic, class-stratified split."""
    if split not in SPLITS:
        raise ValueError(f'digits split must be one of {SPLITS}, got {split!r}')
    from sklearn import datasets

    data = datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    if split == 'all':
        return images, labels
    # Every k-th image of each class is held out: the same split on every machine.
    k = round(1 / test_fraction)
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    test = rank % k == k - 1
    keep = test if split == 'test' else ~test
    return images[keep], labels[keep]
