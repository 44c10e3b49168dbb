"""Co-teaching selection and schedule against the official code's rules, re-derived here."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_noise.callbacks import SAM, SmallLossSelection
from lightning_noise.data import Indexed
from lightning_noise.mixins import CoTeachingMixin
from lightning_noise.mixins.coteaching import coteaching_forget_rate, coteaching_selection


@pytest.mark.parametrize(("tau", "t_k", "c"), [(0.4, 10, 1.0), (0.2, 5, 2.0), (0.45, 1, 1.0)])
def test_schedule_matches_the_official_rate_schedule(tau, t_k, c) -> None:
    n_epoch = 15
    official = np.ones(n_epoch) * tau
    official[:t_k] = np.linspace(0, tau**c, t_k)
    ours = [
        coteaching_forget_rate(e, forget_rate=tau, num_gradual=t_k, exponent=c)
        for e in range(n_epoch)
    ]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)


def official_loss_coteaching_indices(loss1: torch.Tensor, loss2: torch.Tensor, rate: float):
    """Indices the official `loss_coteaching` updates each net on (net1 on net2's picks)."""
    ind_1_sorted = np.argsort(loss1.numpy(), kind="stable")
    ind_2_sorted = np.argsort(loss2.numpy(), kind="stable")
    num_remember = int((1 - rate) * len(ind_1_sorted))
    return set(ind_2_sorted[:num_remember].tolist()), set(ind_1_sorted[:num_remember].tolist())


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45])
def test_cross_update_matches_the_official_rule(rate) -> None:
    g = torch.Generator().manual_seed(3)
    loss1, loss2 = torch.rand(64, generator=g), torch.rand(64, generator=g)
    keep1, keep2 = coteaching_selection(loss1, loss2, rate)
    for_net1, for_net2 = official_loss_coteaching_indices(loss1, loss2, rate)
    assert set(keep1.nonzero().squeeze(1).tolist()) == for_net1
    assert set(keep2.nonzero().squeeze(1).tolist()) == for_net2
    assert keep1.sum() == int((1 - rate) * 64)


def test_coteaching_plus_selects_among_disagreements_only() -> None:
    loss1 = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    loss2 = torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    disagree = torch.tensor([False, True, True, True, True, False])
    keep1, keep2 = coteaching_selection(loss1, loss2, 0.5, disagree=disagree)
    # among {1, 2, 3, 4}: net2's two smallest are 4, 3 (for net1); net1's are 1, 2 (for net2)
    assert keep1.nonzero().squeeze(1).tolist() == [3, 4]
    assert keep2.nonzero().squeeze(1).tolist() == [1, 2]
    all1, all2 = coteaching_selection(loss1, loss2, 0.5, disagree=torch.zeros(6, dtype=torch.bool))
    assert bool(all1.all()) and bool(
        all2.all()
    )  # full agreement: every sample, as the official code


def test_at_least_one_sample_is_kept_and_shapes_are_checked() -> None:
    keep1, keep2 = coteaching_selection(torch.rand(3), torch.rand(3), 0.9)
    assert keep1.sum() == 1 and keep2.sum() == 1
    with pytest.raises(ValueError, match="per-sample"):
        coteaching_selection(torch.rand(3), torch.rand(4), 0.1)


# ------------------------------------------------------------ a user's Co-teaching module + SAM
class _TwoNets(CoTeachingMixin, pl.LightningModule):
    """A user's module with the mixin; records each step's selection and whether SAM paused."""

    forget_rate, num_gradual, exponent, plus_start_epoch = 0.5, 1, 1.0, None

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1, self.net2 = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        self.selections: list[tuple[bool, torch.Tensor, torch.Tensor]] = []

    def coteaching_networks(self):
        return self.net1, self.net2

    def per_sample_loss(self, logits, target):
        return F.cross_entropy(logits, target, reduction="none")

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        loss, _, stats = self.coteaching_step(x, y, index)
        paused = self._selection_paused
        self.selections.append((paused, stats["keep_for_net1"], stats["keep_for_net2"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sam_second_pass_reuses_the_peers_selection_and_policies_refuse_the_model() -> None:
    g = torch.Generator().manual_seed(0)
    data = Indexed(TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,))))
    module = _TwoNets()
    trainer = pl.Trainer(max_epochs=2, callbacks=[SAM(rho=0.5)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    first = [(k1, k2) for paused, k1, k2 in module.selections if not paused]
    second = [(k1, k2) for paused, k1, k2 in module.selections if paused]
    assert len(first) == len(second) == trainer.global_step == 8
    for (a1, a2), (b1, b2) in zip(first, second, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    # Epoch 0 keeps all (R(0) = 0), epoch 1 half of each batch of 8.
    assert [int(k1.sum()) for k1, _ in first] == [8] * 4 + [4] * 4

    refusing = pl.Trainer(max_epochs=1, callbacks=[SmallLossSelection(0.2)], logger=False)
    with pytest.raises(ValueError, match=r"Co-teaching already.*forget_rate"):
        refusing.fit(_TwoNets(), DataLoader(data, batch_size=8))
