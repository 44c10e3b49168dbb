"""Which callbacks compose, and what each needs from a user's module and data.

The single source of truth behind the composition matrix: ``tests/test_composition.py``
trains every pair of exported callbacks (and each loss with each callback) on a module and
DataModule written in the test, and checks that each pair either trains with its invariants
or is refused at setup with the message this table gives; the README's tables are generated
from it (``python -m lightning_noise.callbacks.composition``) and a test keeps them equal.

Any pair that no :data:`RULES` entry names composes: it trains, and every stateful method
moves once per optimizer step (SAM's second pass pauses every
:class:`~lightning_noise.types.Pausable`, see ``docs/architecture.md``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from lightning_noise._validate import check_strategy

__all__ = [
    "NEEDS",
    "REFUSED_STRATEGIES",
    "RULES",
    "Need",
    "Rule",
    "check_gradient_strategy",
    "markdown",
    "rule_for",
]

RuleKind = Literal["exclusive", "needs", "order"]


@dataclass(frozen=True)
class Rule:
    """How two callbacks (by class name; subclasses count, e.g. ASAM is a SAM) may combine.

    * ``exclusive``: refused at setup when both are present (``first == second``: when two
      instances are).
    * ``needs``: ``first`` is refused at setup without ``second``.
    * ``order``: refused at setup when ``first`` comes after ``second`` in ``callbacks``.

    ``message`` is a fragment of the setup error (the tests match it).
    """

    first: str
    second: str
    kind: RuleKind
    message: str
    why: str


#: Every combination that does not simply compose.
RULES: tuple[Rule, ...] = (
    Rule(
        "SAM",
        "SAM",
        "exclusive",
        "one sharpness-aware callback",
        "each would run its own second pass and replace the gradient; keep one of SAM, ASAM, "
        "FSAM (two equal instances are refused even earlier, by Lightning in `Trainer()`: "
        "their checkpoint keys clash)",
    ),
    Rule(
        "SAM",
        "GradientNoise",
        "order",
        "changes gradients in on_before_optimizer_step before",
        "SAM replaces the gradient, so noise added before it would be lost",
    ),
    Rule(
        "SAM",
        "NonFiniteGuard",
        "order",
        "changes gradients in on_before_optimizer_step before",
        "the guard must check the gradient SAM computes, the one the optimizer applies",
    ),
    Rule(
        "LateStopping",
        "TrainingDynamics",
        "needs",
        "no TrainingDynamics callback",
        "first-time k-epoch learning is read from the TrainingDynamics store",
    ),
    Rule(
        "LabelAudit",
        "TrainingDynamics",
        "needs",
        "no TrainingDynamics callback",
        "the suspicion scores are read from the TrainingDynamics store",
    ),
)


@dataclass(frozen=True)
class Need:
    """What one callback needs from a user's LightningModule and data: the one step to add."""

    callback: str
    module: str
    data: str


#: One row per exported callback (checked at setup, or before the first batch where data is
#: involved, with an error that shows the code to add).
NEEDS: tuple[Need, ...] = (
    Need("GradientNoise", "any module (automatic optimization)", "any"),
    Need("NonFiniteGuard", "any module (automatic optimization)", "any"),
    Need(
        "SAM, ASAM, FSAM",
        "any module (automatic optimization, `accumulate_grad_batches=1`)",
        "any",
    ),
    Need(
        "SmallLossSelection, AdaptiveK (or your `SamplePolicyCallback`)",
        "`PerSampleLossMixin`; reduce with `self.reduce_loss(losses, batch)`",
        "any",
    ),
    Need(
        "TrainingDynamics",
        "`training_step` returns `self.step_outputs(loss, batch)` (`PerSampleLossMixin`)",
        "samples `(x, y, index)`: wrap the dataset in `Indexed(dataset)`",
    ),
    Need(
        "LateStopping",
        "as TrainingDynamics (listed too)",
        "`Indexed` samples from a DataModule or `train_dataloader` (any DataLoader with a "
        "random or sequential sampler; `set_train_indices` for anything else)",
    ),
    Need(
        "LabelAudit",
        "as TrainingDynamics (listed too)",
        "`Indexed` samples",
    ),
    Need(
        "NoiseFiT",
        "`NoiseFiTMixin`; return `self.noisefit_loss(loss, logits, lambda: self(x))`; blocks "
        "in a `blocks`/`layers`/`h` container (or `NoiseFiT(layers=[...])`)",
        "any",
    ),
    Need(
        "KernelSwap",
        "softmax/cross-entropy as `nn.Softmax` / `nn.CrossEntropyLoss` modules (or our losses)",
        "any",
    ),
)


