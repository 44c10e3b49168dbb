"""PerSampleLossMixin: policies weight the per-sample losses before reduction."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_noise.mixins import PerSampleLossMixin
from lightning_noise.types import SampleBatch, SamplePolicy


class IndexedData(Dataset):
    def __init__(self, n: int = 32, d: int = 5, c: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = torch.randint(0, c, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Tiny(PerSampleLossMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(5, 3)
        self.seen_losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        sb = SampleBatch.create(index, y, logits, losses)
        loss = self.reduce_loss(losses, sb)
        self.seen_losses.append(loss.detach())
        return self.step_outputs(loss, sb)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DropEven(pl.Callback):
    """A policy that removes samples with an even index and doubles weight of index 1."""

    def sample_weights(self, trainer, pl_module, batch: SampleBatch) -> torch.Tensor:
        w = (batch.index % 2 == 1).float()
        return torch.where(batch.index == 1, 2 * w, w)


def _batch(n: int = 6, c: int = 3) -> tuple[torch.Tensor, SampleBatch]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, c, generator=g, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    losses = F.cross_entropy(logits, y, reduction="none")
    return losses, SampleBatch.create(torch.arange(n), y, logits, losses)


def test_policy_is_recognised_by_protocol() -> None:
    assert isinstance(DropEven(), SamplePolicy)
    assert not isinstance(pl.Callback(), SamplePolicy)


def test_without_trainer_reduction_is_plain_mean() -> None:
    losses, sb = _batch()
    module = Tiny()
    torch.testing.assert_close(module.reduce_loss(losses, sb), losses.mean())


def test_weighted_mean_inside_trainer(tmp_path) -> None:
    module = Tiny()
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[DropEven()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    losses, sb = _batch()
    module.trainer = trainer
    w = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, 1.0])
    expected = (w * losses).sum() / w.sum()
    torch.testing.assert_close(module.reduce_loss(losses, sb), expected)


def test_policy_changes_the_gradient_exactly(tmp_path) -> None:
    """Training with DropEven equals training on the odd samples with weights by hand."""
    data = IndexedData()
    with_policy = Tiny()
    pl.Trainer(
        max_epochs=1,
        callbacks=[DropEven()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(with_policy, DataLoader(data, batch_size=32))

    manual = Tiny()
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    idx = torch.arange(32)
    w = (idx % 2 == 1).float()
    w[1] = 2.0
    losses = F.cross_entropy(manual.net(data.x), data.y, reduction="none")
    ((w * losses).sum() / w.sum()).backward()
    opt.step()
    for a, b in zip(with_policy.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_all_zero_weights_give_zero_loss_with_graph(tmp_path) -> None:
    class DropAll(pl.Callback):
        def sample_weights(self, trainer, pl_module, batch):
            return torch.zeros(len(batch))

    module = Tiny()
    module.trainer = pl.Trainer(callbacks=[DropAll()], logger=False, default_root_dir=tmp_path)
    losses, sb = _batch()
    out = module.reduce_loss(losses, sb)
    assert out.item() == 0.0 and out.requires_grad


@pytest.mark.parametrize(
    ("weights", "match"),
    [(torch.ones(3), "one weight per sample"), (-torch.ones(6), "non-finite|negative")],
)
def test_bad_policy_weights_raise(tmp_path, weights, match) -> None:
    class Bad(pl.Callback):
        def sample_weights(self, trainer, pl_module, batch):
            return weights

    module = Tiny()
    module.trainer = pl.Trainer(callbacks=[Bad()], logger=False, default_root_dir=tmp_path)
    losses, sb = _batch()
    with pytest.raises(ValueError, match=match):
        module.reduce_loss(losses, sb)


def test_scalar_loss_is_rejected() -> None:
    losses, sb = _batch()
    with pytest.raises(ValueError, match="reduction='none'"):
        Tiny().reduce_loss(losses.mean(), sb)


def test_step_outputs_round_trip_to_sample_batch() -> None:
    losses, sb = _batch()
    out = PerSampleLossMixin.step_outputs(losses.mean(), sb)
    again = SampleBatch.from_outputs(out)
    torch.testing.assert_close(again.loss, sb.loss)
    assert torch.equal(again.index, sb.index)


def test_sample_batch_validation_and_margin() -> None:
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
    sb = SampleBatch.create(torch.tensor([4, 7]), torch.tensor([0, 2]), logits, torch.ones(2))
    # margin = assigned logit - largest other logit
    torch.testing.assert_close(sb.margin, torch.tensor([1.0, -2.0]))
    assert sb.correct.tolist() == [True, False]
    with pytest.raises(ValueError, match="per-sample"):
        SampleBatch(torch.arange(2), torch.zeros(2, dtype=torch.long), logits, torch.ones(()))
    with pytest.raises(TypeError, match="PerSampleLossMixin"):
        SampleBatch.from_outputs(torch.ones(()))


# ------------------------------------------------ a module that calls F.cross_entropy itself
class OwnCrossEntropy(Tiny):
    """The user's unchanged loss line, inside ``per_sample_losses``."""

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        with self.per_sample_losses(index) as captured:
            loss = F.cross_entropy(self.net(x), y)
        return self.step_outputs(loss, captured.batch)


