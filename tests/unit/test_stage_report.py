"""stages.report: per-class noise, the Otsu threshold, nearest classes, extremes, histograms, flagged
and worst rows, the summary's numbers and the config, all by hand. Imports no sinet_cli module (the
report and summary commands: tests/cli/test_report.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stages import report as stage


def test_class_noise_by_hand():
    # class 0: 4 train rows, weights 0, 0.5, 0, 1.0 -> 2 low at threshold 0; clean: one flipped,
    #          one unknown (-1) -> true 1/3
    # class 1: 3 train rows, weights 0.2, 0.05, 0.9 -> 0 low at 0, 2 low at 0.2; clean: one
    #          open-set (-2) -> true 1/3
    # class 2: no train rows (its row is val) -> NaN
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    weight = np.array([0.0, 0.5, 0.0, 1.0, 0.2, 0.05, 0.9, 0.0])
    clean = np.array([0, 1, -1, 0, 1, -2, 1, 2])
    train = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    n = stage.class_noise(labels, weight, 3, 0.0, clean, train)
    assert n.n_train.tolist() == [4, 3, 0]
    assert n.n_low.tolist() == [2, 0, 0]
    assert n.estimated[:2].tolist() == [0.5, 0.0] and np.isnan(n.estimated[2])
    assert n.n_known.tolist() == [3, 3, 0]
    assert n.n_noisy.tolist() == [1, 1, 0]
    assert np.allclose(n.true[:2], [1 / 3, 1 / 3]) and np.isnan(n.true[2])
    n2 = stage.class_noise(labels, weight, 3, 0.2, clean, train)
    assert n2.n_low.tolist() == [2, 2, 0]  # w <= 0.2 counts
    est, true = stage.overall_rates(n2)
    assert est == pytest.approx(4 / 7) and true == pytest.approx(2 / 6)
    assert stage.noise_order(n2).tolist() == [1, 0, 2]  # 2/3 > 1/2, empty class last
    assert stage.class_noise(labels, weight, 3).true.tolist().count(None) == 0
    with pytest.raises(ValueError, match="label outside"):
        stage.class_noise(labels, weight, 2)


def test_otsu_threshold_by_hand():
    # two groups at 0 and 1: the first cut that separates them is after bin 0 of 256
    assert stage.otsu_threshold(np.array([0, 0, 0, 1, 1, 1.0])) == 1 / 256
    # groups around 0.1 and 0.8 (the max): the cut falls between them, and the rule splits them exactly
    w = np.r_[np.full(30, 0.1), np.full(10, 0.12), np.full(50, 0.7), np.full(10, 0.8)]
    t = stage.otsu_threshold(w)
    assert 0.12 <= t < 0.7
    assert stage.is_low_weight(w, t).sum() == 40
    assert stage.otsu_threshold(np.full(5, 0.3)) == 0.0
    n = stage.class_noise(np.array([0, 0, 1, 1]), np.array([0.0, 1.0, 0.0, 0.0]), 2, 0.0,
                          np.array([1, 0, 1, -1]))
    assert stage.rule_quality(n) == (pytest.approx(1 / 2), pytest.approx(1 / 1))  # low & known: 2, noisy: 1


def test_nearest_classes_by_hand():
    S = np.array([
        [1.0, 0.2, 0.9, 0.5],
        [0.2, 1.0, 0.3, 0.3],
        [0.9, 0.3, 1.0, 0.1],
        [0.5, 0.3, 0.1, 1.0],
    ])
    idx, sim = stage.nearest_classes(S, 3)
    assert idx.tolist() == [[2, 3, 1], [2, 3, 0], [0, 1, 3], [0, 1, 2]]  # ties (class 1: 0.3, 0.3) by index
    assert sim[0].tolist() == [0.9, 0.5, 0.2]
    idx2, _ = stage.nearest_classes(S, 10)
    assert idx2.shape == (4, 3)  # never more than C-1, never itself
    # the partitioned path for large C agrees with a full stable sort
    rng = np.random.default_rng(1)
    big = rng.integers(0, 6, (300, 300)).astype(np.float32)
    got, _ = stage.nearest_classes(big, 3)
    s = big.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    assert (got == np.argsort(-s, axis=1, kind="stable")[:, :3]).all()


def test_extremes_quantiles_histogram_focus():
    labels = np.array([0, 0, 0, 1, 1, 0])
    weight = np.array([0.0, 0.3, 0.0, 0.1, 0.2, 0.9])
    distance = np.array([1.5, 0.9, 1.9, 1.1, 1.0, 0.2])
    train = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    sus = stage.extremes_per_class(labels, weight, [0, 1], 2, secondary=-distance, rows=train)
    assert [s.tolist() for s in sus] == [[2, 0], [3, 4]]  # weight 0 first, the farther of the two first
    typ = stage.extremes_per_class(labels, distance, [0], 5, rows=train)
    assert typ[0].tolist() == [1, 0, 2]  # row 5 is not train
    q = stage.class_quantiles(weight, labels, np.array([0, 1, 2]), (0.25, 0.5))
    assert np.allclose(q[0], np.quantile(weight[labels == 0], [0.25, 0.5]))
    assert np.allclose(q[1], np.quantile(weight[labels == 1], [0.25, 0.5]))
    assert np.isnan(q[2]).all()
    edges, counts = stage.weight_histogram(np.array([0.0, 0.0, 0.5, 1.0]), bins=2, upper=1.0)
    assert edges.tolist() == [0.0, 0.5, 1.0] and counts.tolist() == [2, 2]
    _, g = stage.weight_histogram(np.array([0.0, 0.0, 0.5, 1.0]), 2, 1.0, groups=np.array([0, 1, 1, 1]))
    assert g.tolist() == [[1, 0], [1, 2]]
    near = np.array([[1, 2], [0, 2], [1, 0], [0, 1]])
    assert stage.focus_classes(np.array([3, 2, 0, 1]), near, 3).tolist() == [3, 0, 1]
    assert stage.focus_classes(np.array([2, 3]), near, 10).tolist() == [2, 1, 0, 3]


def test_flagged_per_class_and_worst_rows_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    flagged = np.array([1, 0, 1, 1, 0, 1])
    train = np.array([True, True, True, False, True, True])
    assert stage.flagged_per_class(labels, flagged, 4, train).tolist() == [1, 1, 1, 0]
    assert stage.flagged_per_class(labels, flagged, 3).tolist() == [1, 2, 1]
    weight = np.array([0.5, 0.0, 0.0, np.nan, 0.2, 0.0])
    distance = np.array([0.1, 1.5, 1.9, 0.0, 0.3, 1.5])
    # w 0 first, the farthest (1.9) before the two at 1.5 (row order), then 0.2, 0.5; NaN (unscored) last
    assert stage.worst_rows(weight, distance, 10).tolist() == [2, 1, 5, 4, 0, 3]
    assert stage.worst_rows(weight, distance, 2, flagged.astype(bool)).tolist() == [2, 5]
    assert stage.worst_rows(weight, distance, 0).tolist() == []
    assert stage.find_rows(np.array(["b", "a", "c"]), np.array(["c", "x", "b"])).tolist() == [2, -1, 0]


def test_report_config_params_as_recorded():
    # report.json's params before the config existed: existing pages stay up to date
    assert stage.ReportConfig().params() == {"low_weight": "auto", "max_classes": 50, "per_class": 8,
                                             "thumb_size": 48, "top_suspects": 50}
    assert stage.ReportConfig(low_weight="Q0.20").low_weight == "q0.2"
    assert stage.ReportConfig(low_weight="0.1").params()["low_weight"] == 0.1
    for kwargs, message in (({"low_weight": "q2"}, "--low-weight 'q2'"), ({"thumb_size": 4}, "--thumb-size 4"),
                            ({"per_class": -1}, "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            stage.ReportConfig(**kwargs)


def test_summary_numbers_by_hand():
    # class 0: 2 train rows, 1 flagged; class 1: 3 train rows, 3 flagged; class 2: 1 train row, 0 flagged
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    train = np.array([1, 1, 1, 1, 1, 1, 0], dtype=bool)
    flagged = np.array([1, 0, 1, 1, 1, 0, 1])
    order, n_train, counts = stage.noisiest_classes(labels, train, 3, flagged)
    assert order.tolist() == [1, 0, 2] and n_train.tolist() == [2, 3, 1] and counts.tolist() == [1, 3, 0]
    order, _, _ = stage.noisiest_classes(labels, train, 3, None, np.array([0.2, np.nan, 0.2]))
    assert order.tolist() == [0, 2, 1]  # tie by more training images; NaN last
    runs = {"A": {"mode": "A", "top1": 70.0, "top5": 90.0, "seed": 0, "n_train": 5},
            "A-s1": {"mode": "A", "top1": 72.0, "top5": 92.0, "seed": 1, "eval_labels": "labels"},
            "oracle": {"mode": "oracle", "top1": 80.0, "top5": 99.0, "seed": 0},
            "B": {"mode": "B", "skipped": "no val split"},
            "C-img": {"mode": "C", "on": "images", "top1": 60.0, "top5": 85.0}}
    acc = stage.accuracies(runs)
    assert [a.model for a in acc] == ["A", "C (images)", "oracle"]
    assert acc[0].top1 == [70.0, 72.0] and acc[0].seeds == [0, 1] and acc[0].eval_labels == {"clean_labels", "labels"}
