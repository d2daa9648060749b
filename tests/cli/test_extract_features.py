import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stages.extract_features as stage
from sinet_cli import store
from sinet_cli.datasets import load_demo

TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32"]


@pytest.fixture
def manifest(tmp_path):
    """24 real demo images as JPEG files, 3 classes, plus a class table."""
    demo = load_demo(noise="none")
    rows = ["id\tpath\tlabel\tsplit\tclean_label"]
    for k, c in enumerate([0, 1, 7]):
        for j, i in enumerate(np.flatnonzero(demo.labels == c)[:8]):
            f = tmp_path / "img" / f"{c}_{j}.jpg"
            f.parent.mkdir(exist_ok=True)
            Image.fromarray(demo.pixels[i]).save(f)
            split = "val" if j == 7 else "train"
            rows.append(f"{c}_{j}\timg/{f.name}\t{k}\t{split}\t{k}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.tsv").write_text("name\tsynset\ntee\ttee_shirt.n.01\ntrouser\ttrouser.n.01\nsneaker\tsneaker.n.01\n")
    return tmp_path


def _extract(sinet, root, out, *extra):
    return sinet("extract-features", "--data", f"manifest:{root / 'm.tsv'}", "--classes", root / "classes.tsv",
                 *TINY, "--out", out, "--workers", "0", *extra)


def _read(path):
    with store.open_artifact(path, "features") as art:
        return {k: art.read(k) for k in ("ids", "labels", "features", "splits")} | {"art_params": art.params}


