"""The CUDA paths against the CPU's: skipped without a GPU (CI has none; bench/device_check.sh runs
this file on a lent GPU machine). One test runs only without a GPU: --device cuda is refused."""

import h5py
import faiss
import numpy as np
import pytest
import torch

from stages import extract_features as fe
from stages import make_prototypes as mp
from stages import score_noise as sn
from test_stage_extract_features import _tf_style_model
from test_stage_make_prototypes import blobs, source_of
from test_score_noise import make_features, make_prototypes_artifact, read_scores

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in the products (torch's default for matmul; cuDNN's convs allow it by default)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _noisy_blobs(n=900, C=6, D=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((C, D)).astype(np.float32) * 1.5
    y = rng.integers(0, C, n)
    x = (centers[y] + rng.standard_normal((n, D))).astype(np.float32)
    noisy = np.where(rng.random(n) < 0.3, rng.integers(0, C, n), y)
    return x, noisy, C


@cuda
def test_fit_probe_on_cuda_takes_the_cpus_steps():
    x, y, C = _noisy_blobs()
    rows = np.arange(len(y)) * 3  # positions in a larger file
    cpu = sn.fit_probe(x, y, rows, C, folds=3, epochs=4)
    gpu = sn.fit_probe(x, y, rows, C, folds=3, epochs=4, device="cuda")
    np.testing.assert_array_equal(gpu.sample_rows, cpu.sample_rows)
    np.testing.assert_array_equal(gpu.sample_fold, cpu.sample_fold)
    # Adam divides by sqrt(v): round-off differences grow a little over the steps
    np.testing.assert_allclose(gpu.W, cpu.W, atol=2e-3)
    np.testing.assert_allclose(gpu.b, cpu.b, atol=2e-3)
    p_cpu = sn.probe_label_probability(cpu, x, y, rows)
    np.testing.assert_allclose(sn.probe_label_probability(cpu, x, y, rows, device="cuda"), p_cpu, atol=1e-5)
    np.testing.assert_allclose(sn.probe_label_probability(gpu, x, y, rows), p_cpu, atol=1e-3)
    # the reweighted two rounds and the thresholds
    d = np.linalg.norm(x / np.linalg.norm(x, axis=1, keepdims=True), axis=1) * 0.5
    pc, tc = sn.fit_reweighted_probe(x, y, rows, C, d, folds=3, epochs=4)
    pg, tg = sn.fit_reweighted_probe(x, y, rows, C, d, folds=3, epochs=4, device="cuda")
    np.testing.assert_allclose(pg.W, pc.W, atol=3e-3)
    np.testing.assert_allclose(tg, tc, atol=1e-6)


@cuda
@pytest.mark.parametrize("index_kind", ["flat_ip", "flat_l2", "hnsw"])
def test_score_block_on_cuda_matches_the_cpu(index_kind):
    rng = np.random.default_rng(1)
    C, D, n = 7, 64, 5000
    V = rng.standard_normal((2 * C, D)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    pc = np.arange(2 * C) % C
    if index_kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(D) if index_kind == "flat_ip" else faiss.IndexFlatL2(D)
    index.add(V)
    x16 = rng.standard_normal((n, D)).astype(np.float16)
    y = rng.integers(0, C, n)
    y[3] = -1  # unknown label: NaN distance, weight 0
    sample = np.sort(rng.choice(n, 40, replace=False))
    probe = sn.Probe(W=rng.standard_normal((3, D, C)).astype(np.float32),
                     b=rng.standard_normal((3, C)).astype(np.float32), sample_rows=sample,
                     sample_fold=np.arange(40) % 3)
    slots = sn.class_slots(pc, C)
    a = sn.score_block(x16, y, V, slots, pc, index, probe=probe, rows=np.arange(n))
    b = sn.score_block(x16, y, V, slots, pc, index, probe=probe, rows=np.arange(n), device="cuda")
    np.testing.assert_allclose(b.distance, a.distance, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(b.weight, a.weight, atol=1e-5)
    np.testing.assert_allclose(b.nearest_distance, a.nearest_distance, atol=1e-5)
    assert (b.nearest_class == a.nearest_class).mean() > 0.999  # ties within round-off may differ
    np.testing.assert_allclose(b.label_probability, a.label_probability, atol=1e-5)
    assert np.isnan(b.distance[3]) and b.weight[3] == 0


@cuda
def test_score_noise_command_on_cuda_gives_the_cpus_scores(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 600)
    make_prototypes_artifact(tmp_path)
    scores = {}
    for device in ("cpu", "cuda"):
        code, _, err = sinet("score-noise", "--out", tmp_path, "--force", "--device", device, "--probe-rows", "400")
        assert code == 0, err
        scores[device], _, det = read_scores(tmp_path)
        scores[device]["detection"] = det
        with h5py.File(tmp_path / "scores.h5", "r") as f:
            assert f.attrs["device"] == device
    a, b = scores["cpu"], scores["cuda"]
    np.testing.assert_array_equal(b["ids"], a["ids"])
    np.testing.assert_allclose(b["distance"], a["distance"], atol=1e-5)
    np.testing.assert_allclose(b["weight"], a["weight"], atol=2e-3)  # a probe fitted on each device
    assert abs(b["detection"]["weight"]["roc_auc"] - a["detection"]["weight"]["roc_auc"]) < 0.005


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_score_noise_refuses_cuda_without_a_gpu(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 50)
    make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--device", "cuda")
    assert code != 0 and "CUDA is not available" in err
    assert not (tmp_path / "scores.h5").exists()


@cuda
def test_make_prototypes_on_cuda_matches_the_cpu(rng):
    x, _, noisy, _ = blobs(rng)
    C = 4
    S = np.eye(C, dtype=np.float32) * 2
    # each step from the same inputs: the same up to round-off
    ca, _ = mp.fit_linear_probe(x, noisy, C, epochs=2)
    cb, _ = mp.fit_linear_probe(x, noisy, C, epochs=2, device="cuda")
    np.testing.assert_allclose(cb, ca, atol=1e-3)
    V0 = np.stack([x[noisy == c].mean(0) for c in range(C)])
    pa = mp.consistency_scores(source_of(x, 64), noisy, V0, S)  # eq. 4
    pb = mp.consistency_scores(source_of(x, 64), noisy, V0, S, device="cuda")
    np.testing.assert_allclose(pb, pa, rtol=2e-3)
    k = mp.resolve_k(0.5, np.bincount(noisy, minlength=C))
    va, sa = mp.prototypes_from_consistency(source_of(x, 64), noisy, pa, C, k)  # eq. 5
    vb, sb = mp.prototypes_from_consistency(source_of(x, 64), noisy, pa, C, k, device="cuda")
    np.testing.assert_array_equal(sb, sa)
    np.testing.assert_allclose(vb, va, atol=1e-5)
    # the whole stage: a near tie at a top-k border may fall either way on each device
    a = mp.make_prototypes(source_of(x, 64), noisy, S)
    b = mp.make_prototypes(source_of(x, 64), noisy, S, device="cuda")
    assert (a.selected == b.selected).mean() > 0.95
    assert (np.sum(a.prototypes * b.prototypes, 1) > 0.999).all()


@cuda
def test_preprocess_on_cuda_is_within_two_uint8_levels_of_the_cpu():
    from sinet_cli.datasets import load_demo

    std = (0.229, 0.224, 0.225)
    gray = torch.from_numpy(load_demo(noise="none").pixels[:32])
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 100, 131, 3), dtype=np.uint8))
    for interpolation in ("bilinear", "bicubic"):
        for size, resize in ((64, 73), (224, 256)):
            pre = fe.Preprocess(size=size, resize=resize, mean=(0.485, 0.456, 0.406), std=std,
                                interpolation=interpolation)
            for batch in (gray, rgb):
                a, b = pre(batch), pre(batch.cuda()).cpu()
                assert (a - b).abs().max() <= 2 / 255 / min(std) + 1e-5
                assert (a - b).abs().mean() < 0.05 / 255 / min(std)


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_static_padding_and_folding_on_cuda_keep_the_features(channels_last):
    torch.manual_seed(0)
    model = _tf_style_model()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gpu_model = model.to("cuda").to(memory_format=fmt)
    x = torch.randn(8, 3, 48, 48, device="cuda").contiguous(memory_format=fmt)
    net, done = fe.prepare_for_inference(gpu_model, x[:2])
    assert done["same_convs_static"] == 5 and done["batch_norms_folded"] > 0
    assert not any(type(m).__name__ == "Conv2dSame" for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(fe._pooled(net, x), fe._pooled(gpu_model, x), rtol=1e-4, atol=1e-5)


@cuda
def test_extraction_on_cuda_matches_the_cpu():
    from sinet_cli.datasets import load_demo

    model = _tf_style_model()
    pre = fe.Preprocess.for_model(model, 32)
    demo = load_demo(noise="none")
    kw = dict(pixels=demo.pixels, positions=np.arange(48), batch_size=16)
    cpu = np.concatenate([b.features for b in fe.extract(model, pre, **kw)])
    for static in (False, True):  # padded as timm does, and static (the default)
        gpu = np.concatenate([b.features for b in fe.extract(model, pre, device="cuda", static_padding=static, **kw)])
        # the GPU resizes in float (within 2 uint8 levels of the CPU's uint8 kernel)
        assert np.abs(gpu - cpu).max() < 5e-3 and (gpu * cpu).sum(1).min() > 0.9999
        model = model.cpu()