_DEEPSPEED = (
    "DeepSpeed runs the backward pass and the optimizer step itself and keeps ZeRO's gradients "
    "in its own partitioned buffers, so the gradients are not the parameters' `.grad` at "
    "`on_before_optimizer_step`; use strategy='ddp', or ModelParallelStrategy with "
    "`fully_shard` in `configure_model` (FSDP2) to shard the model"
)
_FSDP1 = (
    "FSDPStrategy (FSDP1) keeps flattened shards whose gradients are not laid out like the "
    "parameters; use ModelParallelStrategy with `fully_shard` in `configure_model` (FSDP2, "
    "supported) or strategy='ddp'"
)

#: Strategies refused at ``setup`` by the callbacks that change gradients (class names; a
#: subclass counts as its base), with the reason and what to use instead. Supported by them:
#: single device, DDP, and FSDP2 (``ModelParallelStrategy`` with ``fully_shard``,
#: data-parallel: ``tensor_parallel_size=1``). Every other callback works on the losses and
#: batches, not the gradients, and trains under these strategies as under DDP (tested under DDP
#: and FSDP2; DeepSpeed is not installed here, so not tested). See ``docs/scaling.md``.
REFUSED_STRATEGIES: dict[str, dict[str, str]] = {
    "SAM": {"DeepSpeedStrategy": _DEEPSPEED, "FSDPStrategy": _FSDP1},
    "GradientNoise": {"DeepSpeedStrategy": _DEEPSPEED, "FSDPStrategy": _FSDP1},
    "NonFiniteGuard": {"DeepSpeedStrategy": _DEEPSPEED, "FSDPStrategy": _FSDP1},
}


def check_gradient_strategy(owner: str, key: str, strategy: object) -> None:
    """Refuse at setup what :data:`REFUSED_STRATEGIES` lists for ``key``, and tensor parallelism.

    ``ModelParallelStrategy`` is supported data-parallel (FSDP2, ``tensor_parallel_size=1``):
    with a tensor-parallel mesh dimension of size > 1 the gradients of replicated parameters
    may be partial sums, which is untested here, so it is refused.
    """
    check_strategy(owner, strategy, REFUSED_STRATEGIES[key])
    if "ModelParallelStrategy" in {cls.__name__ for cls in type(strategy).__mro__}:
        mesh = strategy.device_mesh  # type: ignore[attr-defined]
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise RuntimeError(
                f"{owner} supports ModelParallelStrategy for data parallelism (FSDP2, "
                f"fully_shard) only, got tensor_parallel_size={mesh['tensor_parallel'].size()}; "
                "use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)"
            )


def rule_for(first: str, second: str) -> Rule | None:
    """The rule that names the two callback classes (in either order), or ``None``."""
    for rule in RULES:
        if {rule.first, rule.second} == {first, second}:
            return rule
    return None


def markdown() -> str:
    """The README's two tables: what each callback needs, and the pairs that do not simply
    compose."""
    lines = [
        "| callback | your LightningModule | your data |",
        "|---|---|---|",
        *(f"| {n.callback} | {n.module} | {n.data} |" for n in NEEDS),
        "",
        "| callbacks | verdict | why |",
        "|---|---|---|",
    ]
    verdicts = {
        "exclusive": "refused at setup: {message}",
        "needs": "{first} refused at setup without {second}",
        "order": "refused at setup when {first} comes after {second} in `callbacks`",
    }
    for rule in RULES:
        pair = rule.first if rule.first == rule.second else f"{rule.first} + {rule.second}"
        if rule.first == "SAM" and rule.second == "SAM":
            pair = "two of SAM, ASAM, FSAM"
        verdict = verdicts[rule.kind].format(**rule.__dict__)
        lines.append(f"| {pair} | {verdict} | {rule.why} |")
    lines.append(
        "| every other pair of callbacks, and every loss with every callback | trains | "
        "each stateful method moves once per optimizer step |"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - prints the README block
    sys.stdout.write(markdown() + "\n")