def test_extract_writes_normalized_features_and_skips_up_to_date(sinet, manifest, tmp_path):
    code, _, err = _extract(sinet, manifest, tmp_path / "out")
    assert code == 0, err
    f = _read(tmp_path / "out" / "features.h5")
    assert len(f["ids"]) == 24 and f["features"].shape == (24, 256)
    np.testing.assert_allclose(np.linalg.norm(f["features"].astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert sorted(set(f["splits"])) == ["train", "val"]
    code, _, err = _extract(sinet, manifest, tmp_path / "out")
    assert code == 0 and "up to date" in err


def test_corrupt_and_missing_images_are_logged_and_skipped(sinet, manifest, tmp_path):
    (manifest / "img" / "0_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (manifest / "img" / "1_2.jpg").unlink()
    code, _, err = _extract(sinet, manifest, tmp_path / "out")
    assert code == 0, err
    assert "skipped image 0_1" in err and "cannot decode" in err
    assert "skipped image 1_2" in err and "file not found" in err
    with store.open_artifact(tmp_path / "out" / "features.h5", "features") as art:
        ids = list(art.read("ids"))
        assert len(ids) == 22 and "0_1" not in ids and "1_2" not in ids
        assert sorted(art.read("skipped_ids")) == ["0_1", "1_2"]


def test_interrupted_extraction_resumes_without_redoing_chunks(sinet, manifest, tmp_path, monkeypatch):
    code, _, err = _extract(sinet, manifest, tmp_path / "full", "--batch-size", "4", "--chunk-rows", "8")
    assert code == 0, err
    full = _read(tmp_path / "full" / "features.h5")

    real_extract = stage.extract
    seen: list[int] = []

    def interrupted(*args, **kwargs):
        for k, batch in enumerate(real_extract(*args, **kwargs)):
            if k == 5:  # after 2 chunks of 8 rows were flushed (batches 0-3), mid third chunk
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(stage, "extract", interrupted)
    code, _, err = _extract(sinet, manifest, tmp_path / "part", "--batch-size", "4", "--chunk-rows", "8")
    assert code != 0 and "16 rows written; run the same command again to resume" in err
    assert not (tmp_path / "part" / "features.h5").exists()
    assert (tmp_path / "part" / "features.h5.partial").exists()

    def recording(*args, **kwargs):
        seen.extend(kwargs["positions"])
        yield from real_extract(*args, **kwargs)

    monkeypatch.setattr(stage, "extract", recording)
    code, _, err = _extract(sinet, manifest, tmp_path / "part", "--batch-size", "4", "--chunk-rows", "8")
    assert code == 0, err
    assert "resuming at image 16" in err
    assert seen == list(range(16, 24))  # the two written chunks were not redone
    part = _read(tmp_path / "part" / "features.h5")
    assert part["ids"].tolist() == full["ids"].tolist()
    np.testing.assert_array_equal(part["features"], full["features"])


def test_shards_merge_to_the_same_features(sinet, manifest, tmp_path):
    out = tmp_path / "out"
    assert _extract(sinet, manifest, out / "single")[0] == 0
    for i in range(3):
        code, _, err = _extract(sinet, manifest, out, "--shard", f"{i}/3")
        assert code == 0, err
    code, _, err = sinet("merge-features", "--shards", "3", "--out", out)
    assert code == 0, err
    merged, single = _read(out / "features.h5"), _read(out / "single" / "features.h5")
    assert merged["ids"].tolist() == single["ids"].tolist()
    np.testing.assert_allclose(merged["features"], single["features"], atol=1e-3)
    code, _, err = _extract(sinet, manifest, out, "--shard", "3/3")
    assert code == 1 and "--shard '3/3'" in err


def test_weights_load_by_order_and_by_name(tmp_path):
    model, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    sd = model.state_dict()
    renamed = {f"layer{i}": v.clone() + 1 for i, v in enumerate(sd.values())}
    torch.save(renamed, tmp_path / "renamed.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "named.pth")
    m1, info1 = stage.build_backbone("test_efficientnet", tmp_path / "renamed.pth")
    assert info1.mapping == "by-order"
    first = next(iter(m1.state_dict().values()))
    torch.testing.assert_close(first, next(iter(sd.values())) + 1)
    m2, info2 = stage.build_backbone("test_efficientnet", tmp_path / "named.pth")
    assert info2.mapping == "by-name"
    bad = dict(renamed)
    bad["layer0"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: tensor layer0"):
        stage.build_backbone("test_efficientnet", tmp_path / "bad.pth")


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weight_file_cannot_execute_code(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a loadable tensor state dict"):
        stage.read_state_dict(tmp_path / "evil.pth")


def test_no_weights_needs_explicit_random_init():
    with pytest.raises(ValueError, match="ask for random init explicitly"):
        stage.build_backbone("test_efficientnet", None)


def test_packaged_lite0_weights_give_imagenet_features():
    """The offline lite0 file maps onto timm's tf_efficientnet_lite0 and classifies like ImageNet."""
    from sinet_cli.sideinfo import default_weights

    model, info = stage.build_backbone("tf_efficientnet_lite0", default_weights("tf_efficientnet_lite0"),
                                       num_classes=0)
    assert info.mapping == "by-order" and info.feature_dim == 1280 and len(info.ignored_keys) == 2
    pre = stage.Preprocess.for_model(model, 64)
    demo = load_demo(noise="none")
    idx = np.concatenate([np.flatnonzero(demo.labels == c)[:20] for c in (1, 8)])  # trousers vs bags
    feats = np.concatenate([b.features for b in stage.extract(model, pre, pixels=demo.pixels, positions=idx)])
    sims = feats @ feats.T
    within = (sims[:20, :20].mean() + sims[20:, 20:].mean()) / 2
    across = sims[:20, 20:].mean()
    assert within > across + 0.1  # pretrained features separate real classes


def test_channels_last_gives_the_same_features_and_is_the_cpu_default():
    model, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    pre = stage.Preprocess.for_model(model, 32)
    demo = load_demo(noise="none")
    idx = np.arange(40)

    def features(**kw):
        return np.concatenate([b.features for b in stage.extract(model, pre, pixels=demo.pixels, positions=idx,
                                                                 batch_size=16, **kw)])

    contiguous = features(channels_last=False)
    assert model.conv_stem.weight.is_contiguous()
    auto = features()  # on the CPU: channels-last
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv_stem.weight.is_contiguous()
    np.testing.assert_allclose(auto, contiguous, atol=1e-5)


class _ConvBN(torch.nn.Module):
    """conv -> bn (-> conv2 when ``swapped``: conv2 is registered between them but runs last)."""

    def __init__(self, swapped: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1, bias=False)
        if swapped:
            self.conv2 = torch.nn.Conv2d(2, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.swapped = swapped
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
            self.bn.running_mean.copy_(torch.tensor([1.0, 0.5]))
            self.bn.running_var.copy_(torch.tensor([4.0, 0.25]) - self.bn.eps)
            self.bn.weight.copy_(torch.tensor([3.0, 2.0]))
            self.bn.bias.copy_(torch.tensor([0.5, -1.0]))
        self.eval()

    def forward_features(self, x):
        if self.swapped:
            return self.conv2(self.bn(self.conv(x)))
        return self.bn(self.conv(x))

    def forward_head(self, x, pre_logits=True):
        return x.flatten(1)


def test_fold_batchnorm_by_hand_and_refuses_a_wrong_order():
    # channel 0: w = 2 * 3 / sqrt(4) = 3, b = (0 - 1) * 3 / 2 + 0.5 = -1
    # channel 1: w = -1 * 2 / sqrt(.25) = -4, b = (0 - .5) * 2 / .5 - 1 = -3
    model = _ConvBN()
    x = torch.tensor([[[[1.0, -2.0]]]])
    fused, n = stage.fold_batchnorm(model, x)
    assert n == 1 and fused is not model and isinstance(fused.bn, torch.nn.Identity)
    assert fused.conv.weight.flatten().tolist() == pytest.approx([3.0, -4.0])
    assert fused.conv.bias.tolist() == pytest.approx([-1.0, -3.0])
    assert fused.forward_features(x).flatten().tolist() == pytest.approx([2.0, -7.0, -7.0, 5.0])  # 3x - 1, -4x - 3
    assert isinstance(model.bn, torch.nn.BatchNorm2d)  # the model itself is untouched
    # conv2 sits between conv and bn among the children, but the forward runs conv -> bn -> conv2:
    # conv2 -> bn is folded by child order, the check on the example catches it, the model is kept
    swapped = _ConvBN(swapped=True)
    kept, n = stage.fold_batchnorm(swapped, x)
    assert kept is swapped and n == 0
    # no conv -> batch norm pair at all (a transformer, say): the model itself, not copied
    no_bn = _ConvBN()
    no_bn.bn = torch.nn.Identity()
    assert stage.fold_batchnorm(no_bn, x) == (no_bn, 0)


def test_folded_extraction_gives_the_same_features():
    model, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    with torch.no_grad():  # batch norms with non-trivial statistics, so that folding changes the convs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    pre = stage.Preprocess.for_model(model, 32)
    demo = load_demo(noise="none")
    kw = dict(pixels=demo.pixels, positions=np.arange(40), batch_size=16, channels_last=False)
    plain = np.concatenate([b.features for b in stage.extract(model, pre, fold_bn=False, **kw)])
    folded = np.concatenate([b.features for b in stage.extract(model, pre, **kw)])
    np.testing.assert_allclose(folded, plain, atol=1e-5)
    x = pre(torch.from_numpy(demo.pixels[:8]))
    assert stage.fold_batchnorm(model, x)[1] > 0


def test_preprocess_by_hand():
    # no resize (2 -> 2): x / 255 = [[0, 1], [.2, .4]], then (x - mean_c) / std_c per channel
    pre = stage.Preprocess(size=2, resize=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), interpolation="bicubic")
    out = pre(torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8))
    assert out.shape == (1, 3, 2, 2)
    expected = [[[-2.0, 2.0], [-1.2, -0.4]], [[-1.0, 1.0], [-0.6, -0.2]], [[-0.5, 0.5], [-0.3, -0.1]]]
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)


def test_preprocess_of_decoded_files_skips_the_identity_resize():
    # FileImages decodes at the resize already: the resize is skipped and the crop taken on the
    # uint8 pixels; the result equals the full path (resize to the same size, then crop) exactly
    pre = stage.Preprocess(size=6, resize=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           interpolation="bicubic")
    rgb = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2).float() / 255, size=(8, 8), mode="bicubic",
                                        align_corners=False, antialias=True).clamp(0, 1)[:, :, 1:7, 1:7]
    expected = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(rgb), expected, rtol=0, atol=1e-6)


def test_preprocess_matches_timm_pil_eval_transform():
    # timm's eval transform resizes the uint8 PIL image (bicubic, antialiased), then crops and
    # normalizes; Preprocess resizes the uint8 pixels the same way (resizing in float had differed
    # by up to 0.13-0.15 in normalized units, 0.0018 on average)
    import timm.data
    from PIL import Image

    model, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    demo = load_demo(noise="none")
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(3)]  # not square: the shorter side
    for size in (32, 64):
        cfg = timm.data.resolve_data_config({"input_size": (3, size, size), "interpolation": "bicubic",
                                            "crop_pct": 0.875}, model=model)
        reference = timm.data.create_transform(**cfg)
        pre = stage.Preprocess(size=size, resize=int(np.floor(size / 0.875)), mean=tuple(cfg["mean"]),
                               std=tuple(cfg["std"]), interpolation="bicubic")
        gray = demo.pixels[:8]
        want = torch.stack([reference(Image.fromarray(p).convert("RGB")) for p in gray])
        assert (pre(torch.from_numpy(gray)) - want).abs().mean() < 5e-4
        assert (pre(torch.from_numpy(gray)) - want).abs().max() < 0.03
        want = torch.stack([reference(Image.fromarray(p)) for p in rgb])
        got = pre(torch.from_numpy(np.stack(rgb)))
        assert (got - want).abs().mean() < 5e-4 and (got - want).abs().max() < 0.03


