"""NoiseFiT: noise-augmented fine-tuning of transformers (Khadangi et al. 2025).

"NoiseFiT: Noise-Augmented Fine-Tuning", arXiv:2504.03302; official code
``akhadangi/NoiseFiT`` (the paper's v1 is ``NoiseFiT_v1_manual_snr.py``).

At the start of fit the callback finds the model's transformer blocks, measures each block's
signal-to-noise ratio on one calibration batch and picks the ``num_layers`` blocks with the
highest (or lowest) SNR. Forward hooks on those blocks then add adaptive Gaussian noise to
their output hidden states, but only during the two extra *noisy* passes of each training
step, which the module runs through :meth:`NoiseFiT.transform_loss`. The loss is
``alpha * CE + (1 - alpha) * soft + lam * consistency``
(:func:`lightning_noise.losses.noisefit.hybrid_loss`). Evaluation and prediction never see
noise.

The module's side is one call in ``training_step`` (``ImageClassifier`` makes it; see
:class:`~lightning_noise.mixins.NoiseFiTMixin`).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_noise._validate import check_choice, check_int, check_number
from lightning_noise.losses.noisefit import adaptive_noise, choose_layers, hybrid_loss, layer_snr

__all__ = ["BLOCK_CONTAINERS", "NoiseFiT", "find_blocks"]

#: Attribute names of the block containers that layer discovery looks for (timm ViT:
#: ``blocks``; Llama-style and our TinyCausalLM: ``layers``; GPT-2: ``h``).
BLOCK_CONTAINERS = ("blocks", "layers", "h")


def find_blocks(
    model: nn.Module, names: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The candidate layers of ``model``: ``names`` if given, else the children of the first
    ``blocks`` / ``layers`` / ``h`` container (``ModuleList`` or ``Sequential``) found.

    Raises:
        ValueError: when a name is not a submodule, or no container is found.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4)
        >>> [name for name, _ in find_blocks(vit)][:2]
        ['blocks.0', 'blocks.1']
    """
    if names is not None:
        found = []
        for name in names:
            try:
                found.append((name, model.get_submodule(name)))
            except AttributeError as err:
                raise ValueError(f"the model has no submodule {name!r} for NoiseFiT") from err
        if not found:
            raise ValueError("layers must name at least one module")
        return found
    for prefix, module in model.named_modules():
        for attribute in BLOCK_CONTAINERS:
            container = getattr(module, attribute, None)
            if isinstance(container, nn.ModuleList | nn.Sequential) and len(container) > 0:
                base = f"{prefix}.{attribute}" if prefix else attribute
                return [(f"{base}.{i}", block) for i, block in enumerate(container)]
    raise ValueError(
        f"NoiseFiT found no transformer blocks: no {BLOCK_CONTAINERS} container of modules in "
        f"{type(model).__name__}; pass the blocks' module names with NoiseFiT(layers=[...])"
    )


def _hidden(output: Any) -> Tensor:
    """The hidden states of a block's output (a tensor, or the first item of a tuple)."""
    hidden = output[0] if isinstance(output, tuple | list) else output
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"NoiseFiT perturbs a layer's output hidden states, but the layer returned "
            f"{type(hidden).__name__}; choose layers that return a tensor or a tuple"
        )
    return hidden


