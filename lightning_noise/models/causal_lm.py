"""``CausalLMModule``: answer-only fine-tuning of a Hugging Face causal LM, with the methods.

Wraps any ``AutoModelForCausalLM``, read from a local folder (``pretrained``, nothing is
downloaded) or built with random weights from a config (``config``), optionally with LoRA
adapters (peft). Batches are the dicts of
:class:`~lightning_noise.data.PromptResponseDataModule`: ``input_ids``, ``attention_mask``,
``labels`` (unshifted, -100 on the prompt and the padding) and ``index``.

How each method sees a language model (the level it acts at):

* **Loss, label smoothing, MaxSup: token level.** Every answer token is one classification over
  the vocabulary; ``criterion`` (a :class:`~lightning_noise.losses.LabelSmoothingCrossEntropy`
  or :class:`~lightning_noise.losses.MaxSupLoss` with ``reduction="none"``) gives one loss per
  token; the prompt and the padding count for nothing.
* **Sample selection and weighting: sequence level.** A sample is one prompt/response pair; its
  loss is the mean of its answer tokens' losses. The step's loss is the mean over pairs of
  these (each pair weighs the same, whatever its length; Hugging Face's own loss is the mean
  over all answer tokens), reduced through
  :class:`~lightning_noise.mixins.PerSampleLossMixin`, so small-loss selection, Adaptive-k
  and other sample policies keep or weight whole pairs. The ``SampleBatch`` they see (and
  ``training_step`` returns) holds, for each pair, that loss and the logits and label of its
  *first answer token* (``correct`` and ``margin`` are of that token).
* **Training dynamics, Late Stopping, LabelAudit: sequence level**, on that same view:
  ``TrainingDynamics`` records per pair the mean answer-token loss and whether the first
  answer token is predicted (its margin, for AUM); ``LateStopping``'s first-time k-epoch
  learning is that token's, and it shrinks the set of pairs through
  :meth:`PromptResponseDataModule.set_train_indices`; ``LabelAudit``'s predicted and given
  labels are that token's ids (:meth:`sample_logits`, the
  :class:`~lightning_noise.types.DictSampleModule` protocol).
* **NoiseFiT: token level, on the transformer blocks.** The blocks are found by structure
  (the ``layers`` / ``h`` / ``blocks`` container, also inside a peft wrapper); the hybrid
  loss's KL terms are averaged over the answer tokens.
* **KernelSwap(fused_head=True): token level.** :meth:`enable_fused_head` computes the token
  losses from the last hidden states and the output embedding with
  :func:`~lightning_noise.kernels.linear_cross_entropy` (label smoothing and MaxSup included),
  so the ``[B, T, V]`` logits never exist in training. NoiseFiT needs those logits and is
  refused with it.

Engines: under Lightning's ``ModelParallelStrategy`` (FSDP2, data parallel)
:meth:`configure_model` shards each transformer block and then the whole model with
``fully_shard``; ``compile=True`` (or a dict of ``torch.compile`` arguments) compiles the model
in place after that. DDP needs nothing. Tested on two CPU processes: FSDP2 ends with the
weights of DDP (NoiseFiT + small-loss selection, the fused head + SAM, LoRA), and the compiled
model with those of eager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_noise import kernels
from lightning_noise._compat import attached_trainer
from lightning_noise.callbacks.noisefit import find_blocks
from lightning_noise.functional.lm_head import FusedLMHead, find_lm_head
from lightning_noise.losses import LabelSmoothingCrossEntropy, MaxSupLoss
from lightning_noise.mixins.noisefit import NoiseFiTMixin
from lightning_noise.mixins.per_sample import PerSampleLossMixin
from lightning_noise.types import LossTransform, SampleBatch, find_callbacks

__all__ = ["CausalLMModule", "build_causal_lm"]

OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "CausalLMModule needs transformers (and peft for LoRA): "
            "pip install 'lightning-noise[hf]'"
        ) from err
    return transformers


def build_causal_lm(pretrained: str | None = None, config: Mapping[str, Any] | None = None) -> Any:
    """An ``AutoModelForCausalLM`` from a local folder, or with random weights from a config.

    ``config`` is the keyword arguments of ``AutoConfig.for_model`` (``model_type`` and the
    sizes, e.g. ``{"model_type": "llama", "hidden_size": 32, ...}``). The weights are loaded
    in float32 (mixed precision is the Trainer's ``precision``).

    Raises:
        ValueError: unless exactly one of ``pretrained`` and ``config`` is given.
        FileNotFoundError: when ``pretrained`` is not a folder with a ``config.json``.
    """
    if (pretrained is None) == (config is None):
        raise ValueError(
            "give exactly one of pretrained (a local folder written by save_pretrained; on the "
            "command line --model.init_args.pretrained=PATH) and config (AutoConfig.for_model "
            "keyword arguments)"
        )
    transformers = _transformers()
    if pretrained is not None:
        folder = Path(pretrained).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"pretrained={str(folder)!r} is not a saved model folder (no config.json); give "
                "the folder that the model's save_pretrained wrote (nothing is downloaded)"
            )
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32
        )
    kwargs = dict(config or {})
    if "model_type" not in kwargs:
        raise ValueError(f"config needs a model_type (e.g. 'llama'), got keys {sorted(kwargs)}")
    built = transformers.AutoConfig.for_model(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(built, dtype=torch.float32)


def _first_answer(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Row numbers and the position of each row's first answer token (``valid``: ``[B, T]``)."""
    rows = torch.arange(valid.shape[0], device=valid.device)
    return rows, valid.int().argmax(dim=1)


class CausalLMModule(NoiseFiTMixin, PerSampleLossMixin, pl.LightningModule):
    """Answer-only fine-tuning of a Hugging Face causal LM (see the module docstring).

    Args:
        pretrained: A local folder that ``save_pretrained`` wrote.
        config: Or ``AutoConfig.for_model`` keyword arguments for a randomly initialised model.
        num_classes: The tokenizer's size (LightningCLI links it from the DataModule); it
            must not exceed the model's vocabulary.
        criterion: Token loss with ``reduction="none"`` and ``ignore_index=-100``: a
            :class:`~lightning_noise.losses.LabelSmoothingCrossEntropy` (default, smoothing 0:
            plain cross-entropy) or :class:`~lightning_noise.losses.MaxSupLoss`, or any loss
            of ``[N, V]`` logits and ``[N]`` targets returning ``[N]`` (not fusable).
        lora_r: LoRA rank; ``None`` fine-tunes every weight.
        lora_alpha, lora_dropout: LoRA's scale numerator and dropout.
        lora_target_modules: Module names LoRA adapts; ``None``: peft's default for the
            architecture (the attention projections).
        optimizer: A callable from parameters to an optimizer; default AdamW(lr=1e-4). Only
            the trainable parameters are given (the adapters under LoRA).
        in_chans: Must stay ``None`` (the CLI links image DataModules' channels).
        compile: Compile the Hugging Face model with ``torch.compile`` in
            :meth:`configure_model` (in place, ``nn.Module.compile``: the state dict's keys do
            not change), after sharding and after the callbacks' setup (so KernelSwap's fused
            head is inside the compiled model). ``True``: the default backend (inductor); a
            dict: ``torch.compile``'s keyword arguments, e.g. ``{"backend": "aot_eager"}``.

    Example:
        >>> cfg = dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
        ...            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
        >>> lm = CausalLMModule(config=cfg)
        >>> lm(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 50])
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int | None = None,
        criterion: nn.Module | None = None,
        lora_r: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        in_chans: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if in_chans is not None:
            raise ValueError("CausalLMModule reads token ids: in_chans does not apply")
        self.save_hyperparameters(ignore=["criterion", "optimizer"])
        self.criterion = (
            criterion
            if criterion is not None
            else LabelSmoothingCrossEntropy(0.0, reduction="none")
        )
        if getattr(self.criterion, "reduction", "none") != "none":
            raise ValueError(
                f"criterion must give one loss per token (reduction='none'), got reduction="
                f"{self.criterion.reduction!r}; e.g. LabelSmoothingCrossEntropy(0.1, "
                "reduction='none')"
            )
        if getattr(self.criterion, "ignore_index", -100) != -100:
            raise ValueError("criterion.ignore_index must be -100, the label of prompt tokens")
        model = build_causal_lm(pretrained, config)
        vocab = model.get_input_embeddings().num_embeddings
        if num_classes is not None and num_classes > vocab:
            raise ValueError(
                f"the tokenizer has {num_classes} tokens but the model's embedding only {vocab} "
                "rows; use the model's own tokenizer (or resize the model's embeddings)"
            )
        if lora_r is not None:
            model = self._with_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's
        # mode: without this its dropout would stay off in training.
        self.model = model.train()
        self.optimizer_factory = optimizer
        self._fusion: FusedLMHead | None = None
        if not isinstance(compile, bool | Mapping):
            raise ValueError(
                f"compile must be True, False or a dict of torch.compile keyword arguments, got "
                f"{compile!r}"
            )
        self.compile_options: dict[str, Any] | None = (
            dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)
        )

    @staticmethod
    def _with_lora(
        model: Any, r: int, alpha: float, dropout: float, targets: list[str] | None
    ) -> Any:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lora_r must be an integer >= 1 or None, got {r!r}")
        try:
            import peft
        except ImportError as err:
            raise ImportError("LoRA needs peft: pip install 'lightning-noise[hf]'") from err
        lora = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
        )
        return peft.get_peft_model(model, lora)

    # ------------------------------------------------------------------ engines
    def configure_model(self) -> None:
        """Shard the model with FSDP2 under ``ModelParallelStrategy``, then compile it if asked.

        Under Lightning's ``ModelParallelStrategy`` (data parallel only) each transformer block
        (found by structure, as NoiseFiT finds them: the ``layers`` / ``h`` / ``blocks``
        container, also inside a peft wrapper) becomes one ``fully_shard`` unit and the whole
        model the root unit (the embeddings, the final norm and the head). Under any other
        strategy the model is left as it is. Lightning calls this after the callbacks' setup;
        calling it again does nothing.

        Raises:
            ValueError: for ``tensor_parallel_size > 1`` (not supported: give every process
                to data parallelism), or a model without a block container.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = attached_trainer(self)
        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, ModelParallelStrategy):
            self._shard(self.device_mesh)
        if (
            self.compile_options is not None
            and getattr(self.model, "_compiled_call_impl", None) is None
        ):
            self.model.compile(**self.compile_options)

    def _shard(self, mesh: Any) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return  # already sharded (configure_model runs again for a later stage)
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"CausalLMModule shards with FSDP2 over data parallelism only, but the strategy "
                f"has tensor_parallel_size={mesh['tensor_parallel'].size()}; use "
                "ModelParallelStrategy(data_parallel_size=<number of processes>, "
                "tensor_parallel_size=1)"
            )
        data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for _, block in find_blocks(self.model):
            fully_shard(block, mesh=data_mesh)
        fully_shard(self.model, mesh=data_mesh)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Tensor | Mapping[str, Tensor]) -> Tensor:
        """``[B, T, V]`` logits of ``input_ids`` (a tensor, or a batch dict with its mask)."""
        if isinstance(batch, Mapping):
            return self.model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            ).logits
        return self.model(input_ids=batch).logits

    def noisefit_inputs(self, batch: Any) -> Any:
        return batch

    def enable_fused_head(self, impl: str = "auto") -> None:
        """Compute the training loss with the fused head + loss (``KernelSwap(fused_head=True)``
        calls this): the criterion's label smoothing or MaxSup go into the kernel.

        Raises:
            ValueError: for a criterion the kernel does not compute, or a head that is not an
                ``nn.Linear``.
        """
        self._fused_options()  # fail now for a criterion the kernel cannot run
        if self._fusion is not None:
            self._fusion.remove()
        self._fusion = FusedLMHead(self.model, impl, loss=False)

    def _fused_options(self) -> dict[str, float]:
        kind = type(self.criterion)
        if kind is LabelSmoothingCrossEntropy:
            return {"label_smoothing": self.criterion.smoothing, "z_loss": self.criterion.z_loss}
        if kind is MaxSupLoss:
            return {"maxsup_alpha": self.criterion.alpha, "z_loss": self.criterion.z_loss}
        raise ValueError(
            f"the fused head + loss computes cross-entropy with label smoothing, MaxSup and "
            f"z-loss; criterion {kind.__name__} is none of those (use "
            "LabelSmoothingCrossEntropy or MaxSupLoss, or KernelSwap(fused_head=False))"
        )

    def _token_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        """``[B, T-1]`` token losses, the shifted logits (``None`` when fused) and, when
        fused, the hidden states (else an empty tensor)."""
        target = batch["labels"][:, 1:]
        if self._fusion is None:
            logits = self(batch)[:, :-1]
            losses = self.criterion(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            return losses.view_as(target), logits, logits.new_empty(0)
        with self._fusion.capture() as captured:
            self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        hidden = captured["hidden"][:, :-1]
        head = self._fusion.head
        losses = kernels.linear_cross_entropy(
            hidden,
            head.weight,
            target,
            bias=head.bias,
            reduction="none",
            impl=self._fusion.impl,
            **self._fused_options(),
        )
        return losses, None, hidden

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        target = batch["labels"][:, 1:]
        valid = target != -100
        token_losses, logits, hidden = self._token_losses(batch)
        counts = valid.sum(dim=1)
        pair_losses = token_losses.sum(dim=1) / counts.clamp_min(1)
        # The observers' view of a pair: its first answer token (see the module docstring).
        rows, first = _first_answer(valid)
        if logits is not None:
            first_logits = logits[rows, first]
        else:
            first_logits = find_lm_head(self.model)(hidden[rows, first])  # type: ignore[misc]
        sample = SampleBatch.create(
            batch["index"], target[rows, first].clamp_min(0), first_logits, pair_losses
        )
        loss = self.reduce_loss(pair_losses, sample)
        if logits is not None:
            loss = self.noisefit_loss(loss, logits, lambda: self(batch)[:, :-1], mask=valid)
        elif find_callbacks(attached_trainer(self), LossTransform):
            raise ValueError(
                "NoiseFiT needs the model's logits, which the fused head + loss never makes; "
                "use KernelSwap(fused_head=False) with NoiseFiT"
            )
        n = target.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return self.step_outputs(loss, sample)

    def sample_logits(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``([B] label, [B, V] logits)`` of each pair's first answer token: what stands for a
        pair in the ``SampleBatch`` (``LabelAudit`` predicts the training set with it,
        :class:`~lightning_noise.types.DictSampleModule`)."""
        target = batch["labels"][:, 1:]
        rows, first = _first_answer(target != -100)
        logits = self(batch)[:, :-1]
        return target[rows, first].clamp_min(0), logits[rows, first]

    def _eval_step(self, batch: Mapping[str, Tensor], stage: str) -> None:
        target = batch["labels"][:, 1:]
        valid = target != -100
        logits = self(batch)[:, :-1]
        losses = self.criterion(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        n = target.shape[0]
        total = valid.sum().clamp_min(1)
        self.log(f"{stage}/loss", losses.sum() / total, batch_size=n)
        right = (logits.argmax(-1) == target) & valid
        self.log(f"{stage}/token_acc", right.sum() / total, batch_size=n)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_train_epoch_start(self) -> None:
        set_progress = getattr(self.criterion, "set_progress", None)
        if callable(set_progress):
            max_epochs = self.trainer.max_epochs
            set_progress(self.current_epoch, max_epochs if max_epochs and max_epochs > 0 else None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-4)
        return self.optimizer_factory(params)
