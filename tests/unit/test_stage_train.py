"""stages.train: eq. 1 and eq. 7 against hand-computed cases, row selection per mode, the schedule,
training and exact resume on features and images, the eval transform. Imports no sinet_cli module
(the command: tests/cli/test_train.py)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import stages.train as stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ------------------------------------------------------------------------------------- eq. 1 loss


def _grads(model, x, y, w, norm):
    model.zero_grad()
    stage.weighted_cross_entropy(model(x), y, w, norm).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_zero_weight_removes_an_image_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 1])
    norm = 5.0  # the constant normalizer: batch size x mean weight, independent of the batch's content
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    keep = torch.tensor([0, 1, 3, 4])
    with_zero = _grads(model, x, y, w, norm)
    without = _grads(model, x[keep], y[keep], w[keep], norm)
    for a, b in zip(with_zero, without):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    # the image does matter when weighted: the test could fail
    w1 = w.clone()
    w1[2] = 1.0
    assert any(not torch.allclose(a, b) for a, b in zip(_grads(model, x, y, w1, norm), without))


def test_weights_scale_loss_and_gradient_by_hand():
    # zero weights: every logit 0, p = 1/C, CE = log C and dL/db_c = sum_i w_i (1/C - [y_i = c]) / norm
    C, norm = 4, 5.0
    model = torch.nn.Linear(3, C)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    x = torch.randn(2, 3)
    y = torch.tensor([1, 2])
    w = torch.tensor([0.5, 2.0])
    loss = stage.weighted_cross_entropy(model(x), y, w, norm)
    assert loss.item() == pytest.approx((0.5 + 2.0) * math.log(C) / norm)
    loss.backward()
    expected = torch.tensor([2.5 / C, 2.5 / C - 0.5, 2.5 / C - 2.0, 2.5 / C]) / norm
    torch.testing.assert_close(model.bias.grad, expected)
    # weight 2 on an image == the image twice with weight 1
    torch.manual_seed(1)
    m = torch.nn.Linear(3, C)
    g2 = _grads(m, x[:1], y[:1], torch.tensor([2.0]), norm)
    g11 = _grads(m, x[[0, 0]], y[[0, 0]], torch.tensor([1.0, 1.0]), norm)
    for a, b in zip(g2, g11):
        torch.testing.assert_close(a, b)


def test_soft_cross_entropy_of_weighted_one_hot_rows_is_eq1():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.rand(6)
    t = stage.hard_targets(y.numpy(), w.numpy())
    dense = stage.dense_targets(torch.from_numpy(t.index), torch.from_numpy(t.value), 5)
    torch.testing.assert_close(stage.soft_cross_entropy(logits, dense, 3.0), stage.weighted_cross_entropy(logits, y, w, 3.0))


def test_loss_normalizer_is_batch_size_times_mean_weight():
    t = stage.hard_targets(np.array([0, 1, 2, 0]), np.array([0.5, 1.0, 0.0, 0.5]))
    assert stage.loss_normalizer(t, 8) == pytest.approx(8 * 0.5)
    with pytest.raises(ValueError, match="zero"):
        stage.loss_normalizer(stage.hard_targets(np.array([0, 1]), np.zeros(2)), 8)


# ------------------------------------------------------------------------------- eq. 7 and modes


def test_eq7_per_class_weights_by_hand():
    g = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    protos = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    pclass = np.array([0, 1, 1])  # class 1 has two prototypes: the nearest counts
    t = stage.soft_targets(g, np.array([0, 1]), protos, pclass, 3, alpha=1.2, beta=1.5)
    dense = t.dense(3)
    d10 = math.dist((1, 0), (0.6, 0.8))  # image 0 to class 1's nearer prototype
    expected = np.array([[1.2**1.5, (1.2 - d10) ** 1.5, 0.0], [(1.2 - math.sqrt(2)) * 0 + 0.0, 1.2**1.5, 0.0]])
    # image 1 is sqrt(2) > alpha from class 0: max(0, .) = 0; class 2 has no prototype: 0
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-6)
    # mix = 1 leaves only eq. 6's weight on the label: eq. 1
    np.testing.assert_allclose(
        stage.soft_targets(g, np.array([1, 1]), protos, pclass, 3, mix=1.0).dense(3),
        [[0, (1.2 - d10) ** 1.5, 0], [0, 1.2**1.5, 0]], rtol=1e-5, atol=1e-6)
    # keep=1: only each image's largest class weight (plus the label's share when mixing)
    kept = stage.soft_targets(g, np.array([0, 1]), protos, pclass, 3, keep=1).dense(3)
    np.testing.assert_allclose(kept, [[1.2**1.5, 0, 0], [0, 1.2**1.5, 0]], rtol=1e-5)


def test_select_rows_per_mode():
    labels = np.array([0, 1, 2, 0, 1])
    w = np.array([0.9, 0.1, 0.5, 0.0, 0.7], np.float32)
    rows, y, ww = stage.select_rows("A", labels, w)
    assert list(rows) == [0, 1, 2, 3, 4] and list(ww) == [1] * 5
    rows, y, ww = stage.select_rows("B", labels, w)  # default threshold: the median weight 0.5
    assert list(rows) == [0, 4] and list(y) == [0, 1] and list(ww) == [1, 1]
    rows, _, _ = stage.select_rows("B", labels, w, threshold=0.05)
    assert list(rows) == [0, 1, 2, 4]
    rows, y, ww = stage.select_rows("C", labels, w)
    assert list(rows) == [0, 1, 2, 3, 4] and np.allclose(ww, w)
    clean = np.array([0, 2, 2, -2, 1])  # image 3 belongs to no class
    rows, y, _ = stage.select_rows("oracle", labels, None, clean)
    assert list(rows) == [0, 1, 2, 4] and list(y) == [0, 2, 2, 1]
    with pytest.raises(ValueError, match="clean label"):
        stage.select_rows("oracle", labels, None, np.array([0, -1, 2, 0, 1]))
    with pytest.raises(ValueError, match="no image"):
        stage.select_rows("B", labels, w, threshold=0.95)


def test_topk_smoothed_targets_by_hand():
    labels = np.array([0, 2])
    t = stage.topk_smoothed_targets(labels, np.array([1.0, 0.5]), np.array([False, True]),
                                    pred_index=np.array([[1, 0], [1, 2]]), pred_prob=np.array([[0.6, 0.2], [0.3, 0.1]]),
                                    mix=0.5)
    np.testing.assert_allclose(t.dense(3), [[1.0, 0.0, 0.0], [0.0, 0.5 * 0.5 * 0.75, 0.5 * (0.5 + 0.5 * 0.25)]])


def test_lr_schedule_and_progressive_sizes():
    cfg = stage.TrainConfig(epochs=10, lr=0.1, lr_steps=(3, 6), finetune_epochs=2, finetune_size=96, image_size=64)
    lrs = [cfg.lr_at(e) for e in range(12)]
    np.testing.assert_allclose(lrs, [0.1] * 3 + [0.01] * 3 + [0.001] * 6)
    assert [cfg.size_at(e) for e in (0, 9, 10, 11)] == [64, 64, 96, 96]
    assert stage.scaled_lr_steps(100) == (30, 60, 80, 90) and stage.scaled_lr_steps(10) == (3, 6, 8, 9)


# ---------------------------------------------------------------------------- training & resume


def _blobs(n=90, d=8, c=3, seed=0):
    r = np.random.default_rng(seed)
    centers = r.normal(size=(c, d)) * 3
    y = r.integers(0, c, n)
    x = centers[y] + r.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


class Stop(Exception):
    pass


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    x, y = _blobs()
    t = stage.hard_targets(y, np.random.default_rng(1).uniform(0, 1, len(y)))
    cfg = stage.TrainConfig(epochs=5, lr=0.5, lr_steps=(2, 4), batch_size=16, seed=3)
    full = stage.train_features(x, t, 3, cfg, head="mlp", hidden=16, dropout=0.25)

    def kill_after_2(epoch, stats):
        if epoch == 2:
            raise KeyboardInterrupt

    ck = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        stage.train_features(x, t, 3, cfg, head="mlp", hidden=16, checkpoint=ck, run_key="k", on_epoch_end=kill_after_2)
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng_cpu"} <= set(state)
    assert not (tmp_path / "checkpoint.pt.partial").exists()
    resumed = stage.train_features(x, t, 3, cfg, head="mlp", hidden=16, checkpoint=ck, run_key="k")
    assert resumed.resumed_from == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # a checkpoint of other settings is not resumed
    other = stage.train_features(x, t, 3, cfg, head="mlp", hidden=16, checkpoint=ck, run_key="other")
    assert other.resumed_from == 0


def test_weighting_out_the_noise_recovers_the_clean_model():
    x, y = _blobs(n=300, seed=2)
    r = np.random.default_rng(0)
    noisy = r.random(len(y)) < 0.45
    y_noisy = np.where(noisy, (y + r.integers(1, 3, len(y))) % 3, y)
    cfg = stage.TrainConfig(epochs=6, lr=0.5, lr_steps=(4,), batch_size=32)
    runs = {
        "C": stage.hard_targets(y_noisy, (~noisy).astype(np.float32)),  # w = 0 on every noisy image
        "A": stage.hard_targets(y_noisy),
        "clean": stage.hard_targets(y),
    }
    acc = {}
    for k, t in runs.items():
        m = stage.train_features(x, t, 3, cfg, dropout=0.0).model
        pred = stage.topk_predictions(stage.predict_features(m, x), 1)[0]
        acc[k] = stage.topk_accuracy(pred, y, (1,))["top1"]  # agreement with the true labels
    assert acc["C"] > acc["A"] + 5
    assert abs(acc["C"] - acc["clean"]) <= 1


# ------------------------------------------------------------------------------------- images


def test_random_resized_crop_is_seeded_and_sized():
    img = torch.rand(3, 20, 30)
    a = stage.random_resized_crop_flip(img, 16, 0.3, torch.Generator().manual_seed(5))
    b = stage.random_resized_crop_flip(img, 16, 0.3, torch.Generator().manual_seed(5))
    c = stage.random_resized_crop_flip(img, 16, 0.3, torch.Generator().manual_seed(6))
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_padded_sampler_marks_padding_and_covers_each_image_once():
    class D(torch.utils.data.Dataset):
        def __len__(self):
            return 5

    parts = [list(stage.PaddedDistributedSampler(D(), num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    flat = parts[0] + parts[1]
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(i for i in flat if i < 5) == [0, 1, 2, 3, 4] and sum(i >= 5 for i in flat) == 1
    single = list(stage.PaddedDistributedSampler(D(), num_replicas=1, rank=0, seed=1))
    assert single == [i for pair in zip(parts[0], parts[1]) for i in pair if i < 5]


def _tiny_classifier(seed=0):
    import timm

    torch.manual_seed(seed)
    backbone = timm.create_model("test_efficientnet_gn", pretrained=False, num_classes=0)
    return stage.ImageClassifier(backbone, 3, dropout=0.25, seed=seed)


def test_images_progressive_resolution_and_resume(tmp_path):
    r = np.random.default_rng(0)
    pixels = r.integers(0, 255, (10, 28, 28), dtype=np.uint8)
    y = np.arange(10) % 3
    src = stage.ImageSource(pixels=pixels)
    cfg = stage.TrainConfig(epochs=2, finetune_epochs=1, image_size=24, finetune_size=40, lr=0.05, lr_steps=(1,),
                            batch_size=4, min_crop=0.3)
    args = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    full_model = _tiny_classifier()
    sizes: list[int] = []
    full_model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[-1]))
    full = stage.train_images(full_model, src, np.arange(10), stage.hard_targets(y), 3, cfg, **args)
    assert set(sizes[:6]) == {24} and set(sizes[6:]) == {40} and len(sizes) == 9  # 3 batches per epoch

    def kill(epoch, stats):
        if epoch == 1:
            raise KeyboardInterrupt

    ck = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        stage.train_images(_tiny_classifier(), src, np.arange(10), stage.hard_targets(y), 3, cfg, checkpoint=ck,
                           run_key="x", on_epoch_end=kill, **args)
    resumed = stage.train_images(_tiny_classifier(), src, np.arange(10), stage.hard_targets(y), 3, cfg,
                                 checkpoint=ck, run_key="x", **args)
    assert resumed.resumed_from == 1
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # evaluation at the final size through any eval transform
    idx, p = stage.predict_images_topk(resumed.model, src, np.arange(4), lambda u: (u.permute(0, 3, 1, 2).float() / 255
                                       ).expand(-1, 3, -1, -1), k=5, decode_size=40)
    assert idx.shape == (4, 5) and (idx[:, 3:] == -1).all() and np.allclose(p.sum(1), 1, atol=1e-5)


def test_eval_input_is_timms_eval_transform(tmp_path):
    # predict_images_topk feeds the model what extract-features' Preprocess gives: timm's eval
    # transform (exactly for files larger than the resize, decoded with PIL as timm does)
    import timm.data

    from stages.extract_features import Preprocess

    rng = np.random.default_rng(2)
    paths = []
    for k, (h, w) in enumerate([(90, 123), (99, 70), (80, 80), (57, 100)]):  # long sides 68.3, 70.7, 87.7
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    model = _tiny_classifier()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    size = 48
    pre = Preprocess.for_model(model.backbone, size)
    cfg = timm.data.resolve_data_config({}, model=model.backbone)
    reference = timm.data.create_transform(**{**cfg, "input_size": (3, size, size)})
    stage.predict_images_topk(model, stage.ImageSource(paths=paths), np.arange(4), pre, k=2,
                              decode_size=pre.resize, decode_interpolation=pre.interpolation)
    want = torch.stack([reference(Image.open(f).convert("RGB")) for f in paths])
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-5)
    # in-memory grayscale pixels: the batch extract-features would make of them
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    stage.predict_images_topk(model, stage.ImageSource(pixels=pixels), np.arange(3), pre, k=2, decode_size=pre.resize)
    torch.testing.assert_close(seen[1], pre(torch.from_numpy(pixels)), rtol=0, atol=1e-6)