class NoiseFiT(Callback):
    """Noise-augmented fine-tuning (Khadangi et al. 2025): SNR-chosen layers, adaptive noise,
    hybrid loss.

    Args:
        num_layers: How many blocks to perturb (official: 3).
        snr: ``"largest"`` or ``"lowest"``: which end of the SNR ranking to pick (official
            ``--snr_format``, default Largest).
        noise_std: The official ``noise_std`` (0.1). Calibration draws noise with base scale
            ``noise_std * std(h)``; training with ``noise_std ** 2 * std(h)``, as the
            official v1 hook multiplies by ``noise_std`` twice.
        beta: Outlier damping of :func:`~lightning_noise.losses.noisefit.adaptive_noise`
            (official: 0.1).
        alpha: Weight of CE in the hybrid loss (official: 0.5).
        lam: Weight of the consistency term (official v1: 0.1).
        temperature: Of the clean soft targets (official: 1.0).
        detach_clean: Stop gradients through the clean soft targets (official v2; v1 does
            not).
        layers: Module names of the candidate blocks; ``None`` discovers the ``blocks`` /
            ``layers`` / ``h`` container (:func:`find_blocks`).
        calibration_passes: Noisy draws per layer for the SNR (official: 10).
        seed: Seed of the calibration noise and of the training noise (which also depends
            on the global step, the pass and the rank, so a resumed run draws the same noise).

    After fit starts, :attr:`selected` holds the chosen module names and :attr:`snr` the SNR
    of every candidate (``{name: value}``); both are logged (``noisefit/snr/<name>``),
    printed on rank zero and checkpointed, so a resumed run keeps its layers. Under DDP and
    FSDP2 every rank runs the calibration pass (a sharded forward needs every rank) and rank
    zero's choice is broadcast. The loss parts are logged as
    ``noisefit/ce``, ``noisefit/soft`` and ``noisefit/consistency``.
    """

    def __init__(
        self,
        num_layers: int = 3,
        snr: str = "largest",
        noise_std: float = 0.1,
        beta: float = 0.1,
        alpha: float = 0.5,
        lam: float = 0.1,
        temperature: float = 1.0,
        detach_clean: bool = False,
        layers: Sequence[str] | None = None,
        calibration_passes: int = 10,
        seed: int = 0,
    ) -> None:
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.snr_order = check_choice("snr", snr, ("largest", "lowest"))
        self.noise_std = check_number("noise_std", noise_std, low=0.0)
        self.beta = check_number("beta", beta, low=0.0)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.lam = check_number("lam", lam, low=0.0)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.detach_clean = bool(detach_clean)
        self.layer_names = None if layers is None else list(layers)
        self.calibration_passes = check_int("calibration_passes", calibration_passes, minimum=1)
        self.seed = int(seed)
        self.selected: list[str] = []
        self.snr: dict[str, float] = {}
        self._handles: list[RemovableHandle] = []
        self._pass: int | None = None  # index of the noisy pass running, None: no noise
        self._step = 0
        self._rank = 0

    @property
    def state_key(self) -> str:
        return "NoiseFiT"

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "noisefit_loss", None)):
            raise ValueError(
                f"NoiseFiT needs the module to compute its hybrid loss, but "
                f"{type(pl_module).__name__} has no `noisefit_loss`; mix in "
                "lightning_noise.mixins.NoiseFiTMixin and compute the loss of training_step "
                "as `self.noisefit_loss(loss, logits, lambda: self(x))` (ImageClassifier does)"
            )
        candidates = find_blocks(pl_module, self.layer_names)  # fail early, naming the fix
        if self.num_layers > len(candidates):
            raise ValueError(
                f"NoiseFiT(num_layers={self.num_layers}) but the model has only "
                f"{len(candidates)} candidate layers ({[n for n, _ in candidates]})"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank = trainer.global_rank
        if not self.selected:  # a resumed run keeps the checkpointed choice
            choice = None
            # Under FSDP2 a forward is collective (it all-gathers the shards), so with several
            # ranks every rank runs the clean pass; rank zero's choice is the one kept.
            if trainer.is_global_zero or trainer.world_size > 1:
                choice = self._calibrate(trainer, pl_module)
            if trainer.world_size > 1:
                choice = trainer.strategy.broadcast(choice, src=0)
            self.selected, self.snr = choice
            chosen = ", ".join(f"{n} (SNR {self.snr[n]:.3f})" for n in self.selected)
            rank_zero_info(f"NoiseFiT: perturbing {chosen}")
            metrics = {f"noisefit/snr/{name}": value for name, value in self.snr.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._register(pl_module)

    def _calibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[list[str], dict[str, float]]:
        """One clean pass on the first training batch (eval mode, no grad), then the SNR."""
        candidates = find_blocks(pl_module, self.layer_names)
        batch = next(iter(trainer.train_dataloader))
        batch = trainer.strategy.batch_to_device(batch)
        inputs = pl_module.noisefit_inputs(batch)  # type: ignore[attr-defined]
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[name] = _hidden(output).detach()

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in candidates]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                pl_module(inputs)
        finally:
            pl_module.train(was_training)
            for handle in handles:
                handle.remove()
        names = [n for n, _ in candidates]
        generator = torch.Generator(device=captured[names[0]].device).manual_seed(self.seed)
        values = layer_snr(
            [captured[n] for n in names],
            noise_std=self.noise_std,
            passes=self.calibration_passes,
            beta=self.beta,
            generator=generator,
        )
        chosen = choose_layers(values, self.num_layers, largest=self.snr_order == "largest")
        return [names[i] for i in chosen], dict(zip(names, values.tolist(), strict=True))

    def _register(self, pl_module: pl.LightningModule) -> None:
        self._remove()
        modules = dict(find_blocks(pl_module, self.layer_names))
        for position, name in enumerate(self.selected):
            if name not in modules:
                raise ValueError(f"NoiseFiT's checkpointed layer {name!r} is not in the model")
            hook = self._noise_hook(position)
            self._handles.append(modules[name].register_forward_hook(hook))

    def _noise_hook(self, position: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._pass is None:
                return output
            hidden = _hidden(output)
            key = f"{self.seed}/{self._step}/{self._pass}/{position}/{self._rank}"
            generator = torch.Generator(device=hidden.device).manual_seed(zlib.crc32(key.encode()))
            base_std = self.noise_std * hidden.detach().std() * self.noise_std
            noisy = adaptive_noise(hidden, base_std, beta=self.beta, generator=generator)
            if isinstance(output, tuple | list):
                return (noisy, *output[1:])
            return noisy

        # Under torch.compile the hook runs eagerly between the compiled pieces: traced, its
        # per-step seed (a Python int and a new Generator) made Dynamo guard on the step and
        # recompile every step (13 graphs in 4 steps of a 2-block model); not traced, the
        # graphs stay the same from step to step.
        return torch.compiler.disable(hook, recursive=True)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: Any) -> None:
        self._remove()

    # ------------------------------------------------------------------ the loss
    @contextlib.contextmanager
    def noisy(self, index: int) -> Iterator[None]:
        """Run forward passes with noise on the selected layers (pass ``index``)."""
        self._pass = index
        try:
            yield
        finally:
            self._pass = None

    def transform_loss(
        self,
        pl_module: pl.LightningModule,
        loss: Tensor,
        logits: Tensor,
        forward: Callable[[], Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        """``alpha * loss + (1 - alpha) * soft + lam * consistency`` with two noisy passes
        (the :class:`~lightning_noise.types.LossTransform` the module applies).

        Under SAM the second pass calls this again at the perturbed weights: the noise is
        seeded by the global step and the pass, so it draws the same noise as the first pass
        and SAM differentiates the same hybrid objective at ``w + e`` (its definition:
        ``grad L(w + e)`` of the one loss ``L``); its logs are dropped."""
        if not pl_module.training or not self._handles:
            return loss
        self._step = pl_module.global_step
        with self.noisy(0):
            noisy1 = forward()
        with self.noisy(1):
            noisy2 = forward()
        total, parts = hybrid_loss(
            loss,
            logits,
            noisy1,
            noisy2,
            mask=mask,
            alpha=self.alpha,
            lam=self.lam,
            temperature=self.temperature,
            detach_clean=self.detach_clean,
        )
        for key, value in parts.items():
            pl_module.log(f"noisefit/{key}", value, on_step=False, on_epoch=True, sync_dist=True)
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"selected": list(self.selected), "snr": dict(self.snr)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.selected = list(state_dict["selected"])
        self.snr = dict(state_dict["snr"])
