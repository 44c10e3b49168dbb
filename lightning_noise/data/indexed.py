"""``Indexed``: the one step that makes a user's own dataset work with the per-sample methods.

The per-sample methods (sample selection, Co-teaching, ELR, Late Stopping, the label audit,
:class:`~lightning_noise.dynamics.TrainingDynamics`) key what they learn about a sample on its
index in the training set (DESIGN.md protocol 1: training batches are
``(input, target, index)``). ``Indexed(dataset)`` adds that index to any map-style
``(input, target)`` dataset and changes nothing else; the DataModules of this package already
serve such batches (their training split is a
:class:`~lightning_noise.data.noise.NoisyLabels`).
"""

from __future__ import annotations

import operator
from typing import Any

from torch.utils.data import Dataset, IterableDataset

__all__ = ["Indexed"]

# Attributes of the inner dataset that reports and metrics read (clean labels of a
# synthetic-noise dataset, DESIGN.md protocol 1); served by the wrapper when the inner has them.
_PASSED_THROUGH = ("targets", "clean_targets", "noisy_targets", "noise_mask")

_FIX = (
    "Indexed needs a map-style dataset whose items are (input, target) pairs; "
    "give it a Dataset whose __getitem__(i) returns (x, y)"
)


class Indexed(Dataset):
    """Adds the sample index to any map-style ``(input, target)`` dataset.

    ``Indexed(dataset)[i] == (*dataset[i], i)``: item ``i`` is ``(input, target, i)``. Wrap the
    **full** training set (not a ``Subset`` of it) so that the index is the sample's position
    in the training set, stable across epochs and ranks (DESIGN.md protocol 1): a
    ``DataLoader`` over it, shuffled or distributed, yields batches ``(x, y, index)`` that
    the per-sample methods read. ``targets``, ``clean_targets``, ``noisy_targets`` and
    ``noise_mask`` of the inner dataset are served as they are, when it has them.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) whose items are
            ``(input, target)`` tuples or lists.

    Raises:
        TypeError: for an iterable-style dataset or one without ``__len__`` /
            ``__getitem__`` (here), or at the first access to an item that is not an
            ``(input, target)`` pair (e.g. a dict, or a triple that already has an index).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> train = Indexed(data)
        >>> x, y, i = train[4]
        >>> int(y), i
        (1, 4)
        >>> [b[2].tolist() for b in DataLoader(train, batch_size=4)]
        [[0, 1, 2, 3], [4, 5]]
    """

    def __init__(self, dataset: Dataset) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"Indexed needs a map-style dataset, got the iterable-style "
                f"{type(dataset).__name__}: its samples have no stable position to serve as "
                "the index; load it into a map-style Dataset (e.g. a TensorDataset or a list of "
                "(x, y) pairs), then wrap that"
            )
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"Indexed needs a map-style dataset with __len__ and __getitem__, got "
                f"{type(dataset).__name__}; {_FIX}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        n = len(self)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for Indexed of length {n}")
        i %= n  # a negative index is served with its non-negative position
        item = self.dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            what = f"a {len(item)}-tuple" if isinstance(item, tuple | list) else type(item).__name__
            if isinstance(item, dict):
                what += f" with keys {sorted(map(str, item))}"
            raise TypeError(f"dataset item {i} is {what}, not an (input, target) pair; {_FIX}")
        return item[0], item[1], i

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails. Read the inner dataset from __dict__: during
        # unpickling (DataLoader workers) it may not be set yet.
        inner = self.__dict__.get("dataset")
        if name in _PASSED_THROUGH and inner is not None and hasattr(inner, name):
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"
