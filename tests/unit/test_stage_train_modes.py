"""stages.train's modes beyond weighting (docs/training-modes.md): every equation on a hand-computed
case, the batched augmentation against the per-image one, semi-supervised resume. Imports no sinet_cli
module (the commands: tests/cli/test_train_modes.py)."""

import math

import numpy as np
import pytest
import torch

import stages.train as stage
from test_stage_train import _blobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py



# ------------------------------------------------------------------------------ eq. T1-T4


def test_suspect_flags_eq_t1():
    w = np.array([0.6, 0.5, 0.9, 0.0])
    flagged = stage.suspect_flags(w, np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), flag_below=0.5)
    assert flagged.tolist() == [False, True, True, True]  # w <= 0.5; nearer prototype of class 1
    assert stage.suspect_flags(w, np.array([0, 1, 2, 2]), None, flag_below=0.0).tolist() == [False, False, False, True]


def test_probe_probabilities_are_the_folds_mean_model():
    x = np.array([[3.0, 4.0]], np.float32)  # normalized: (0.6, 0.8)
    W = np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]], np.float32)  # mean [[2, 0], [0, 1]]
    b = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)  # mean (0, 0.5)
    z = np.array([0.6 * 2, 0.8 * 1 + 0.5])
    np.testing.assert_allclose(stage.probe_probabilities(x, W, b), [np.exp(z) / np.exp(z).sum()], rtol=1e-6)
    np.testing.assert_allclose(stage.prototype_probabilities(np.array([[1.0, 3.0], [0.0, 0.0]])),
                               [[0.25, 0.75], [0.0, 0.0]])


def test_relabel_suggestions_eq_t2():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    s, q = stage.relabel_suggestions(p, np.array([0, 2, 0]))
    assert s.tolist()[:2] == [1, 0]  # the likeliest class other than the label (ties: the first)
    np.testing.assert_allclose(q, [0.3 / 0.5, 0.1 / 0.2, 0.0], rtol=1e-6)  # all mass on the label: 0