def test_decoded_files_match_timm_eval_transform_exactly(tmp_path):
    # FileImages resizes with PIL (as timm) and cuts a square whose own centered crop is the
    # centered crop of the whole image: the same pixels as timm's Resize + CenterCrop, for
    # non-square images whose crop offsets round (torchvision rounds (W - S) / 2 half to even)
    import timm.data
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for k, (h, w) in enumerate([(30, 41), (41, 30), (37, 37), (57, 100), (64, 65)]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    for size in (32, 64):
        resize = int(np.floor(size / 0.875))
        cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 0.875,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        reference = timm.data.create_transform(**cfg)
        pre = stage.Preprocess(size=size, resize=resize, mean=cfg["mean"], std=cfg["std"], interpolation="bicubic")
        files = stage.FileImages(paths, range(len(paths)), resize, size)
        got = pre(torch.stack([files[i][0] for i in range(len(paths))]))
        want = torch.stack([reference(Image.open(f).convert("RGB")) for f in paths])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_preprocess_gray_equals_its_rgb_copy():
    # a grayscale batch is resized on its one channel: the same as the 3-channel copy of it
    pre = stage.Preprocess(size=64, resize=73, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           interpolation="bicubic")
    gray = torch.from_numpy(load_demo(noise="none").pixels[:4])
    rgb = gray.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    a, b = pre(gray), pre(rgb)
    assert a.shape == b.shape == (4, 3, 64, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[:, 0], a[:, 1])  # the channels are normalized each with its own mean / std


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_two_pass_float_resize_is_within_two_levels_of_the_uint8_kernel(mode):
    # the GPU's resize (no uint8 kernel there), run here on the CPU against the CPU's uint8 kernel
    rng = np.random.default_rng(3)
    gray = torch.from_numpy(load_demo(noise="none").pixels[:16]).unsqueeze(1)
    rgb = torch.from_numpy(rng.integers(0, 256, (4, 3, 100, 131), dtype=np.uint8))
    for x, size in ((gray, (73, 73)), (gray, (256, 256)), (rgb, (64, 83)), (rgb, (256, 335))):
        want = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).int()
        got = stage.two_pass_uint8_resize(x, size, mode)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert (got.int() - want).abs().max() <= 2 and (got.int() - want).abs().float().mean() < 0.05
    # one float resize, unrounded between its passes, is not: a bicubic's overshoot is kept
    if mode == "bicubic":
        one = F.interpolate(gray.float(), size=(256, 256), mode=mode, align_corners=False, antialias=True)
        want = F.interpolate(gray, size=(256, 256), mode=mode, align_corners=False, antialias=True)
        assert (one.round().clamp(0, 255) - want.float()).abs().max() > 8


