"""DDP on CPU (gloo, 2 processes): identical weights on every rank, and the same weighted loss and
weights as one process on the same data (padding carries zero weight, the loss is an exact sum),
for eq. 1 and for the semi-supervised FixMatch mode (eq. S1)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import stages.train as stage

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

N, C = 7, 3  # 7 images on 2 ranks: one zero-weight padding sample


def _train(semi: str | None = None) -> stage.TrainResult:
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet_gn", pretrained=False, num_classes=0)  # GroupNorm: no batch stats
    model = stage.ImageClassifier(backbone, C, dropout=0.0, seed=0)
    r = np.random.default_rng(0)
    pixels = r.integers(0, 255, (N, 28, 28), dtype=np.uint8)
    w = r.uniform(0.1, 1.0, N)  # unequal weights
    unlabeled = None
    if semi is not None:  # images 1, 4, 5 are unlabeled (their weight goes to zero)
        unlabeled = np.isin(np.arange(N), [1, 4, 5])
        w = np.where(unlabeled, 0.0, w)
    targets = stage.hard_targets(np.arange(N) % C, w)
    cfg = stage.TrainConfig(epochs=2, lr=0.1, lr_steps=(1,), batch_size=4, image_size=32, min_crop=0.3, seed=5)
    return stage.train_images(model, stage.ImageSource(pixels=pixels), np.arange(N), targets, C, cfg,
                              mean=(0.5,) * 3, std=(0.25,) * 3,
                              semi=None if semi is None else stage.SemiConfig(semi, confidence=0.0),
                              unlabeled=unlabeled)


def _worker(rank: int, world: int, init_file: str, out_dir: str, semi: str | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = _train(semi)
        torch.save({"state": res.model.state_dict(), "loss": [h["loss"] for h in res.history]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["loss"] == r1["loss"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train()
    finally:
        torch.set_num_threads(n)
    np.testing.assert_allclose(r0["loss"], [h["loss"] for h in single.history], rtol=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_fixmatch_matches_one_process_and_mixmatch_ranks_agree(tmp_path):
    # FixMatch (eq. S1) is a sum over images with a constant normalizer: two ranks give the
    # single-process run (every pseudo-label counts: tau = 0). MixMatch mixes within each rank's
    # share of the batch, so only the ranks' agreement is exact.
    for semi in ("fixmatch", "mixmatch"):
        out = tmp_path / semi
        out.mkdir()
        mp.spawn(_worker, args=(2, str(out / "init"), str(out), semi), nprocs=2, join=True)
        r0 = torch.load(out / "rank0.pt", weights_only=True)
        r1 = torch.load(out / "rank1.pt", weights_only=True)
        for k in r0["state"]:
            assert torch.equal(r0["state"][k], r1["state"][k]), (semi, k)
        if semi == "fixmatch":
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                single = _train(semi)
            finally:
                torch.set_num_threads(n)
            np.testing.assert_allclose(r0["loss"], [h["loss"] for h in single.history], rtol=1e-5)
            for k, v in single.model.state_dict().items():
                torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_matches_a_single_process_run(tmp_path, sinet):
    (tmp_path / "img").mkdir()
    rows = ["id\tpath\tlabel\tsplit"]
    r = np.random.default_rng(1)
    for i in range(9):
        Image.fromarray(r.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"i{i}\timg/{i}.png\t{'ab'[i % 2]}\t{'val' if i >= 7 else 'train'}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    args = ["train", "--on", "images", "--mode", "A", "--data", f"manifest:{tmp_path / 'm.tsv'}", "--backbone",
            "test_efficientnet_gn", "--random-init", "--image-size", "24", "--epochs", "2", "--batch-size", "4",
            "--dropout", "0", "--workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    p = subprocess.run([sys.executable, *launcher, "-m", "sinet_cli", *args, "--out", str(tmp_path / "ddp")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = sinet(*args, "--out", tmp_path / "single")
    finally:
        torch.set_num_threads(n)
    assert code == 0, err
    runs = {}
    for name in ("ddp", "single"):
        runs[name] = json.loads((tmp_path / name / "train-A" / "metrics.json").read_text())
        runs[name]["state"] = torch.load(tmp_path / name / "train-A" / "model.pt", weights_only=True)
    np.testing.assert_allclose([h["loss"] for h in runs["ddp"]["history"]],
                               [h["loss"] for h in runs["single"]["history"]], rtol=1e-5)
    for k, v in runs["single"]["state"].items():
        torch.testing.assert_close(runs["ddp"]["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert runs["ddp"]["top1"] == runs["single"]["top1"]