def test_corrected_targets_eq_t3_soft_and_hard():
    y = np.array([0, 1, 2, 0])
    w = np.array([0.9, 0.2, 0.1, 0.3], np.float32)
    flagged = np.array([False, True, True, True])
    s = np.array([1, 0, 2, 2])
    q = np.array([0.9, 0.8, 0.9, 0.4], np.float32)
    # row 0 not flagged; row 1 corrected to 0; row 2's suggestion is its label; row 3 not confident
    soft, fixed = stage.corrected_targets(y, w, flagged, s, q, min_confidence=0.5, soft=True)
    assert fixed.tolist() == [False, True, False, False]
    np.testing.assert_allclose(soft.dense(3), [[0.9, 0, 0], [0.8 * 0.8, 0.2, 0], [0, 0, 0.1], [0.3, 0, 0]], rtol=1e-6)
    hard, _ = stage.corrected_targets(y, w, flagged, s, q, min_confidence=0.5, soft=False)
    np.testing.assert_allclose(hard.dense(3), [[0.9, 0, 0], [0.8, 0, 0], [0, 0, 0.1], [0.3, 0, 0]], rtol=1e-6)
    # w above 1 (eq. 6 weights reach 1.2^1.5): the soft doubt is 1 - min(1, w) = 0
    big, _ = stage.corrected_targets(np.array([0]), np.array([1.3]), np.array([True]), np.array([1]),
                                     np.array([0.9]), soft=True)
    np.testing.assert_allclose(big.dense(2), [[1.0, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        stage.corrected_targets(y, w, flagged, s, q, min_confidence=1.5)


def test_conditional_confidence_eq_t2c():
    q = np.array([0.3, 0.2, 0.5, 0.4, 0.3], np.float32)
    r = np.array([0.6, 0.0, 0.4, np.nan, np.inf])  # E5 unclipped: r = 0, above 1, NaN and inf (a foreign label)
    # 0.3 / 0.6; no chance of a wrong label: 0; 0.5 / 0.4 clipped to 1; NaN counts as 0; inf as r = 1
    np.testing.assert_allclose(stage.conditional_confidence(q, r), [0.5, 0.0, 1.0, 0.0, 0.3], rtol=1e-6)


def test_cleaned_targets_eq_t3c_keep_relabel_drop():
    y = np.array([0, 1, 2, 0, 1])
    flagged = np.array([False, True, True, True, True])
    s = np.array([1, 0, 2, 2, 2])
    c = np.array([0.9, 0.6, 0.9, 0.4, 0.0], np.float32)
    # row 0 kept at full weight whatever its suggestion; row 1 relabeled to 0; row 2's suggestion is its
    # label, row 3 not confident, row 4 outside every class (confidence 0): dropped
    t, fixed = stage.cleaned_targets(y, flagged, s, c, min_confidence=0.5)
    assert fixed.tolist() == [False, True, False, False, False]
    np.testing.assert_allclose(t.dense(3), [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    t0, fixed0 = stage.cleaned_targets(y, flagged, s, c, min_confidence=0.0)  # row 3 now relabeled; row 4 never
    assert fixed0.tolist() == [False, True, False, True, False]
    np.testing.assert_allclose(t0.dense(3)[3], [0, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        stage.cleaned_targets(y, flagged, s, c, min_confidence=-0.1)


def test_distribution_targets_eq_t3d():
    P = np.array([[0.5, 0.3, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.4]])
    y = np.array([0, 1, 3])
    w = np.array([0.6, 0.2, 1.2], np.float32)
    t = stage.distribution_targets(y, w, P).dense(4)
    # image 0: doubt 0.4 over classes 1, 2, 3 as 0.3 : 0.1 : 0.1; image 1: P all on the label, the
    # doubt is dropped; image 2: w > 1, no doubt
    np.testing.assert_allclose(t, [[0.6, 0.4 * 0.6, 0.4 * 0.2, 0.4 * 0.2], [0, 0.2, 0, 0], [0, 0, 0, 1.2]], rtol=1e-6)
    kept = stage.distribution_targets(y[:1], w[:1], P[:1], keep=1).dense(4)  # the likeliest other class only
    np.testing.assert_allclose(kept, [[0.6, 0.4, 0, 0]], rtol=1e-6)


def test_graph_neighbours_and_targets_eq_t4():
    S = np.array([[1, .2, .5, .1], [.2, 1, .3, .3], [.5, .3, 1, .4], [.1, .3, .4, 1]])
    nb = stage.graph_neighbours(S, 2)
    assert nb.tolist() == [[2, 1], [2, 3], [0, 3], [2, 1]]  # the tie in row 1 by class index
    assert stage.graph_neighbours(S, 9).shape == (4, 3)
    y = np.array([0, 1, 0])
    w = np.array([0.6, 1.5, 0.5], np.float32)
    cw = np.array([[1.0, 0.2, 0.6, 0.0], [0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    t = stage.graph_targets(y, w, cw, nb).dense(4)
    # image 0: doubt 0.4 over N(0) = {2, 1} in proportion 0.6 : 0.2; image 1: w > 1, no doubt;
    # image 2: its neighbours have eq. 7 weight 0, the doubt is dropped
    np.testing.assert_allclose(t, [[0.6, 0.4 * 0.25, 0.4 * 0.75, 0], [0, 1.5, 0, 0], [0.5, 0, 0, 0]], rtol=1e-6)
    allowed = stage.neighbour_classes(np.array([3]), nb)
    assert allowed.tolist() == [[3, 2, 1]]
    idx, p = stage.topk_predictions(np.log(np.array([[0.4, 0.1, 0.2, 0.3]])), 2, allowed)
    assert idx.tolist() == [[3, 2]]  # class 0 (the likeliest) is not a neighbour of label 3
    np.testing.assert_allclose(p, [[0.3, 0.2]], rtol=1e-6)


def test_eq7_class_weights_by_hand():
    g = np.array([[1.0, 0.0]], np.float32)
    protos = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    w = stage.prototype_class_weights(g, protos, np.array([0, 1]), 2, alpha=1.5, beta=2.0)
    np.testing.assert_allclose(w, [[1.5**2, (1.5 - math.sqrt(2)) ** 2]], rtol=1e-5)


def test_transition_matrix_eq_f1_and_forward_loss_eq_f2():
    P = np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    T = stage.transition_matrix(P, np.array([0, 1, 1]), 2, hard=False)
    # soft: C = [[0.8, 0.6 + 0.1], [0.2, 0.4 + 0.9]], rows normalized
    np.testing.assert_allclose(T, [[0.8 / 1.5, 0.7 / 1.5], [0.2 / 1.5, 1.3 / 1.5]], rtol=1e-6)
    # hard: image 0 and 1 count in row 0 (labels 0, 1), image 2 in row 1 (label 1)
    np.testing.assert_allclose(stage.transition_matrix(P, np.array([0, 1, 1]), 2), [[0.5, 0.5], [0.0, 1.0]])
    P3 = np.array([[1.0, 0, 0], [0.5, 0, 0.5], [0, 1.0, 0]])
    y3 = np.array([0, 2, 1])
    np.testing.assert_allclose(stage.transition_matrix(P3, y3, 3, hard=False),
                               [[1 / 1.5, 0, 0.5 / 1.5], [0, 1, 0], [0, 0, 1]], rtol=1e-6)
    # over S_t neighbours: class 0's labels may not go to class 2 (N(0) = {1})
    nb = np.array([[1], [0], [1]])
    np.testing.assert_allclose(stage.transition_matrix(P3, y3, 3, nb, hard=False), np.eye(3), rtol=1e-6)
    # a class no image belongs to keeps the identity row
    np.testing.assert_allclose(stage.transition_matrix(np.array([[1.0, 0, 0]]), np.array([1]), 3),
                               [[0, 1, 0], [0, 1, 0], [0, 0, 1]])
    Tt = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    loss = stage.forward_loss(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), Tt, 2.0)
    assert loss.item() == pytest.approx(-math.log(0.5 * 0.2 + 0.5 * 0.7) / 2.0)
    # the identity transition is eq. 1
    logits = torch.randn(3, 2)
    tg = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 1.0]])
    torch.testing.assert_close(stage.forward_loss(logits, tg, torch.eye(2), 3.0), stage.soft_cross_entropy(logits, tg, 3.0))


# ------------------------------------------------------------------------------ eq. S1-S6


def test_fixmatch_loss_eq_s1_by_hand():
    logits_weak = torch.tensor([[0.0, 0.0], [math.log(19.0), 0.0]])  # row 1: q = (0.95, 0.05)
    logits_strong = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75): CE(pseudo 0) = log 4
    targets = torch.tensor([[0.5, 0.0], [0.0, 0.0]])  # row 0 labeled, w = 0.5 on class 0
    u = torch.tensor([0.0, 1.0])
    loss, passed = stage.fixmatch_loss(logits_weak, logits_strong, targets, u, lambda_u=2.0, confidence=0.9, norm=3.0)
    assert loss.item() == pytest.approx((0.5 * math.log(2) + 2.0 * math.log(4)) / 3.0)
    assert int(passed) == 1
    loss, passed = stage.fixmatch_loss(logits_weak, logits_strong, targets, u, lambda_u=2.0, confidence=0.99, norm=3.0)
    assert loss.item() == pytest.approx(0.5 * math.log(2) / 3.0) and int(passed) == 0
    # the pseudo-label carries no gradient into the weak view: only the labeled row's CE does
    lw = logits_weak.clone().requires_grad_(True)
    stage.fixmatch_loss(lw, logits_strong, targets, u, lambda_u=2.0, confidence=0.9, norm=3.0)[0].backward()
    assert torch.equal(lw.grad[1], torch.zeros(2))


def test_sharpen_refine_and_mixup_eq_s2_to_s5():
    guess = stage.label_guess(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))
    np.testing.assert_allclose(guess.numpy(), [[(0.5 + 0.75) / 2, (0.5 + 0.25) / 2]], rtol=1e-6)
    np.testing.assert_allclose(stage.sharpen(torch.tensor([[0.8, 0.2]]), 0.5).numpy(), [[0.64 / 0.68, 0.04 / 0.68]],
                               rtol=1e-6)
    guess = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    targets = torch.tensor([[0.6, 0.0], [0.0, 0.0]])  # row 0 labeled with w = 0.6, row 1 unlabeled
    t = stage.mixmatch_targets(guess, targets, torch.tensor([0.0, 1.0]), 0.5)
    # row 0: 0.6 * (1, 0) + 0.4 * (0.5, 0.5) = (0.8, 0.2), sharpened; row 1: the guess, sharpened
    np.testing.assert_allclose(t.numpy(), [[0.64 / 0.68, 0.04 / 0.68], [0.36 / 0.52, 0.16 / 0.52]], rtol=1e-6)
    x, tt = stage.mixup(torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0.25,
                        torch.tensor([1, 0]))
    np.testing.assert_allclose(x.numpy(), [[1.5], [2.5]])  # l' = max(0.25, 0.75)
    np.testing.assert_allclose(tt.numpy(), [[0.75, 0.25], [0.25, 0.75]])


def test_mixmatch_loss_eq_s6_by_hand():
    mixed = torch.tensor([[0.75, 0.25], [0.25, 0.75], [1.0, 0.0]])
    u = torch.tensor([0.0, 1.0, 0.0])
    valid = torch.tensor([1.0, 1.0, 0.0])  # row 2 is padding: in no term
    prior = torch.tensor([0.5, 0.5])
    loss, lx, lu = stage.mixmatch_loss(torch.zeros(3, 2), mixed, u, valid, prior, lambda_u=4.0, labeled_norm=2.0,
                                       unlabeled_norm=0.5)
    # p = (0.5, 0.5): L_x = log 2 / 2; L_u = ((0.25^2 + 0.25^2) / 2) / 0.5; R = 0
    assert lx.item() == pytest.approx(math.log(2) / 2)
    assert lu.item() == pytest.approx(0.0625 / 0.5)
    assert loss.item() == pytest.approx(math.log(2) / 2 + 4.0 * 0.125)
    logits = torch.tensor([[math.log(4.0), 0.0]] * 2 + [[0.0, 9.0]])  # valid rows p = (0.8, 0.2)
    loss, lx, lu = stage.mixmatch_loss(logits, mixed, u, valid, prior, lambda_u=0.0, labeled_norm=1.0,
                                       unlabeled_norm=1.0)
    reg = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert loss.item() == pytest.approx(lx.item() + reg, rel=1e-5)


def test_semi_config_defaults_and_checks():
    assert stage.SemiConfig("fixmatch").lambda_u == 1.0 and stage.SemiConfig("mixmatch").lambda_u == 25.0
    assert stage.SemiConfig("fixmatch").views == ("weak", "strong")
    assert stage.SemiConfig("mixmatch").params()["sharpen_temperature"] == 0.5
    with pytest.raises(ValueError):
        stage.SemiConfig("pseudo")
    with pytest.raises(ValueError):
        stage.SemiConfig("fixmatch", confidence=1.5)
    m = stage.MixMatch(stage.hard_targets(np.zeros(4, int)), np.zeros(4, bool), 4, 2,
                       stage.SemiConfig("mixmatch", rampup=0.2), epochs=10, seed=0)
    assert [m.lambda_u_at(e) for e in (0, 1, 5)] == [12.5, 25.0, 25.0]  # over 2 of 10 epochs


# ------------------------------------------------------------------------------ augmentation


def test_batched_crop_equals_the_per_image_resize_inside_the_crop():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 28, 28)
    same = stage.crop_flip_batch(img, torch.tensor([[0.0, 0.0, 28.0, 28.0, 0.0]]), 28)
    torch.testing.assert_close(same, img, rtol=0, atol=1e-6)  # the whole image at its size: itself
    flipped = stage.crop_flip_batch(img, torch.tensor([[0.0, 0.0, 28.0, 28.0, 1.0]]), 28)
    torch.testing.assert_close(flipped, img.flip(-1), rtol=0, atol=1e-6)
    for seed in range(4):  # enlarged crops: bilinear at the same points, away from the crop border
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        a = stage.random_resized_crop_flip(img[0], 28, 0.3, g1)
        params = torch.tensor([stage.crop_flip_params(28, 28, 0.3, g2)], dtype=torch.float32)
        b = stage.crop_flip_batch(img, params, 28)[0]
        torch.testing.assert_close(a[:, 3:-3, 3:-3], b[:, 3:-3, 3:-3], rtol=0, atol=1e-5)


def test_strong_augmentation_ops_by_hand():
    x = torch.full((1, 3, 20, 20), 0.4)
    x[..., 10:, :] = 0.8
    ident = stage.STRONG_OPS.index("identity")

    def params(op, m, sign, side=0.0):
        return torch.tensor([[float(stage.STRONG_OPS.index(op)), m, sign, float(ident), 0.0, 1.0, 0.5, 0.5, side]])

    torch.testing.assert_close(stage.apply_strong(x, params("identity", 0.7, 1.0)), x)
    torch.testing.assert_close(stage.apply_strong(x, params("brightness", 0.5, 1.0)), (x * 1.45).clamp(0, 1))
    solar = stage.apply_strong(x, params("solarize", 0.3, 1.0))  # pixels >= 0.7 invert
    assert solar[0, 0, 0, 0].item() == pytest.approx(0.4) and solar[0, 0, 15, 0].item() == pytest.approx(0.2)
    cut = stage.apply_strong(x, params("identity", 0.0, 1.0, side=0.5))  # a 10 x 10 grey square in the middle
    assert int((cut[0, 0] == 0.5).sum()) == 100 and cut[0, 0, 5:15, 5:15].eq(0.5).all()
    ramp = torch.arange(20.0).view(1, 1, 1, 20).expand(1, 3, 20, 20) / 20
    shifted = stage.apply_strong(ramp, params("translate_x", 1 / 3, 1.0))  # 0.2 normalized = 2 pixels
    torch.testing.assert_close(shifted[..., :18], ramp[..., 2:], rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    p = stage.strong_params(g)
    assert p.shape == (9,) and 0 <= p[8] <= 0.5 and torch.equal(p, stage.strong_params(torch.Generator().manual_seed(3)))


def test_pixel_batches_draw_what_train_images_draws(tmp_path):
    r = np.random.default_rng(0)
    pixels = np.tile(np.linspace(0, 240, 28).astype(np.uint8), (6, 28, 1))  # smooth: the filters barely differ
    pixels = np.ascontiguousarray(pixels + r.integers(0, 3, pixels.shape, dtype=np.uint8))
    t = stage.hard_targets(np.arange(6) % 2)
    u = np.array([0, 1, 0, 1, 1, 0], bool)
    ds = stage.TrainImages(stage.ImageSource(pixels=pixels), np.arange(6), t, (0.5,) * 3, (0.5,) * 3, 0.4, 7,
                           ("weak", "strong"), u)
    ds.set_epoch(3, 24)
    batch = stage.PixelBatches(ds, "cpu").batch([4, 1, 6 + 2])  # 6 + 2: padding of image 2
    for k, i in enumerate([4, 1, 8]):
        item = ds[i]
        torch.testing.assert_close(batch["p2"][k], item["p2"])
        assert batch["t_value"][k].item() == item["t_value"].item() and batch["valid"][k] == item["valid"]
        assert batch["unlabeled"][k] == item["unlabeled"]
        assert (batch["x"][k] - item["x"])[:, 2:-2, 2:-2].abs().max() < 0.02  # the same crop and flip
    assert batch["valid"].tolist() == [1, 1, 0] and batch["unlabeled"].tolist() == [1, 1, 0]
    b = stage.finish_views(batch, ("weak", "strong"), (0.5,) * 3, (0.5,) * 3, "cpu")
    assert b.x.shape == b.x2.shape == (3, 3, 24, 24) and b.x.min() >= -1 and b.x.max() <= 1


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("method", ["fixmatch", "mixmatch"])
def test_semi_supervised_features_resume_exactly(tmp_path, method):
    x, y = _blobs(n=120, d=8, c=3, seed=3)
    u = np.random.default_rng(1).random(120) < 0.4
    t = stage.hard_targets(y, np.where(u, 0.0, 1.0))
    cfg = stage.TrainConfig(epochs=3, lr=0.5, lr_steps=(2,), batch_size=32, seed=2)
    semi = stage.SemiConfig(method, confidence=0.6)
    full = stage.train_features(x, t, 3, cfg, head="mlp", hidden=8, semi=semi, unlabeled=u)

    class Stop(Exception):
        pass

    def stop(epoch, stats):
        if epoch == 2:
            raise Stop

    ck = tmp_path / "ck.pt"
    with pytest.raises(Stop):
        stage.train_features(x, t, 3, cfg, head="mlp", hidden=8, semi=semi, unlabeled=u, checkpoint=ck, run_key="k",
                             on_epoch_end=stop)
    resumed = stage.train_features(x, t, 3, cfg, head="mlp", hidden=8, semi=semi, unlabeled=u, checkpoint=ck,
                                   run_key="k")
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    key = "pseudo_labeled" if method == "fixmatch" else "loss_u"
    assert all(key in h for h in full.history)
    if method == "fixmatch":
        assert full.history[-1]["pseudo_labeled"] > 0  # separable blobs: confident pseudo-labels


def test_fixmatch_with_every_image_labeled_is_eq1():
    # nothing unlabeled: eq. S1 reduces to eq. 1 on the weak views
    logits = torch.randn(4, 3)
    targets = stage.dense_targets(torch.tensor([[0], [1], [2], [0]]), torch.tensor([[0.5], [1.0], [0.2], [1.0]]), 3)
    loss, passed = stage.fixmatch_loss(logits, torch.zeros(0, 3), targets, torch.zeros(4), lambda_u=1.0,
                                       confidence=0.0, norm=2.7)
    torch.testing.assert_close(loss, stage.soft_cross_entropy(logits, targets, 2.7))
    assert int(passed) == 0