def test_same_padding_by_hand():
    # total = max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0), the odd pixel after
    assert stage.same_padding(112, 3, 2) == (0, 1)  # 55 * 2 + 3 - 112 = 1
    assert stage.same_padding(56, 5, 2) == (1, 2)  # 27 * 2 + 5 - 56 = 3
    assert stage.same_padding(7, 3, 2) == (1, 1)  # 3 * 2 + 3 - 7 = 2
    assert stage.same_padding(7, 3, 1) == (1, 1)
    assert stage.same_padding(8, 3, 1, dilation=2) == (2, 2)  # 7 + 4 + 1 - 8 = 4
    assert stage.same_padding(4, 1, 2) == (0, 0)


def test_static_same_conv_by_hand():
    # a 1 x 4 row, kernel 1 x 3, stride 2: SAME pads (0, 1) on the width, so
    # out[0] = w . x[0:3] = 1 * 1 + 2 * 10 + 4 * 100 = 421, out[1] = w . (x[2], x[3], 0) = 100 + 2000 = 2100
    from timm.layers import create_conv2d

    conv = create_conv2d(1, 1, (1, 3), stride=2, padding="same", bias=False)
    assert type(conv).__name__ == "Conv2dSame"
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3))
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(1, 1, 1, 4)
    static = stage.StaticSameConv2d(conv, (1, 4))
    assert static.weight.flatten().tolist() == [0.0, 1.0, 2.0, 4.0]  # one leading zero tap
    assert static.padding == (0, 1)  # symmetric: hi on both sides
    assert static(x).flatten().tolist() == [421.0, 2100.0]
    assert conv(x).flatten().tolist() == [421.0, 2100.0]
    # another width (5: SAME pads (1, 1)) takes the padded path with the original kernel
    x5 = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0]).view(1, 1, 1, 5)
    assert static(x5).flatten().tolist() == conv(x5).flatten().tolist() == [0 + 2 + 40, 10 + 200 + 4000, 1000 + 20000]


