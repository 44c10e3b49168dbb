"""Tests for ``DynamicsStore``: a hand-computed example, a pure-Python oracle, growth, state."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lightning_noise.dynamics import DynamicsStore
from lightning_noise.types import SampleBatch

NUM_CLASSES = 3


def make_batch(index: list[int], target: list[int], margin: list[float], loss: list[float]):
    """A batch whose logits have the given AUM margins: 0 everywhere, ``margin`` at the label.

    With ``margin > 0`` the label is the arg-max (correct); with ``margin < 0`` another class
    (value 0) is, and the margin is ``margin - 0``.
    """
    index_t = torch.tensor(index, dtype=torch.long)
    target_t = torch.tensor(target, dtype=torch.long)
    logits = torch.zeros(len(index), NUM_CLASSES)
    logits[torch.arange(len(index)), target_t] = torch.tensor(margin)
    return SampleBatch.create(index_t, target_t, logits, torch.tensor(loss))


# Targets of the 4 samples of the hand-computed example.
TARGETS = [0, 2, 1, 1]

# (epoch, [(sample, margin), ...]) in recording order; each epoch is split into two batches.
# Sample 0: all epochs, correct pattern 0 1 1 0 1.
# Sample 1: not seen in epoch 2; pattern 1 1 . 1 0.
# Sample 2: never seen.
# Sample 3: seen twice in epoch 0 (correct, then wrong: the last wins), not in epochs 1 and 3;
#           pattern 0 . 1 . 0.
SCHEDULE = [
    (0, [[(0, -1.0), (3, 1.0)], [(1, 0.5), (3, -2.0)]]),
    (1, [[(1, 2.0)], [(0, 2.0)]]),
    (2, [[(0, 3.0), (3, 0.5)], []]),
    (3, [[(1, 4.0)], [(0, -0.5)]]),
    (4, [[(3, -1.5), (0, 1.5)], [(1, -1.0)]]),
]


def loss_of(sample: int, epoch: int, occurrence: int = 0) -> float:
    return 10.0 * epoch + sample + 0.25 + 0.5 * occurrence


def build_hand_store() -> DynamicsStore:
    store = DynamicsStore(4, initial_epochs=2)  # forces the epoch capacity to grow twice
    for epoch, batches in SCHEDULE:
        occurrences: dict[int, int] = {}
        for records in batches:
            losses = []
            for sample, _ in records:
                losses.append(loss_of(sample, epoch, occurrences.get(sample, 0)))
                occurrences[sample] = occurrences.get(sample, 0) + 1
            store.update(
                make_batch(
                    [s for s, _ in records],
                    [TARGETS[s] for s, _ in records],
                    [m for _, m in records],
                    losses,
                ),
                epoch,
            )
    return store


def test_hand_computed_example():
    store = build_hand_store()
    assert store.num_samples == 4
    assert store.num_epochs == 5
    assert store.history.dtype == torch.int8
    assert store.history.tolist() == [
        [0, 1, 1, 0, 1],
        [1, 1, -1, 1, 0],
        [-1, -1, -1, -1, -1],
        [0, -1, 1, -1, 0],
    ]
    assert store.correct_at(2).tolist() == [1, -1, -1, 1]
    assert store.seen.tolist() == [True, True, False, True]
    assert store.update_count.tolist() == [5, 4, 0, 4]
    assert store.last_epoch.tolist() == [4, 4, -1, 4]

    last = store.last_loss
    assert last.dtype == torch.float32
    assert last[[0, 1, 3]].tolist() == [40.25, 41.25, 43.25]
    assert math.isnan(last[2])

    # AUM = mean margin over all updates (both epoch-0 updates of sample 3 count):
    # s0 (-1 + 2 + 3 - 0.5 + 1.5) / 5 = 1.0; s1 (0.5 + 2 + 4 - 1) / 4 = 1.375;
    # s3 (1 - 2 + 0.5 - 1.5) / 4 = -0.5.
    aum = store.aum()
    assert aum[[0, 1, 3]].tolist() == [1.0, 1.375, -0.5]
    assert math.isnan(aum[2])

    # s0: 1->0 at epochs 2->3; s1: 1->0 at 3->4; s3: 1 at epoch 2 -> 0 at epoch 4 (gap skipped).
    assert store.forgetting_events().tolist() == [1, 1, 0, 1]

    # s0 runs of correct: [1, 2], [4]; s1 observed 0, 1, 3 correct (gap at 2 skipped);
    # s3 single correct observation at epoch 2.
    assert store.first_learned_epoch(1).tolist() == [1, 0, -1, 2]
    assert store.first_learned_epoch(2).tolist() == [1, 0, -1, -1]
    assert store.first_learned_epoch(3).tolist() == [-1, 0, -1, -1]
    assert store.first_learned_epoch(4).tolist() == [-1, -1, -1, -1]
    # Ignoring epochs before 2: s0 [2], [4]; s1 [3]; s3 [2].
    assert store.first_learned_epoch(1, since=2).tolist() == [2, 3, -1, 2]
    assert store.first_learned_epoch(2, since=2).tolist() == [-1, -1, -1, -1]
    assert store.learned_mask(2).tolist() == [True, True, False, False]
    assert store.ever_learned().tolist() == [True, True, False, True]


def test_duplicates_within_a_batch_last_wins():
    store = DynamicsStore(4)
    # Sample 3 appears three times, sample 1 twice, in scrambled order.
    index = [3, 1, 3, 0, 3, 1]
    margins = [1.0, -1.0, -2.0, 1.0, 3.0, 2.0]
    losses = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    store.update(make_batch(index, [1, 1, 1, 0, 1, 1], margins, losses), 0)
    assert store.history[:, 0].tolist() == [1, 1, -1, 1]
    assert store.last_loss[[0, 1, 3]].tolist() == pytest.approx([0.4, 0.6, 0.5])
    assert store.update_count.tolist() == [1, 2, 0, 3]
    assert store.aum()[[0, 1, 3]].tolist() == pytest.approx([1.0, 0.5, 2.0 / 3.0])


class ReferenceStore:
    """A deliberately naive pure-Python oracle for the store's semantics."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.obs: list[dict[int, tuple[int, float]]] = [{} for _ in range(n)]
        self.margins: list[list[float]] = [[] for _ in range(n)]
        self.last: list[tuple[float, int] | None] = [None] * n

    def update(self, index, correct, loss, margin, epoch):
        for i, c, lo, m in zip(index, correct, loss, margin, strict=True):
            self.obs[i][epoch] = (int(c), lo)
            self.margins[i].append(m)
            self.last[i] = (lo, epoch)

    def observed(self, i, since=0):
        return [(e, self.obs[i][e][0]) for e in sorted(self.obs[i]) if e >= since]

    def forgetting(self, i):
        seq = [c for _, c in self.observed(i)]
        return sum(1 for a, b in itertools.pairwise(seq) if a == 1 and b == 0)

    def first_learned(self, i, k, since=0):
        seq = self.observed(i, since)
        for start in range(len(seq) - k + 1):
            if all(c == 1 for _, c in seq[start : start + k]):
                return seq[start][0]
        return -1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_python_oracle(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, num_classes = 37, 4
    store = DynamicsStore(n, initial_epochs=1)
    ref = ReferenceStore(n)
    targets = torch.randint(num_classes, (n,), generator=gen)
    num_epochs = 9
    for epoch in range(num_epochs):
        # Each epoch sees a random subset (with some repeats), in several batches.
        for _ in range(rng.randint(0, 4)):
            size = rng.randint(0, 12)
            index = torch.tensor([rng.randrange(n) for _ in range(size)], dtype=torch.long)
            logits = torch.randn(size, num_classes, generator=gen)
            loss = torch.rand(size, generator=gen)
            batch = SampleBatch.create(index, targets[index], logits, loss)
            store.update(batch, epoch)
            ref.update(
                index.tolist(),
                batch.correct.tolist(),
                loss.tolist(),
                batch.margin.double().tolist(),
                epoch,
            )

    recorded = [e for i in range(n) for e in ref.obs[i]]
    assert store.num_epochs == (max(recorded) + 1 if recorded else 0)
    for i in range(n):
        row = store.history[i].tolist()
        for e in range(store.num_epochs):
            assert row[e] == (ref.obs[i][e][0] if e in ref.obs[i] else -1)
        if ref.last[i] is None:
            assert not store.seen[i]
            assert math.isnan(store.last_loss[i]) and math.isnan(store.aum()[i])
            assert store.last_epoch[i] == -1
        else:
            assert store.last_loss[i].item() == pytest.approx(ref.last[i][0])
            assert store.last_epoch[i] == ref.last[i][1]
            margins = ref.margins[i]
            assert store.aum()[i].item() == pytest.approx(sum(margins) / len(margins))
        assert store.forgetting_events()[i] == ref.forgetting(i)
        for k in (1, 2, 3):
            assert store.first_learned_epoch(k)[i] == ref.first_learned(i, k)
            assert store.first_learned_epoch(k, since=3)[i] == ref.first_learned(i, k, 3)


def test_epoch_capacity_grows_by_doubling_and_keeps_history():
    store = DynamicsStore(2, initial_epochs=2)
    assert store.epoch_capacity == 2
    store.update(make_batch([0], [0], [1.0], [0.5]), 0)
    store.update(make_batch([1], [0], [-1.0], [0.5]), 2)
    assert store.epoch_capacity == 4
    store.update(make_batch([0], [0], [-1.0], [0.5]), 4)
    assert store.epoch_capacity == 8
    store.update(make_batch([1], [0], [1.0], [0.5]), 20)  # far jump: at least epoch + 1
    assert store.epoch_capacity == 21
    assert store.num_epochs == 21
    history = store.history
    assert history.shape == (2, 21)
    assert history[0, [0, 4]].tolist() == [1, 0]
    assert history[1, [2, 20]].tolist() == [0, 1]
    assert int((history >= 0).sum()) == 4
    # Recording an earlier epoch later does not lower num_epochs.
    store.update(make_batch([0], [0], [1.0], [0.5]), 1)
    assert store.num_epochs == 21
    assert store.history[0, 1] == 1


def test_resize_grows_and_refuses_to_shrink():
    store = DynamicsStore(2)
    store.update(make_batch([0, 1], [0, 0], [1.0, -1.0], [0.5, 1.5]), 0)
    store.resize(2)  # no-op
    store.resize(5)
    assert store.num_samples == 5
    assert store.history.tolist() == [[1], [0], [-1], [-1], [-1]]
    assert store.last_loss[:2].tolist() == [0.5, 1.5]
    assert store.seen.tolist() == [True, True, False, False, False]
    store.update(make_batch([4], [0], [2.0], [0.25]), 1)
    assert store.history[4].tolist() == [-1, 1]
    with pytest.raises(ValueError, match="cannot shrink from 5 to 3"):
        store.resize(3)
    with pytest.raises(ValueError, match="num_samples"):
        store.resize(-1)


def test_empty_store_and_empty_batch():
    store = DynamicsStore()
    assert store.num_samples == 0 and store.num_epochs == 0
    assert store.history.shape == (0, 0)
    assert store.first_learned_epoch(1).shape == (0,)
    store.resize(3)
    store.update(make_batch([], [], [], []), 5)
    assert store.num_epochs == 0
    assert store.history.shape == (3, 0)
    assert store.correct_at(0).tolist() == [-1, -1, -1]
    assert store.forgetting_events().tolist() == [0, 0, 0]
    assert store.first_learned_epoch(2).tolist() == [-1, -1, -1]
    assert store.aum().isnan().all()
    assert not store.ever_learned().any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_samples"):
        DynamicsStore(-1)
    with pytest.raises(ValueError, match="initial_epochs"):
        DynamicsStore(3, initial_epochs=0)
    store = DynamicsStore(3)
    batch = make_batch([0, 1], [0, 0], [1.0, 1.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        store.update(batch, -1)
    with pytest.raises(ValueError, match="epoch"):
        store.update(batch, 1.0)
    with pytest.raises(ValueError, match=r"index 3 is outside \[0, 3\).*resize"):
        store.update(make_batch([0, 3], [0, 0], [1.0, 1.0], [0.1, 0.2]), 0)
    with pytest.raises(ValueError, match=r"index -1 is outside"):
        store.record(torch.tensor([-1]), torch.tensor([True]), torch.ones(1), torch.ones(1), 0)
    with pytest.raises(ValueError, match="loss must have shape"):
        store.record(torch.tensor([0, 1]), torch.ones(2), torch.ones(3), torch.ones(2), 0)
    with pytest.raises(TypeError, match="index must hold integers"):
        store.record(torch.tensor([0.0]), torch.ones(1), torch.ones(1), torch.ones(1), 0)
    for k in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            store.first_learned_epoch(k)
    with pytest.raises(ValueError, match="since"):
        store.first_learned_epoch(1, since=-1)
    with pytest.raises(ValueError, match="epoch"):
        store.correct_at(-1)
    # Nothing was recorded by the failed calls.
    assert store.num_epochs == 0 and not store.seen.any()


def test_state_dict_roundtrip_weights_only(tmp_path):
    store = build_hand_store()
    path = tmp_path / "store.pt"
    torch.save(store.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["history"].shape == (4, 5)  # the unused epoch capacity is not saved

    restored = DynamicsStore(1)  # any size: loading replaces it
    restored.load_state_dict(state)
    assert_stores_equal(restored, store)

    # Both continue identically, including growing the epoch capacity after loading.
    for s in (store, restored):
        s.update(make_batch([2, 0], [1, 0], [1.0, -3.0], [7.0, 8.0]), 9)
        s.resize(6)
    assert_stores_equal(restored, store)
    assert restored.history[2].tolist() == [-1] * 9 + [1]

    bad = dict(state, history=state["history"][:, :3])
    with pytest.raises(ValueError, match="history has shape"):
        DynamicsStore().load_state_dict(bad)


def assert_stores_equal(a: DynamicsStore, b: DynamicsStore) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == sb[key].dtype, key
            assert torch.equal(value.nan_to_num(-7.0), sb[key].nan_to_num(-7.0)), key
        else:
            assert value == sb[key], key


def test_reserve_epochs_sets_capacity_and_keeps_history() -> None:
    store = DynamicsStore(5, initial_epochs=2)
    logits = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    batch = SampleBatch.create(
        torch.arange(5), torch.zeros(5, dtype=torch.long), logits, torch.zeros(5)
    )
    store.update(batch, epoch=1)
    store.reserve_epochs(200)
    assert store.epoch_capacity == 200 and store._epochs.numel() == 5 * 200
    assert store.history[:, 1].tolist() == [1] * 5 and store.history[:, 0].tolist() == [-1] * 5
    store.reserve_epochs(1)  # never below the recorded epochs (0 and 1)
    assert store.epoch_capacity == 2 and store.history[:, 1].tolist() == [1] * 5
    with pytest.raises(ValueError, match="num_epochs"):
        store.reserve_epochs(0)
