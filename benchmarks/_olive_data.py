"""Olive ``user_script`` for benchmarks/optimize_olive.py: Fashion-MNIST batches that edgeslim wrote as .npy files.

Olive imports this file by path and finds the components by their registered names (``data_configs`` in the run
config). Each dataset yields ``(input, label)`` pairs of the normalised 1x28x28 images edgeslim feeds its own
search; ``fmnist_argmax`` turns the logits into class ids for Olive's accuracy metric.
"""

from pathlib import Path

import numpy as np
import torch
from olive.data.registry import Registry


class _NpyPairs(torch.utils.data.Dataset):
    def __init__(self, data_dir: str, split: str) -> None:
        d = Path(data_dir)
        self.x = np.load(d / f"{split}_x.npy")  # N x 1 x 28 x 28 float32, normalised as edgeslim does
        self.y = np.load(d / f"{split}_y.npy")  # N int64

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"input": torch.from_numpy(self.x[i])}, int(self.y[i])


@Registry.register_dataset()
def fmnist_npy(data_dir: str, split: str, **kwargs):
    return _NpyPairs(data_dir, split)


@Registry.register_post_process()
def fmnist_argmax(output, **kwargs):
    return output.argmax(dim=-1)