@pytest.mark.parametrize("kernel,stride,size,groups,dilation", [
    (3, 2, 12, 1, 1), (5, 2, 12, 4, 1), (3, 2, 11, 4, 1), (3, 1, 10, 1, 1), (5, 2, 9, 1, 1), (3, 1, 9, 4, 2)])
def test_static_same_conv_equals_timm_conv2d_same(kernel, stride, size, groups, dilation):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(4, 8, kernel, stride=stride, dilation=dilation, groups=groups, bias=True)
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        c = conv.to(memory_format=fmt)
        x = torch.randn(2, 4, size, size + 1).to(memory_format=fmt)
        static = stage.StaticSameConv2d(c, (size, size + 1))
        assert static.weight.is_contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(static(x), c(x), rtol=1e-5, atol=1e-5)
            y = torch.randn(2, 4, size + 3, size + 2).to(memory_format=fmt)  # another size: padded path
            torch.testing.assert_close(static(y), c(y), rtol=1e-5, atol=1e-5)


def test_static_same_conv_refuses_a_dilated_shift():
    from timm.layers import Conv2dSame

    conv = Conv2dSame(2, 2, 3, stride=2, dilation=2)  # size 8: total 3 * 2 + 5 - 8 = 3, (1, 2)
    with pytest.raises(ValueError):
        stage.StaticSameConv2d(conv, (8, 8))


