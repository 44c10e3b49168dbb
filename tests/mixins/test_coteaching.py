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


# ------------------------------------------------------------ schedule offset (official loop)
def test_schedule_offset_one_is_the_official_training_loop() -> None:
    """The official loop trains epochs 1..n_epoch-1 with rate_schedule[epoch]: Lightning's
    epoch e with schedule_offset=1 forgets rate_schedule[e + 1]; offset 0 is one epoch later."""
    tau, t_k, n_epoch = 0.5, 10, 200
    rate_schedule = np.ones(n_epoch) * tau
    rate_schedule[:t_k] = np.linspace(0, tau, t_k)
    official = [rate_schedule[epoch] for epoch in range(1, n_epoch)]  # main.py's loop
    ours = [
        coteaching_forget_rate(e, forget_rate=tau, num_gradual=t_k, schedule_offset=1)
        for e in range(n_epoch - 1)
    ]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)
    assert ours[0] == pytest.approx(tau / 9) and coteaching_forget_rate(0, forget_rate=tau) == 0
    callback = SmallLossSelection(tau, num_gradual=t_k, schedule_offset=1)
    assert [callback.forget_rate_at(e) for e in range(n_epoch - 1)] == ours
    assert SmallLossSelection(tau).state_key != callback.state_key
    with pytest.raises(ValueError, match="schedule_offset must be an integer >= 0"):
        SmallLossSelection(tau, schedule_offset=-1)


# ------------------------------------------------------------ Co-teaching+ as the official code
def official_loss_coteaching(y_1, y_2, t, forget_rate):
    """xingruiyu/coteaching_plus loss.py `loss_coteaching`, transcribed for the CPU (stable
    argsort; the pure-ratio bookkeeping left out). Also returns the positions each net is
    updated on and num_remember."""
    loss_1 = F.cross_entropy(y_1, t, reduction="none")
    ind_1_sorted = np.argsort(loss_1.detach().numpy(), kind="stable")
    loss_2 = F.cross_entropy(y_2, t, reduction="none")
    ind_2_sorted = np.argsort(loss_2.detach().numpy(), kind="stable")
    remember_rate = 1 - forget_rate
    num_remember = int(remember_rate * len(loss_1))
    ind_1_update = ind_1_sorted[:num_remember]
    ind_2_update = ind_2_sorted[:num_remember]
    if len(ind_1_update) == 0:
        ind_1_update = ind_1_sorted
        ind_2_update = ind_2_sorted
        num_remember = ind_1_update.shape[0]
    loss_1_update = F.cross_entropy(y_1[ind_2_update], t[ind_2_update])
    loss_2_update = F.cross_entropy(y_2[ind_1_update], t[ind_1_update])
    return (torch.sum(loss_1_update) / num_remember, torch.sum(loss_2_update) / num_remember,
            ind_2_update, ind_1_update, num_remember)  # fmt: skip


def official_loss_coteaching_plus(logits, logits2, labels, forget_rate, ind, step):
    """`loss_coteaching_plus` of the same file, transcribed (no .cuda(); returns the batch
    positions each network is updated on and the factor its mean is divided by)."""
    outputs = F.softmax(logits, dim=1)
    outputs2 = F.softmax(logits2, dim=1)
    _, pred1 = torch.max(logits.data, 1)
    _, pred2 = torch.max(logits2.data, 1)
    pred1, pred2 = pred1.numpy(), pred2.numpy()
    logical_disagree_id = np.zeros(labels.size(), dtype=bool)
    disagree_id = []
    for idx, p1 in enumerate(pred1):
        if p1 != pred2[idx]:
            disagree_id.append(idx)
            logical_disagree_id[idx] = True
    temp_disagree = ind * logical_disagree_id.astype(np.int64)
    ind_disagree = np.asarray([i for i in temp_disagree if i != 0]).transpose()
    if ind_disagree.shape[0] != len(disagree_id):
        disagree_id = disagree_id[: ind_disagree.shape[0]]
    _update_step = np.logical_or(logical_disagree_id, step < 5000).astype(np.float32)
    update_step = torch.from_numpy(_update_step)
    if len(disagree_id) > 0:
        loss_1, loss_2, for1, for2, num = official_loss_coteaching(
            outputs[disagree_id], outputs2[disagree_id], labels[disagree_id], forget_rate
        )
        ids = np.asarray(disagree_id)
        return loss_1, loss_2, set(ids[for1].tolist()), set(ids[for2].tolist()), num
    cross_entropy_1 = F.cross_entropy(outputs, labels)
    cross_entropy_2 = F.cross_entropy(outputs2, labels)
    loss_1 = torch.sum(update_step * cross_entropy_1) / labels.size()[0]
    loss_2 = torch.sum(update_step * cross_entropy_2) / labels.size()[0]
    everyone = set(range(len(labels)))
    return loss_1, loss_2, everyone, everyone, 1


