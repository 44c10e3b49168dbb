"""Fused softmax and cross-entropy kernels in Triton, with a PyTorch path.

* :func:`softmax`: the online-normaliser softmax (Milakov and Gimelshein 2018), any
  dimension, float32/bfloat16/float16.
* :func:`cross_entropy`: cross-entropy with label smoothing, MaxSup and z-loss fused; one read
  of the logits forward, only the logits' gradient backward.
* :func:`linear_cross_entropy`: the classifier head and that loss, chunked so that the
  ``N x V`` logits are never stored (the idea of Cut Cross-Entropy, Wijmans et al. 2025).

Each takes ``impl="auto" | "triton" | "torch"``: ``"auto"`` runs Triton on CUDA tensors (and
on the CPU when ``TRITON_INTERPRET=1`` asks for Triton's interpreter), PyTorch otherwise.
:data:`LAUNCHES` counts the Triton launches per kernel. :class:`FusedSoftmax` and
:class:`FusedCrossEntropyLoss` are drop-in modules (what the ``KernelSwap`` callback swaps in).
Each kernel is a custom operator of the ``lightning_noise`` namespace
(``torch.ops.lightning_noise.cross_entropy_forward``, ``..._backward``, ``softmax_*``,
``linear_cross_entropy_*``) with a fake (meta) kernel and a registered backward, so a
``torch.compile`` graph calls it as one node, without a graph break, on either path.
Every backward is differentiable once: a second derivative (``create_graph=True`` then a
second ``grad``) raises :class:`DoubleBackwardError`; use plain PyTorch ops for those.
"""

from lightning_noise.kernels._autograd import DoubleBackwardError
from lightning_noise.kernels._dispatch import (
    IMPLS,
    LAUNCHES,
    check_impl,
    interpreting,
    resolve_impl,
    triton_available,
)
from lightning_noise.kernels.cross_entropy import cross_entropy
from lightning_noise.kernels.linear_cross_entropy import linear_cross_entropy
from lightning_noise.kernels.modules import FusedCrossEntropyLoss, FusedSoftmax
from lightning_noise.kernels.softmax import softmax

__all__ = [
    "IMPLS",
    "LAUNCHES",
    "DoubleBackwardError",
    "FusedCrossEntropyLoss",
    "FusedSoftmax",
    "check_impl",
    "cross_entropy",
    "interpreting",
    "linear_cross_entropy",
    "resolve_impl",
    "softmax",
    "triton_available",
]