def _tf_style_model():
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False, pad_type="same", num_classes=0).eval()
    with torch.no_grad():  # non-trivial batch norm statistics, as for the folding tests
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_static_same_padding_replaces_every_same_conv_and_keeps_the_features():
    model = _tf_style_model()
    n_same = sum(type(m).__name__ == "Conv2dSame" for m in model.modules())
    assert n_same > 0
    x = torch.randn(4, 3, 32, 32)
    static, n = stage.static_same_padding(model, x[:2])
    assert n == n_same and static is not model
    assert not any(type(m).__name__ == "Conv2dSame" for m in static.modules())
    assert sum(type(m).__name__ == "Conv2dSame" for m in model.modules()) == n_same  # the model is untouched
    with torch.no_grad():
        torch.testing.assert_close(stage._pooled(static, x), stage._pooled(model, x), rtol=1e-5, atol=1e-5)
        # another image size: the padded path
        y = torch.randn(2, 3, 40, 40)
        torch.testing.assert_close(stage._pooled(static, y), stage._pooled(model, y), rtol=1e-5, atol=1e-5)
    # nothing to replace: the model itself, not copied
    plain, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    assert stage.static_same_padding(plain, x[:2]) == (plain, 0)


def test_static_same_padding_refuses_a_model_that_disagrees(monkeypatch):
    model = _tf_style_model()
    x = torch.randn(2, 3, 32, 32)

    right_forward = stage.StaticSameConv2d.forward

    def wrong_forward(self, x):  # the windows one pixel off (padding on the wrong side): the check keeps the model
        return right_forward(self, x).roll(1, dims=-1)

    monkeypatch.setattr(stage.StaticSameConv2d, "forward", wrong_forward)
    kept, n = stage.static_same_padding(model, x)
    assert kept is model and n == 0
    # together with folding: the combined copy disagrees, so each step is tried on its own and
    # only the folding (whose own check passes) is kept
    net, done = stage.prepare_for_inference(model, x)
    assert done == {"batch_norms_folded": 13, "same_convs_static": 0}
    assert any(type(m).__name__ == "Conv2dSame" for m in net.modules()) and net is not model


def test_extraction_with_static_padding_gives_the_same_features(monkeypatch):
    calls = []
    real = stage.prepare_for_inference

    def spy(*a, **k):
        model, done = real(*a, **k)
        calls.append(done["same_convs_static"])
        return model, done

    monkeypatch.setattr(stage, "prepare_for_inference", spy)
    model = _tf_style_model()
    pre = stage.Preprocess.for_model(model, 32)
    demo = load_demo(noise="none")
    kw = dict(pixels=demo.pixels, positions=np.arange(40), batch_size=16)
    padded = np.concatenate([b.features for b in stage.extract(model, pre, static_padding=False, **kw)])
    assert calls == [0]
    static = np.concatenate([b.features for b in stage.extract(model, pre, **kw)])  # the default
    assert calls[1:] == [5]  # once, on the first batch: test_efficientnet's 5 stride-2 convs
    np.testing.assert_allclose(static, padded, atol=1e-5)
    x = pre(torch.from_numpy(demo.pixels[:2]))
    _, done = stage.prepare_for_inference(model, x)
    assert done["batch_norms_folded"] > 0 and done["same_convs_static"] > 0


def test_memory_format_option_is_checked(sinet, manifest, tmp_path):
    code, _, err = _extract(sinet, manifest, tmp_path / "o", "--memory-format", "nhwc")
    assert code != 0 and "--memory-format 'nhwc'" in err


def test_help_lists_commands(sinet):
    code, out, _ = sinet("--help")
    assert code == 0 and "extract-features" in out and "merge-features" in out
