"""The fused kernels inside a language model's own loss: found by structure, installed by hooks.

Two swaps, both trainer-free (``KernelSwap`` and ``CausalLMModule`` are the adapters):

* :class:`RoutedLoss` wraps a loss *function* held as an attribute (a Hugging Face model's
  ``loss_function``, or any module's): while it runs, every ``F.cross_entropy`` call it makes
  on ``[N, C]`` logits goes to :func:`lightning_noise.kernels.cross_entropy` (a
  ``TorchFunctionMode``, the way :class:`~lightning_noise.mixins.CapturedCrossEntropy` reads
  the same call). Calls the kernel does not compute the same way (class weights, the legacy
  ``size_average``/``reduce``, classes not last, float64) run PyTorch's function unchanged and
  are counted in :attr:`RoutedLoss.fallbacks`.
* :class:`FusedLMHead` joins the output embedding (``get_output_embeddings()`` or ``lm_head``,
  an ``nn.Linear``) and the causal-LM loss into
  :func:`lightning_noise.kernels.linear_cross_entropy` (the idea of Cut Cross-Entropy,
  Wijmans et al. 2025): the ``[B, T, V]`` logits never exist. A forward pre-hook on the head
  keeps its input (the last hidden states) and hands the head an empty sequence, so the head
  computes ``[B, 0, V]`` logits; the model's loss function, replaced by
  :meth:`FusedLMHead.loss`, computes the loss from the kept hidden states and the head's
  weight. Like Liger Kernel's patched forwards it is on only while the model trains and is
  given ``labels``; otherwise the model runs as before. Unlike them it needs no list of
  architectures: it checks on a random probe that the fused loss equals the model's own (a
  model that changes its logits between head and loss, such as Gemma 2's soft-capping, fails
  the probe and is refused, naming the difference).

Transformers 5's ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``), which
:meth:`FusedLMHead.loss` reproduces: the labels are shifted left by one (or ``shift_labels``
is used as given), ``ignore_index`` (-100) positions count for nothing, and the sum is divided
by ``num_items_in_batch`` when given (gradient accumulation), else the mean over the counted
tokens. ``logits_to_keep`` slices the hidden states before the head, so the kept hidden states
are the ones the loss would have seen.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_noise import kernels
from lightning_noise._ce_call import cross_entropy_call, is_class_index_call

__all__ = [
    "FusedLMHead",
    "RoutedLoss",
    "causal_lm_loss_from_hidden",
    "find_lm_head",
    "has_loss_function",
    "is_causal_lm_loss",
]


def has_loss_function(module: nn.Module) -> bool:
    """Whether ``module`` itself defines a ``loss_function`` (its class or the instance).

    A wrapper that only forwards the attribute (peft's ``PeftModel.__getattr__``) does not
    count: the loss is computed, and swapped, on the model that defines it.
    """
    if "loss_function" in vars(module):
        return True
    return any("loss_function" in vars(cls) for cls in type(module).__mro__)


def is_causal_lm_loss(fn: Any) -> bool:
    """Whether ``fn`` is transformers' ``ForCausalLMLoss`` (or already our fused/routed one)."""
    fn = fn.original if isinstance(fn, RoutedLoss) else fn
    return getattr(fn, "__name__", "") == "ForCausalLMLoss" and getattr(
        fn, "__module__", ""
    ).startswith("transformers.")


def find_lm_head(model: nn.Module) -> nn.Module | None:
    """The output embedding of ``model``: ``get_output_embeddings()``, else ``lm_head``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Module) else None


class _RouteCrossEntropy(TorchFunctionMode):
    def __init__(self, owner: RoutedLoss) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is not F.cross_entropy:
            return func(*args, **kwargs)
        call = cross_entropy_call(args, kwargs)
        logits, target = call["input"], call["target"]
        fits = (
            is_class_index_call(call)
            and call.get("weight") is None
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and call.get("reduction", "mean") in ("mean", "sum", "none")
        )
        if not fits:
            self.owner.fallbacks += 1
            return func(*args, **kwargs)
        self.owner.routed += 1
        return kernels.cross_entropy(
            logits,
            target,
            ignore_index=int(call.get("ignore_index", -100)),
            label_smoothing=float(call.get("label_smoothing", 0.0)),
            reduction=call.get("reduction", "mean"),
            impl=self.owner.impl,
        )


class RoutedLoss:
    """A loss function whose ``F.cross_entropy`` calls run the fused kernel.

    Args:
        original: The loss function (any callable).
        impl: The kernels' ``impl`` (``"auto"``, ``"triton"``, ``"torch"``).

    :attr:`routed` counts the calls that ran the kernel, :attr:`fallbacks` those left to
    PyTorch. One difference from PyTorch: a mean over targets that are all ignored is 0 here
    (PyTorch gives NaN).

    Example:
        >>> def loss_fn(logits, labels):
        ...     return F.cross_entropy(logits, labels, label_smoothing=0.1)
        >>> routed = RoutedLoss(loss_fn, impl="torch")
        >>> x, y = torch.randn(5, 7), torch.tensor([0, 1, 2, 3, -100])
        >>> bool(torch.isclose(routed(x, y), loss_fn(x, y))), routed.routed
        (True, 1)
    """

    def __init__(self, original: Callable[..., Any], impl: str = "auto") -> None:
        if isinstance(original, RoutedLoss):
            original = original.original
        if not callable(original):
            raise TypeError(f"RoutedLoss wraps a callable, got {type(original).__name__}")
        self.original = original
        self.impl = kernels.check_impl(impl)
        self.routed = 0
        self.fallbacks = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _RouteCrossEntropy(self):
            return self.original(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.original, "__name__", type(self.original).__name__)
        return f"RoutedLoss({name}, impl={self.impl!r})"


def causal_lm_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    *,
    bias: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    impl: str = "auto",
    **options: Any,
) -> Tensor:
    """Transformers' ``ForCausalLMLoss`` of ``hidden @ weight.T + bias`` without the logits.

    ``hidden`` is ``[B, T, H]`` (the head's input), ``labels`` ``[B, T]`` unshifted (the
    model's input ids with -100 where nothing is predicted); ``shift_labels`` replaces the
    shift. ``options`` go to :func:`~lightning_noise.kernels.linear_cross_entropy`
    (``label_smoothing``, ``maxsup_alpha``, ``z_loss``, ``chunk_size``).

    Example:
        >>> h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> y = torch.randint(0, 11, (2, 5))
        >>> ref = F.cross_entropy((h @ w.T)[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1))
        >>> bool(torch.isclose(causal_lm_loss_from_hidden(h, w, y, impl="torch"), ref))
        True
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss_from_hidden needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = kernels.linear_cross_entropy(
        hidden,
        weight,
        shift_labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl,
        **options,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _labels_given(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("labels") is not None:
        return True
    if signature is None or not args:
        return False
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return False
    return bound.arguments.get("labels") is not None


class FusedLMHead:
    """The output embedding and the causal-LM loss of ``model`` fused (see the module docstring).

    Args:
        model: A causal LM whose loss is transformers' ``ForCausalLMLoss`` (``model.loss_function``)
            and whose output embedding is an ``nn.Linear``, or, with ``loss=False``, any module
            with such a head (:meth:`capture` then gives the head's input to the caller).
        impl: The kernels' ``impl``.
        loss: Replace ``model.loss_function`` and arm the fusion when the training model is
            given ``labels`` (the Hugging Face path).
        verify: Before installing, compare the fused loss with the model's own on a random
            probe (``loss=True`` only); a mismatch raises ``ValueError``.

    Raises:
        ValueError: when the model has no such head or loss, naming what was found.

    :meth:`remove` undoes everything.
    """

    def __init__(
        self, model: nn.Module, impl: str = "auto", *, loss: bool = True, verify: bool = True
    ) -> None:
        self.impl = kernels.check_impl(impl)
        head = find_lm_head(model)
        if head is None:
            raise ValueError(
                f"{type(model).__name__} has no output embedding (get_output_embeddings() or "
                "lm_head) for the fused head + loss"
            )
        if type(head) is not nn.Linear:
            raise ValueError(
                f"the output embedding of {type(model).__name__} is a {type(head).__name__}, not "
                "an nn.Linear: the fused head computes hidden @ weight.T + bias and nothing else "
                "(a LoRA on lm_head, for one, adds its own product)"
            )
        if loss and not (has_loss_function(model) and is_causal_lm_loss(model.loss_function)):
            found = getattr(model, "loss_function", None)
            raise ValueError(
                f"{type(model).__name__}.loss_function is {found!r}, not transformers' "
                "ForCausalLMLoss: the fused head reproduces that loss only"
            )
        self.model = model
        self.head = head
        self._hidden: Tensor | None = None
        self._armed = False
        self._handles: list[RemovableHandle] = [head.register_forward_pre_hook(self._pre_head)]
        self._original_loss: Any = None
        if loss:
            if verify:
                self._verify()
            self._original_loss = model.loss_function
            try:
                signature: inspect.Signature | None = inspect.signature(model.forward)
            except (TypeError, ValueError):
                signature = None
            self._signature = signature
            self._handles.append(model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post_model, always_call=True))
            model.loss_function = self.loss

    # ---------------------------------------------------------------- hooks
    def _pre_head(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self._armed:
            return None
        hidden = args[0]
        self._hidden = hidden
        # The head sees no positions: [..., 0, H] in, [..., 0, V] logits out (nothing computed).
        return (hidden.narrow(-2, 0, 0), *args[1:])

    def _pre_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._hidden = None
        self._armed = module.training and _labels_given(self._signature, args, kwargs)

    def _post_model(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        armed, left = self._armed, self._hidden
        self._armed, self._hidden = False, None
        if armed and left is not None:
            raise RuntimeError(
                f"{type(module).__name__} ran its head with the fused loss armed but never called "
                "its loss_function: the fused head + loss needs the model's own "
                "ForCausalLMLoss call (KernelSwap(fused_head=False) leaves the head alone)"
            )

    # ---------------------------------------------------------------- the loss
    def loss(
        self,
        logits: Tensor,
        labels: Tensor | None = None,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The model's ``loss_function``: fused when armed, else the routed original."""
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            return RoutedLoss(self._original_loss, self.impl)(
                logits=logits,
                labels=labels,
                vocab_size=vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        return causal_lm_loss_from_hidden(
            hidden,
            self.head.weight,
            labels,
            bias=self.head.bias,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            impl=self.impl,
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Within the block the head returns empty logits and its input is kept: after a
        forward, ``captured["hidden"]`` holds the hidden states the head would have read."""
        captured: dict[str, Tensor] = {}
        self._armed, self._hidden = True, None
        try:
            yield captured
        finally:
            if self._hidden is not None:
                captured["hidden"] = self._hidden
            self._armed, self._hidden = False, None

    def _verify(self) -> None:
        """The model's logits are its head's output, unchanged (a random probe, eval mode, no
        gradient): what the loss reads is ``hidden @ weight.T + bias``."""
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", None) or self.head.weight.shape[0]
        device = self.head.weight.device
        if device.type == "meta":
            return  # nothing to run yet: the weights are not materialised
        ids = torch.randint(0, int(vocab), (2, 8), generator=torch.Generator().manual_seed(0))
        kept: list[Tensor] = []
        handle = self.head.register_forward_hook(lambda m, a, o: kept.append(o))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device)).logits
        finally:
            self.model.train(was_training)
            handle.remove()
        head_out = kept[-1] if kept else None
        tol = 1e-5 if self.head.weight.dtype == torch.float32 else 1e-2
        if head_out is None or head_out.shape != logits.shape:
            raise ValueError(
                f"{type(self.model).__name__}'s logits are not its head's output (the head "
                "did not run on every position); use KernelSwap(fused_head=False)"
            )
        if not torch.allclose(logits.float(), head_out.float(), rtol=tol, atol=tol * 1e-2):
            diff = (logits.float() - head_out.float()).abs().max().item()
            raise ValueError(
                f"{type(self.model).__name__} changes its logits between the head and the loss "
                f"(soft-capping, scaling: up to {diff:.3g} apart on a random probe), which the "
                "fused head + loss would skip; use KernelSwap(fused_head=False), which keeps the "
                "model's logits"
            )

    def remove(self) -> None:
        """Remove the hooks and give the model its loss function back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original_loss is not None:
            self.model.loss_function = self._original_loss
            self._original_loss = None
