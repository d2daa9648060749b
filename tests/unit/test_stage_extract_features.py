"""stages.extract_features on synthetic inputs: weight loading (by order, by name, no pickle), batch-norm
folding and SAME padding by hand, preprocessing against timm's eval transform on decoded files. Imports
no sinet_cli module (the command, and the stage on the embedded demo images: tests/cli/test_extract_features.py)."""

import numpy as np
import pytest
import torch

import stages.extract_features as stage


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
