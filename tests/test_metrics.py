"""Continual-learning metrics on hand-computed accuracy matrices."""

import math

import pytest

from procl import metrics

# zero-shot row, then after tasks 1, 2, 3
R = [
    [0.10, 0.20, 0.30],
    [0.80, 0.25, 0.35],
    [0.60, 0.90, 0.40],
    [0.50, 0.70, 0.95],
]


def test_average_accuracy_is_the_mean_of_the_last_row_over_seen_tasks():
    assert metrics.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert metrics.average_accuracy(R[:3]) == pytest.approx((0.60 + 0.90) / 2)  # "so far", after task 2


def test_average_incremental_accuracy():
    aa = [0.80, (0.60 + 0.90) / 2, (0.50 + 0.70 + 0.95) / 3]
    assert metrics.average_incremental_accuracy(R) == pytest.approx(sum(aa) / 3)


def test_backward_transfer():
    assert metrics.backward_transfer(R) == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)
    assert metrics.backward_transfer(R[:2]) == 0.0


def test_learning_accuracy_and_backward_transfer_split_average_accuracy():
    assert metrics.learning_accuracy(R) == pytest.approx((0.80 + 0.90 + 0.95) / 3)
    k = 3
    assert metrics.average_accuracy(R) == pytest.approx(metrics.learning_accuracy(R) + metrics.backward_transfer(R) * (k - 1) / k)


def test_forgetting_uses_the_best_earlier_score():
    assert metrics.forgetting(R) == pytest.approx(((0.80 - 0.50) + (0.90 - 0.70)) / 2)
    assert metrics.forgetting_per_task(R) == pytest.approx([0.30, 0.20])
    rising = [[0, 0], [0.5, 0.1], [0.7, 0.9]]  # task 1 improved after task 2: nothing forgotten
    assert metrics.forgetting(rising) == pytest.approx(-0.2)


def test_forward_transfer_against_the_zero_shot_row():
    assert metrics.forward_transfer(R) == pytest.approx(((0.25 - 0.20) + (0.40 - 0.30)) / 2)
    unscored = [[0.1, 0.2], [0.8, math.nan], [0.6, 0.9]]
    assert math.isnan(metrics.forward_transfer(unscored))


def test_summary_has_every_metric():
    assert set(metrics.summary(R)) == {
        "average_accuracy", "average_incremental_accuracy", "learning_accuracy", "backward_transfer", "forgetting",
        "forward_transfer",
    }


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.1, 0.2]], "at least one trained row"),
        ([[0.1], [0.2], [0.3]], "2 trained rows but only 1 tasks"),
        ([[0.1, math.nan], [0.5, 0.2]], "NaN where a score must exist"),
        ([0.1, 0.2], "2-D"),
    ],
)
def test_bad_matrices_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        metrics.average_accuracy(bad)


def test_paired_bootstrap_interval_brackets_the_mean_and_excludes_zero_only_for_a_consistent_gain():
    consistent = [0.04, 0.05, 0.03, 0.06, 0.04, 0.05]
    mean, low, high = metrics.paired_bootstrap_interval(consistent)
    assert mean == pytest.approx(0.045) and 0.03 <= low < mean < high <= 0.06
    mixed = [0.10, -0.08, 0.02, -0.05, 0.07, -0.06]
    _, low, high = metrics.paired_bootstrap_interval(mixed)
    assert low < 0 < high
    assert metrics.paired_bootstrap_interval([0.02]) == (0.02, 0.02, 0.02)  # one chain: no spread to resample
    with pytest.raises(ValueError, match="at least one paired difference"):
        metrics.paired_bootstrap_interval([])