def _fit_with(module, callbacks):
    from lightning_noise.dynamics import TrainingDynamics

    dynamics = TrainingDynamics()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[*callbacks, dynamics],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)
    trainer.fit(module, DataLoader(IndexedData(), batch_size=8, shuffle=True))
    return module, dynamics


def test_per_sample_losses_from_f_cross_entropy_equal_the_explicit_reduction() -> None:
    from lightning_noise.callbacks import SAM, SmallLossSelection

    explicit, dyn_a = _fit_with(Tiny(), [SAM(rho=0.05), SmallLossSelection(0.5, num_gradual=1)])
    captured, dyn_b = _fit_with(
        OwnCrossEntropy(), [SAM(rho=0.05), SmallLossSelection(0.5, num_gradual=1)]
    )
    for a, b in zip(explicit.parameters(), captured.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(dyn_a.store.history, dyn_b.store.history)
    plain, _ = _fit_with(OwnCrossEntropy(), [SAM(rho=0.05)])
    pairs = zip(plain.parameters(), captured.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_per_sample_losses_without_policies_is_the_plain_mean() -> None:
    module = OwnCrossEntropy()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    with module.per_sample_losses(torch.arange(4)) as captured:
        loss = F.cross_entropy(module.net(x), y)
        untouched = F.cross_entropy(module.net(x), y, reduction="sum")
    torch.testing.assert_close(loss, F.cross_entropy(module.net(x), y))
    torch.testing.assert_close(untouched, F.cross_entropy(module.net(x), y, reduction="sum"))
    assert captured.batch is not None and torch.equal(captured.batch.index, torch.arange(4))
    assert loss.requires_grad


def test_per_sample_losses_refuses_what_it_cannot_turn() -> None:
    module = OwnCrossEntropy()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    with pytest.raises(RuntimeError, match=r"saw no F.cross_entropy.*B = 4"):
        with module.per_sample_losses(torch.arange(4)):
            F.cross_entropy(module.net(x), y, reduction="sum")
    with pytest.raises(ValueError, match="class-weighted"):
        with module.per_sample_losses(torch.arange(4)):
            F.cross_entropy(module.net(x), y, weight=torch.ones(3))


class _Recording(Tiny):
    """Records (paused, weights) of every reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.reductions: list[tuple[bool, torch.Tensor | None]] = []

    def sample_weights(self, batch):
        weights = super().sample_weights(batch)
        self.reductions.append((self._weights_paused, None if weights is None else weights.clone()))
        return weights


def test_sam_second_pass_reuses_the_weights_and_policies_move_once_per_step() -> None:
    from lightning_noise.callbacks import SAM, AdaptiveK, SmallLossSelection

    class Counting(SmallLossSelection):
        calls = 0

        def select(self, trainer, pl_module, batch):
            Counting.calls += 1
            return super().select(trainer, pl_module, batch)

    adaptive = AdaptiveK(warmup_epochs=0)
    module, _ = _fit_with(_Recording(), [SAM(rho=0.05), adaptive, Counting(0.5, num_gradual=1)])
    steps = module.trainer.global_step
    assert steps == 12  # 3 epochs x 4 batches
    assert adaptive.steps == steps and Counting.calls == steps
    first = [w for paused, w in module.reductions if not paused]
    second = [w for paused, w in module.reductions if paused]
    assert len(first) == len(second) == steps
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert any(not bool(w.all()) for w in first)  # the policies did remove samples
