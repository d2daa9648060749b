"""`make all` on small trees in the exact Clothing1M and WebVision layouts, end to end through make;
the command lines make builds for every dataset kind; `make cron`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures_layouts import make_clothing1m, make_webvision, write_jpeg
from sinet_cli import store

REPO = Path(__file__).resolve().parents[2]
# tiny random-init backbone, 2 epochs, one training mode: seconds per stage
TINY = ["BACKBONE=test_efficientnet", "EXTRACT_OPTS=--random-init", "IMAGE_SIZE=32", "EPOCHS=2", "WORKERS=0",
        "DEVICE=cpu", "MODES=C"]
ARTIFACTS = {"features.h5": "features", "graph.h5": "graph", "prototypes.h5": "prototypes", "scores.h5": "scores"}
OUTPUTS = [*ARTIFACTS, "prototypes.faiss", "suspects.tsv", "metrics.json", "train-C/model.pt", "report/index.html"]
# the line each stage prints when its output is up to date
STAGE_FILES = ["features.h5", "graph.h5", "prototypes.h5", "scores.h5", "train-C", "report/index.html"]


def make(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """make in the repository, without the pip install steps (offline; the package is installed)."""
    full_env = {**os.environ, "CI": "1", **(env or {})}
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "-o", ".install.stamp",
                           "-o", ".install-run.stamp", *args],
                          env=full_env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"make {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done



def mtimes(art: Path) -> dict[str, int]:
    return {name: (art / name).stat().st_mtime_ns for name in OUTPUTS}


def check_outputs(art: Path, n_rows: int) -> None:
    for name in OUTPUTS:
        assert (art / name).is_file(), f"{name} missing"
    for name, kind in ARTIFACTS.items():
        with store.open_artifact(art / name, kind) as a:  # valid against its schema
            if name in ("features.h5", "scores.h5"):
                assert a.dims["N"] == n_rows, name


def assert_all_up_to_date(done: subprocess.CompletedProcess, art: Path) -> None:
    err = done.stderr
    for name in STAGE_FILES:
        assert f"{art / name}: up to date" in err, f"{name} was rebuilt:\n{err}"


@pytest.mark.slow
def test_make_all_clothing1m_then_up_to_date_then_only_stale_stages_then_cron(tmp_path):
    c1m = make_clothing1m(tmp_path / "clothing1m")
    art = tmp_path / "c1m"
    args = ["all", "DATASET=clothing1m", f"DATA_ROOT={c1m['root']}", f"ART={art}", *TINY]
    first = make(*args)
    n = len(c1m["noisy_train"]) + len(c1m["clean_train"]) + len(c1m["val"]) + len(c1m["test"])
    check_outputs(art, n)
    # the packaged class table: descriptions where given, WordNet for the classes that have a synset
    with store.open_artifact(art / "graph.h5", "graph") as g:
        source = dict(zip(g.read("classes"), g.read("description_source")))
        assert int(g.read("hierarchy_known").sum()) == 14  # 3 classes placed under their WordNet parent
    assert source["Chiffon"] == "user" and source["Shirt"] == "wordnet"
    assert "ROC-AUC" in first.stdout  # the summary table
    # paper table 8 by default: clean prototypes, weighted training on the noisy set, clean fine-tuning
    with store.open_artifact(art / "prototypes.h5", "prototypes") as p:
        assert p.params["prototypes_from"] == "clean" and p.dims["N"] == len(c1m["clean_train"])
    m = json.loads((art / "train-C" / "metrics.json").read_text())
    assert m["train_subset"] == "noisy" and m["n_train"] == len(c1m["noisy_train"])
    assert m["finetune"]["subset"] == "clean" and m["finetune"]["n_train"] == len(c1m["clean_train"])
    before = mtimes(art)

    second = make(*args)
    assert_all_up_to_date(second, art)
    assert mtimes(art) == before

    # a changed score-noise parameter reruns score-noise only
    third = make("scores", *args[1:], "ALPHA=1.0")
    assert all(f"{art / f}: up to date" in third.stderr for f in ("features.h5", "graph.h5", "prototypes.h5"))
    assert f"{art / 'scores.h5'}: up to date" not in third.stderr
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert s.params["alpha"] == 1.0
    assert {k: v for k, v in mtimes(art).items() if k not in ("scores.h5", "suspects.tsv")} == {
        k: v for k, v in before.items() if k not in ("scores.h5", "suspects.tsv")}

    # cron: two newly crawled images in the Clothing1M lists are extracted and scored, nothing else
    root, ann = c1m["root"], c1m["ann"]
    new = [f"images/9/99/{k}.jpg" for k in (5000, 5001)]
    for k, rel in enumerate(new):
        write_jpeg(root / rel, 500 + k)
    with open(ann / "noisy_label_kv.txt", "a") as f:
        f.writelines(f"{rel} {k}\n" for k, rel in enumerate(new))
    with open(ann / "noisy_train_key_list.txt", "a") as f:
        f.writelines(f"{rel}\n" for rel in new)
    cron = make("cron", f"ART={art}", f"NEW=clothing1m:{root}", "WORKERS=0", "DEVICE=cpu")
    assert "appended 2 new images" in cron.stderr and "scoring 2 new" in cron.stderr, cron.stderr
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert s.dims["N"] == n + 2 and set(s.read("ids")[-2:]) == set(new)
        assert s.params["alpha"] == 1.0  # scored with the options scores.h5 was made with


@pytest.mark.slow
def test_make_all_webvision_then_up_to_date(tmp_path):
    wv = make_webvision(tmp_path / "webvision")
    art = tmp_path / "wv"
    args = ["all", "DATASET=webvision", f"DATA_ROOT={wv['root']}", f"ART={art}", "SOURCES=wordnet", *TINY,
            ]
    make(*args)
    check_outputs(art, len(wv["train"]) + len(wv["val"]))
    with store.open_artifact(art / "features.h5", "features") as f:
        assert set(f.read("splits")) == {"train", "val"}
        assert "side_text" in f  # per-query JSON metadata read
    before = mtimes(art)
    second = make(*args)
    assert_all_up_to_date(second, art)
    assert mtimes(art) == before


def dry(*args: str, env: dict | None = None) -> str:
    return make("-n", *args, env=env).stdout


@pytest.mark.parametrize("kind, root", [
    ("clothing1m", "/d/c1m"), ("webvision", "/d/wv"), ("mini-webvision", "/d/wv"),
    ("manifest", "/d/crawl.tsv"), ("imagefolder", "/d/crawl"),
])
def test_make_all_command_lines_for_each_dataset_kind(kind, root):
    out = dry("all", f"DATASET={kind}", f"DATA_ROOT={root}", env={"DATA": "/some/unrelated/path"})
    art = f"artifacts/{kind}"
    for command in ("build-graph", "extract-features", "make-prototypes", "score-noise", "train", "summary", "report",
                    "export"):
        assert f"-m sinet_cli {command} " in out, command
    # graph, features, train, export (an environment DATA is ignored)
    assert out.count(f"--data {kind}:{root} ") == 4
    assert out.count(f"--out {art}") == 8
    # the summary comes last: what a run ends with
    assert out.index("sinet_cli report ") < out.index("sinet_cli export ") < out.index("sinet_cli summary ")
    assert "for mode in A B C correct ;" in out  # no oracle: true labels of the training images are not known
    assert "--hierarchy auto" in out and "--lenient" not in out  # Clothing1M needs no workaround
    assert "--classes" not in out


def test_make_variables_reach_the_commands():
    out = dry("all", "DATASET=manifest", "DATA_ROOT=/d/crawl.tsv", "CLASSES=/d/classes.tsv", "ART=/tmp/a",
              "ALPHA=0.9", "BETA=2", "SCORE=paper", "GAMMA=3", "PER_CLASS=2", "IMAGE_SIZE=96", "SEEDS=0 1", "MODES=C",
              "LOW_WEIGHT=q0.2", "TAXONOMY=/d/tax.tsv", "GRAPH_OPTS=--show 3", "DEVICE=cuda:1")
    assert out.count("--classes /d/classes.tsv") == 3
    # every command with a device gets it: extract, prototypes, score-noise, train
    assert "--beta 2 --device cuda:1" in out and out.count("--device cuda:1") >= 4
    for flag in ("--score paper --alpha 0.9 --beta 2", "--gamma 3", "--per-class 2", "--image-size 96", "--low-weight q0.2",
                 "--taxonomy /d/tax.tsv", "--show 3", "--hierarchy auto", "for seed in 0 1", "--suffix seed$seed"):
        assert flag in out, flag
    demo = dry("demo")
    assert "--data demo " in demo and "--out artifacts/demo" in demo and "for mode in A B C correct oracle;" in demo


def test_make_stops_early_without_a_dataset_path_or_a_crawl():
    done = make("features", "DATASET=clothing1m", check=False)
    assert done.returncode == 2 and "DATA_ROOT=PATH" in done.stderr and "sinet_cli" not in done.stdout
    done = make("cron", "ART=/tmp/nowhere", check=False)
    assert done.returncode == 2 and "NEW=imagefolder:DIR" in done.stderr
    out = dry("cron", "ART=artifacts/shop", "NEW=imagefolder:/data/incoming", "WAIT=30")
    assert "-m sinet_cli rescore --data imagefolder:/data/incoming  --out artifacts/shop --wait 30" in out


def test_build_graph_on_clothing1m_with_the_default_hierarchy(tmp_path, sinet):
    """The packaged Clothing1M table gives three classes a WordNet parent instead of a synset:
    build-graph places each one edge below its parent, so all 14 classes have hierarchy relations."""
    c1m = make_clothing1m(tmp_path / "c1m")
    code, _, err = sinet("build-graph", "--data", f"clothing1m:{c1m['root']}", "--sources", "wordnet",
                         "--out", tmp_path / "art")
    assert code == 0, err
    with store.open_artifact(tmp_path / "art" / "graph.h5", "graph") as g:
        assert int(g.read("hierarchy_known").sum()) == 14
        names, S_w = list(g.read("classes")), g.read("S_w")
    # Hoodie sits under sweatshirt.n.01: nearer to Sweater than to Shawl
    assert S_w[names.index("Hoodie"), names.index("Sweater")] > S_w[names.index("Hoodie"), names.index("Shawl")]


def test_make_all_installs_without_dev_extras_and_make_test_with_them(tmp_path):
    """Two install stamps: `make all` needs the package only, `make test` the dev extras too; a run
    install never satisfies `make test`, a current dev install satisfies `make all`. PY=echo
    prints the pip command lines instead of running them."""
    import shutil
    import time

    def fresh(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in ("Makefile", "pyproject.toml"):
            shutil.copy(REPO / f, d / f)
        old = time.time() - 100
        os.utime(d / "pyproject.toml", (old, old))
        return d

    def run(d: Path, target: str) -> str:
        done = subprocess.run(["make", "--no-print-directory", "-C", str(d), target, "PY=echo"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    d = fresh("run-first")
    out = run(d, "install")
    assert "-m pip install -q -e ." in out and "[dev]" not in out
    assert "pip" not in run(d, "install")  # stamped
    out = run(d, "test")
    assert "-m pip install -q -e .[dev]" in out and "-m pytest -q" in out  # the run install is not enough
    d = fresh("dev-first")
    assert "[dev]" in run(d, "install-dev")
    assert "pip" not in run(d, "install")  # the dev install already holds everything `make all` needs
