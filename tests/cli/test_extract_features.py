"""extract-features: the command (resume, shards, errors) and the stage on the embedded demo images,
which load through sinet_cli.datasets (the stage on synthetic inputs: tests/unit/test_stage_extract_features.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stages.extract_features as stage
from sinet_cli import store
from sinet_cli.datasets import load_demo
from test_stage_extract_features import _tf_style_model

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