class _Columns(torch.nn.Module):
    def __init__(self, columns: slice) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, x):
        return x[:, self.columns]


class _PlusOfficial(CoTeachingMixin, torch.nn.Module):
    """The two networks' logits are the two halves of the input, so each case is set by hand."""

    num_gradual, exponent, plus_start_epoch = 10, 1.0, 1
    schedule_offset, plus_variant = 1, "official_code"

    def __init__(self, forget_rate: float, classes: int, epoch: int) -> None:
        super().__init__()
        self.forget_rate, self.current_epoch = forget_rate, epoch
        self.net1, self.net2 = _Columns(slice(0, classes)), _Columns(slice(classes, None))

    def coteaching_networks(self):
        return self.net1, self.net2

    def per_sample_loss(self, logits, target):
        return F.cross_entropy(logits, target, reduction="none")


@pytest.mark.parametrize(
    ("case", "epoch", "batch_idx", "rate"),
    [
        ("index 0 disagrees", 14, 3, 0.45),  # the last disagreement leaves the set
        ("no index 0", 14, 3, 0.45),
        ("few disagreements", 14, 3, 0.9),  # int(0.1 * n) == 0: all n kept
        ("agree, early", 24, 199, 0.45),  # 25 * 199 < 5000: trained on every sample
        ("agree, late", 25, 199, 0.45),  # 26 * 199 >= 5000: loss 0
    ],
)
def test_plus_official_code_variant_is_the_official_loss(case, epoch, batch_idx, rate) -> None:
    classes, batch = 4, 24
    g = torch.Generator().manual_seed(7)
    logits1 = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    logits2 = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    if case.startswith("agree"):
        logits2 = logits1 + 0.1  # same arg-max everywhere
    elif case == "few disagreements":
        logits2 = logits1.clone()
        logits2[[2, 9, 17], :] = -logits1[[2, 9, 17], :]  # arg-max moves on three samples
    labels = torch.randint(0, classes, (batch,), generator=g)
    index = torch.randperm(100, generator=g)[:batch] + 1
    disagree = (logits1.argmax(1) != logits2.argmax(1)).nonzero().squeeze(1).tolist()
    if case == "index 0 disagrees":
        index[disagree[1]] = 0
    x = torch.cat([logits1, logits2], dim=1).requires_grad_(True)
    module = _PlusOfficial(rate, classes, epoch)
    official_epoch = epoch + 1  # the official loop counts from 1
    tau_at = coteaching_forget_rate(official_epoch, forget_rate=rate, num_gradual=10)
    assert module.current_forget_rate() == tau_at

    loss, _, stats = module.coteaching_step(x, labels, index, batch_idx=batch_idx)
    l1, l2, for1, for2, num = official_loss_coteaching_plus(
        x[:, :classes], x[:, classes:], labels, tau_at, index.numpy(), official_epoch * batch_idx
    )
    assert set(stats["keep_for_net1"].nonzero().squeeze(1).tolist()) == for1
    assert set(stats["keep_for_net2"].nonzero().squeeze(1).tolist()) == for2
    # Ours is the plain mean over the picks; the official code divides it once more by num.
    want = (l1 + l2) * num
    # The official agreement branch multiplies by a float32 update_step (float32 result).
    tol = 1e-6 if case.startswith("agree") else 1e-12
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=tol, atol=tol)
    (got_grad,) = torch.autograd.grad(loss, x)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got_grad, want_grad.to(got_grad.dtype), rtol=tol, atol=tol)
    if case == "index 0 disagrees":
        assert disagree[-1] not in for1 | for2 and index[disagree[1]] == 0
    if case == "agree, late":
        assert float(loss.detach()) == 0.0 and stats["agreement_gate"] == 0.0
    if case == "agree, early":
        assert float(loss.detach()) > 0 and stats["agreement_gate"] == 1.0


def test_plus_paper_variant_differs_and_official_needs_batch_idx() -> None:
    classes = 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2 * classes, generator=g) * 3
    y, index = torch.randint(0, classes, (16,), generator=g), torch.arange(16)
    official = _PlusOfficial(0.2, classes, 5)
    paper = _PlusOfficial(0.2, classes, 5)
    paper.plus_variant = "paper"
    loss_official = official.coteaching_step(x, y, index, batch_idx=0)[0]
    loss_paper = paper.coteaching_step(x, y, index)[0]
    assert not torch.allclose(loss_official, loss_paper)  # softmax twice vs once
    with pytest.raises(ValueError, match="batch_idx"):
        official.coteaching_step(x, y, index)
    paper.plus_variant = "official"
    with pytest.raises(ValueError, match="plus_variant must be"):
        paper.coteaching_step(x, y, index)
