"""kdfast.train.metrics: accuracy, NLL, ECE (against a hand-computed example), agreement, reliability diagram."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from kdfast.train import metrics
from kdfast.train.metrics import ClassificationMetrics


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


# Five two-class predictions; the confidence is the larger probability.
#   row  probs        label  confidence  correct  bin k: (k/15, (k+1)/15]
#   0    0.90 0.10    0      0.90        yes      13: (0.8667, 0.9333]
#   1    0.95 0.05    1      0.95        no       14: (0.9333, 1]
#   2    0.62 0.38    0      0.62        yes       9: (0.6, 0.6667]
#   3    0.30 0.70    1      0.70        yes      10: (0.6667, 0.7333]
#   4    0.35 0.65    0      0.65        no        9
# bin 9:  2 rows, acc 1/2, conf (0.62 + 0.65)/2 = 0.635 -> 2/5 * |0.5 - 0.635| = 0.054
# bin 10: 1 row,  acc 1,   conf 0.70                   -> 1/5 * 0.30            = 0.060
# bin 13: 1 row,  acc 1,   conf 0.90                   -> 1/5 * 0.10            = 0.020
# bin 14: 1 row,  acc 0,   conf 0.95                   -> 1/5 * 0.95            = 0.190
# ECE = 0.054 + 0.060 + 0.020 + 0.190 = 0.324
PROBS = [[0.90, 0.10], [0.95, 0.05], [0.62, 0.38], [0.30, 0.70], [0.35, 0.65]]
LABELS = torch.tensor([0, 1, 0, 1, 0])


def test_ece_matches_the_hand_computed_example():
    assert metrics.expected_calibration_error(_logits_of(PROBS), LABELS) == pytest.approx(0.324, abs=1e-6)


def test_ece_of_one_bin_is_the_gap_between_accuracy_and_confidence():
    # With a single bin, ECE = |accuracy - mean confidence| = |3/5 - (0.9+0.95+0.62+0.7+0.65)/5| = |0.6 - 0.764|.
    assert metrics.expected_calibration_error(_logits_of(PROBS), LABELS, n_bins=1) == pytest.approx(0.164, abs=1e-6)


def test_accuracy_nll_and_agreement():
    logits = _logits_of(PROBS)
    assert metrics.accuracy(logits, LABELS) == pytest.approx(3 / 5)
    expected_nll = -(math.log(0.9) + math.log(0.05) + math.log(0.62) + math.log(0.7) + math.log(0.35)) / 5
    assert metrics.nll(logits, LABELS) == pytest.approx(expected_nll, rel=1e-6)
    assert metrics.nll(logits, LABELS) == pytest.approx(float(F.cross_entropy(logits, LABELS)), rel=1e-6)
    teacher = _logits_of([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.1, 0.9], [0.5001, 0.4999]])
    # Top-1: student 0 0 0 1 1, teacher 1 0 0 1 0 -> 3 of 5 agree.
    assert metrics.agreement(logits, teacher) == pytest.approx(3 / 5)


def test_ignored_rows_count_in_no_metric():
    logits = torch.cat([_logits_of(PROBS), torch.randn(3, 2)])
    labels = torch.cat([LABELS, torch.full((3,), -100)])
    m = ClassificationMetrics().update(logits, labels, teacher_logits=logits).compute()
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["ece"] == pytest.approx(0.324, abs=1e-6)
    assert m["agreement"] == 1.0


def test_accumulating_batches_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)
    whole = ClassificationMetrics().update(logits, labels).compute()
    parts = ClassificationMetrics()
    for chunk in range(4):
        parts.update(logits[chunk * 16:(chunk + 1) * 16], labels[chunk * 16:(chunk + 1) * 16])
    for key, value in whole.items():
        assert parts.compute()[key] == pytest.approx(value, rel=1e-12)
    assert "agreement" not in whole


def test_sequence_logits_are_flattened_to_rows():
    logits = _logits_of(PROBS)
    assert metrics.accuracy(torch.stack([logits, logits]), torch.stack([LABELS, LABELS])) == pytest.approx(3 / 5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_bins"):
        ClassificationMetrics(n_bins=0)
    with pytest.raises(ValueError, match="does not match"):
        ClassificationMetrics().update(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_logits shape"):
        ClassificationMetrics().update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 2))
    with pytest.raises(ValueError, match="no labelled rows"):
        ClassificationMetrics().update(torch.randn(2, 3), torch.full((2,), -100)).compute()
    with pytest.raises(ValueError, match="does not match"):
        metrics.agreement(torch.randn(2, 3), torch.randn(3, 3))


def test_reliability_diagram_without_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = tmp_path / "reliability.png"
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert metrics.reliability_diagram(_logits_of(PROBS), LABELS, path) is None
    assert not path.exists()


def test_reliability_diagram_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the reliability diagram needs matplotlib")
    path = tmp_path / "reliability.png"
    assert metrics.reliability_diagram(_logits_of(PROBS), LABELS, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
