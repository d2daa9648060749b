"""``sinet report`` and ``sinet summary`` on synthetic artifacts, a C=2000 size bound, and the page opened
in headless Chromium (stages.report by hand: tests/unit/test_stage_report.py)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sinet_cli import store

# the bound stated in the README: a page of 5,000 classes with the defaults stays under 10 MB
PAGE_BOUND = 10 * 2**20


# -- synthetic artifacts -----------------------------------------------------------------------


def write_synthetic(folder: Path, C: int, per_class: int, *, paths: list[str] | None = None, names=None,
                    provenance: dict | None = None, ids=None, seed: int = 0, metrics: bool = True,
                    graph_dtype=np.float32, truth: bool = True, side_text: list[str] | None = None,
                    scores_extra: dict | None = None, scores_attrs: dict | None = None,
                    graph_attrs: dict | None = None) -> dict:
    """graph/features/prototypes/scores artifacts of C classes with per_class train rows each
    plus one val row per class; class c has a true noise share growing with c.

    ``truth=False``: a crawl without clean labels (no clean_labels, no detection attribute).
    ``scores_extra``: more scores.h5 datasets, per-row ones given in features.h5 row order.
    ``side_text`` and ``scores_extra`` may be functions of the returned truth."""
    rng = np.random.default_rng(seed)
    names = names or [f"class {c:04d}" for c in range(C)]
    n_tr = C * per_class
    labels = np.r_[np.repeat(np.arange(C), per_class), np.arange(C)]
    n = len(labels)
    split = np.array(["train"] * n_tr + ["val"] * C)
    clean = labels.copy()
    flip = rng.random(n_tr) < (np.repeat(np.arange(C), per_class) % 5) / 10  # 0..40 % noise
    clean[:n_tr][flip] = (labels[:n_tr][flip] + 1) % C
    distance = np.where(np.r_[flip, np.zeros(C, bool)], rng.uniform(1.0, 1.6, n), rng.uniform(0.2, 1.3, n))
    weight = np.maximum(0, 1.2 - distance) ** 1.5
    nearest = np.where(distance > 1.2, (labels + 1) % C, labels)
    ids = ids if ids is not None else np.array([f"img-{i:06d}" for i in range(n)])
    result = {"labels": labels, "weight": weight, "distance": distance, "clean": clean, "split": split, "ids": ids,
              "names": names, "nearest": nearest}
    D = 4
    feats = rng.normal(size=(n, D)).astype(np.float16)
    S_w = rng.random((C, C)).astype(graph_dtype)
    S_w = (S_w + S_w.T) / 2
    S_l = rng.random((C, C)).astype(graph_dtype)
    S_l = (S_l + S_l.T) / 2
    graph_fp = store.write_artifact(folder / "graph.h5", "graph",
                                    {"classes": names, "S_w": S_w, "S_l": S_l, "S_t": S_w + S_l},
                                    {"sources": ["synthetic"]}, {"classes": "x"}, graph_attrs)
    fdata = {"ids": ids, "labels": labels, "features": feats, "classes": names, "splits": split}
    if truth:
        fdata["clean_labels"] = clean
    if side_text is not None:
        fdata["side_text"] = side_text(result) if callable(side_text) else side_text
    if paths is not None:
        fdata["paths"] = paths
    attrs = {"dataset_provenance": provenance} if provenance else None
    feat_fp = store.write_artifact(folder / "features.h5", "features", fdata, {"backbone": "synthetic"},
                                   {"dataset": "y"}, attrs)
    proto_fp = store.write_artifact(folder / "prototypes.h5", "prototypes", {
        "classes": names, "prototypes": rng.normal(size=(C, D)).astype(np.float32),
        "prototype_class": np.arange(C), "initial_prototypes": np.zeros((C, D), np.float32),
        "ids": ids[:n_tr], "consistency": rng.random(n_tr).astype(np.float32)},
        {"topk": 0.5}, {"features": feat_fp, "graph": graph_fp})
    # scores.h5 without splits/clean labels/paths: the report takes them from features.h5 by id
    order = rng.permutation(n)  # and in another row order than features.h5
    result["order"] = order
    if callable(scores_extra):
        scores_extra = scores_extra(result)
    sdata = {"ids": ids[order], "labels": labels[order], "weight": weight[order].astype(np.float32),
             "distance": distance[order].astype(np.float32), "nearest_class": nearest[order],
             "nearest_distance": distance[order].astype(np.float32), "classes": names}
    for key, value in (scores_extra or {}).items():
        value = np.asarray(value)
        sdata[key] = value[order] if len(value) == n else value
    attrs = dict(scores_attrs or {})
    if truth:
        attrs["detection"] = {"weight": {"roc_auc": 0.9, "average_precision": 0.8, "noise_rate": 0.2, "rows": n_tr}}
    store.write_artifact(folder / "scores.h5", "scores", sdata, {"alpha": 1.2, "beta": 1.5},
                         {"features": feat_fp, "prototypes": proto_fp}, attrs)
    if metrics:
        store.write_json(folder / "metrics.json", {"train": {
            "C": {"mode": "C", "on": "features", "seed": 0, "top1": 81.0, "top5": 97.25, "n_train": n_tr,
                  "eval_labels": "clean_labels"},
            "A": {"mode": "A", "on": "features", "seed": 0, "top1": 74.5, "top5": 95.0, "n_train": n_tr,
                  "eval_labels": "clean_labels"}}})
    return result


def image_tags(text: str) -> list[str]:
    return re.findall(r"<img [^>]*>", text)


def decode_images(text: str) -> list:
    from PIL import Image

    out = []
    for src in re.findall(r'src="data:image/png;base64,([^"]+)"', text):
        out.append(Image.open(io.BytesIO(base64.b64decode(src))))
    return out


def test_report_small(tmp_path, sinet):
    from PIL import Image

    rng = np.random.default_rng(0)
    C, per = 4, 6
    n = C * per + C
    paths = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        if i != 3:  # row 3 is missing: a placeholder, not an error
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    names = ["cat", "dog <b>&", "fox", "owl"]  # markup in a name must be escaped
    art = tmp_path / "art"
    truth = write_synthetic(art, C, per, paths=paths, names=names)
    code, out, err = sinet("report", "--out", art, "--per-class", 3, "--max-classes", 2, "--low-weight", "0",
                           "--top-suspects", 5)
    assert code == 0, err
    page = art / "report" / "index.html"
    text = page.read_text()
    for name in ("noise-rate.png", "weights.png", "weights-by-class.png", "S_t.png", "S_w.png", "S_l.png"):
        assert (art / "report" / name).stat().st_size > 1000
    assert "dog &lt;b&gt;&amp;" in text and "dog <b>" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing external
    imgs = decode_images(text)
    # 6 plots + 5 top suspects + 2 classes x (3 suspect + 3 typical)
    assert len(imgs) == len(image_tags(text)) == 6 + 5 + 2 * (2 * 3)
    assert sum(im.size[0] <= 48 and im.size[1] <= 48 for im in imgs) == 5 + 12  # the thumbnails
    # the per-class numbers against the truth written above
    train = truth["split"] == "train"
    lab, w = truth["labels"][train], truth["weight"][train]
    tsv = [line.split("\t") for line in (art / "report" / "classes.tsv").read_text().splitlines()[1:]]
    by_name = {r[0]: r for r in tsv}
    for c, name in enumerate(names):
        est = np.mean(w[lab == c] <= 0)
        tru = np.mean(truth["clean"][train][lab == c] != c)
        assert float(by_name[name][3]) == pytest.approx(est, abs=1e-4)
        assert float(by_name[name][4]) == pytest.approx(tru, abs=1e-4)
    # the noisiest class's suspects are its lowest-weight train rows
    worst = tsv[0][0]
    c = names.index(worst)
    rows = np.flatnonzero(train & (truth["labels"] == c))
    expect = rows[np.lexsort((-truth["distance"][rows], truth["weight"][rows]))][:3]
    sec = text[text.index(f'id="class-{c}"'):]
    sec = sec[: sec.index('<span class="label">typical')]
    assert re.findall(r'title="(img-\d+):', sec) == [truth["ids"][r] for r in expect]
    assert "Accuracy" in text and text.index(">A<") < text.index(">C<")  # A/B/C order
    assert ">81.00%<" in text and ">97.25%<" in text  # sinet train writes percent
    assert "1 thumbnail(s) could not be read" in text or 3 not in expect
    assert "w ≤ 0 (weight 0" in text
    # up to date: the second run does nothing; another option rebuilds
    code, out, err = sinet("report", "--out", art, "--per-class", 3, "--max-classes", 2, "--low-weight", "0.0",
                           "--top-suspects", 5)
    assert code == 0 and "up to date" in err
    code, out, err = sinet("report", "--out", art, "--per-class", 2, "--max-classes", 2, "--low-weight", "q0.5")
    assert code == 0 and "up to date" not in err
    t = float(np.quantile(w, 0.5))
    assert f"w ≤ {t:.4g} (T = the 0.5 quantile" in page.read_text()
    tsv = [line.split("\t") for line in (art / "report" / "classes.tsv").read_text().splitlines()[1:]]
    for r in tsv:
        c = names.index(r[0])
        assert float(r[3]) == pytest.approx(np.mean(w[lab == c] <= t), abs=1e-4)
    code, out, err = sinet("report", "--out", art, "--low-weight", "often")
    assert code == 1 and "--low-weight 'often'" in err
    assert not list((art / "report").glob("*.partial"))


HOSTILE = "<img src=x onerror=alert(1)>\nsecond\tline \x1b[31mred[/red]"  # side text from a crawl


def crawl_artifacts(art: Path, *, estimate: bool = True, skipped: bool = True) -> dict:
    """Artifacts of a crawl without clean labels, with score-noise's flag, suggestion and noise
    estimate and build-graph's name resolution; crawl strings that try to inject markup."""
    C, per = 4, 6
    names = ["cat", "dog <b>&", "[bold]fox[/bold]", "owl"]
    n = C * per + C

    def flag(t: dict) -> np.ndarray:
        return ((t["split"] == "train") & (t["distance"] > 1.2)).astype(np.int64)

    def side_text(t: dict) -> list[str]:
        text = [f"title {i}" for i in range(n)]
        worst = np.flatnonzero(flag(t))
        text[worst[0]] = HOSTILE  # on flagged rows: shown among the top suspects
        text[worst[1]] = ""
        return text

    def extra(t: dict) -> dict:
        flagged = flag(t)
        out = {"flagged": flagged, "suggested_class": np.where(flagged == 1, (t["labels"] + 2) % C, t["labels"]),
               "suggested_confidence": (0.5 + 0.01 * np.arange(n)).astype(np.float32)}
        if estimate:
            out["class_noise"] = np.array([0.05, 0.25, 0.15, 0.4])
        return out

    resolution = [{"class": "cat", "synset": "cat.n.01", "source": "name", "lemma": "cat"},
                  {"class": "dog <b>&", "synset": "dog.n.01", "source": "table", "lemma": ""},
                  {"class": "[bold]fox[/bold]", "synset": "", "source": "none", "lemma": ""},
                  {"class": "owl", "synset": "owl.n.01", "source": "name", "lemma": "owl"}]
    attrs = {"noise_estimate": {"overall": 0.2125, "method": "confident joint <i>", "rows": C * per}} if estimate else None
    truth = write_synthetic(art, C, per, names=names, truth=False, metrics=False, side_text=side_text,
                            scores_extra=extra, scores_attrs=attrs, graph_attrs={"name_resolution": resolution})
    if skipped:
        store.write_json(art / "metrics.json", {"train": {m: {
            "mode": m, "on": "features", "seed": 0, "top1": None, "top5": None, "skipped": "no val split",
            "hint": "add a val split"} for m in ("A", "C")}})
    truth["text"] = np.array(side_text(truth))
    truth["flagged"] = extra(truth)["flagged"]
    truth["suggested"] = extra(truth)["suggested_class"]
    return truth


def test_report_without_clean_labels_shows_what_is_known_and_escapes_the_crawl(tmp_path, sinet):
    art = tmp_path / "art"
    t = crawl_artifacts(art)
    code, _, err = sinet("report", "--out", art, "--per-class", 2, "--max-classes", 4)
    assert code == 0, err
    assert "estimated noise 21.2%" in err
    text = (art / "report" / "index.html").read_text()
    # nothing from the crawl injects markup or escape codes
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<b>&" not in text and "dog &lt;b&gt;&amp;" in text and "\x1b" not in text
    assert "confident joint &lt;i&gt;" in text
    # what is not known, and why
    unknown = text[text.index('id="not-known"'):text.index("</ul>", text.index('id="not-known"'))]
    assert "No clean labels" in unknown and "Not trained (A, C): no val split" in unknown
    assert "no noise estimate" not in unknown and "ROC-AUC" not in text.replace(unknown, "")
    # the top suspects: every flagged training image, worst first, suggestion and side text beside it
    train = t["split"] == "train"
    pool = np.flatnonzero(train & (t["flagged"] == 1))
    expect = pool[np.lexsort((-t["distance"][pool], t["weight"][pool]))]
    table = text[text.index('<table id="suspects">'):text.index("</table>", text.index('<table id="suspects">'))]
    rows = re.findall(r'<tr class="suspect">(.*?)</tr>', table)
    assert [re.findall(r'<td class="l">([^<]*)</td>', r)[0] for r in rows] == [t["ids"][i] for i in expect]
    first = re.findall(r"<td[^>]*>([^<]*)</td>", rows[0])
    i = expect[0]
    assert first[1:3] == [html_escape(t["names"][t["labels"][i]]), html_escape(t["names"][t["suggested"][i]])]
    assert first[3] == f"{0.5 + 0.01 * i:.2f}" and first[4] == f"{t['weight'][i]:.3f}"
    cells = {re.findall(r'<td class="l">([^<]*)</td>', r)[0]: re.findall(r'<td class="text">([^<]*)</td>', r)[0]
             for r in rows}
    hostile = t["ids"][np.flatnonzero(t["text"] == HOSTILE)[0]]
    assert cells[hostile] == "&lt;img src=x onerror=alert(1)&gt; second line red[/red]"  # escaped, one line
    assert cells[t["ids"][np.flatnonzero((t["text"] == "") & (t["flagged"] == 1))[0]]] == "–"
    assert f"{int(len(pool))} of {int(train.sum())} training images" in text
    # per class: the calibrated estimate, the flagged count and the name resolution
    tsv = {r.split("\t")[0]: r.split("\t") for r in (art / "report" / "classes.tsv").read_text().splitlines()[1:]}
    for c, name in enumerate(t["names"]):
        assert float(tsv[name][3]) == pytest.approx([0.05, 0.25, 0.15, 0.4][c])
        assert int(tsv[name][6]) == int(((t["labels"] == c) & train & (t["flagged"] == 1)).sum())
    assert tsv["cat"][7:] == ["cat.n.01", "name"] and tsv["[bold]fox[/bold]"][7:] == ["", "none"]
    assert 'id="name-resolution"' in text and "unresolved: text similarity only" in text


def html_escape(s: str) -> str:
    from html import escape

    return escape(s)


def test_summary_without_clean_labels_prints_the_estimate_flags_suspects_and_what_is_unknown(tmp_path, sinet):
    art = tmp_path / "art"
    t = crawl_artifacts(art)
    code, out, err = sinet("summary", "--out", art)
    assert code == 0, err
    train = t["split"] == "train"
    n_flagged = int((train & (t["flagged"] == 1)).sum())
    assert "estimated noise 21.2% (confident joint <i>, over 24 training images); " f"flagged {n_flagged} of 24" in out
    assert ("class names: 4 classes: 2 looked up by name, 1 from the class table, 1 unresolved "
            "('[bold]fox[/bold]': text similarity only)") in out
    assert "\x1b" not in out and "[bold]fox[/bold]" in out  # no escape codes, no markup interpreted
    # the top suspects, worst first, with suggestion, confidence and side text
    pool = np.flatnonzero(train & (t["flagged"] == 1))
    expect = pool[np.lexsort((-t["distance"][pool], t["weight"][pool]))][:10]
    shown = re.findall(r"(img-\d{6})", out[out.index("Top suspects"):])
    assert shown == [t["ids"][i] for i in expect]
    i = expect[0]
    line = next(x for x in out.splitlines() if t["ids"][i] in x)
    assert t["names"][t["suggested"][i]] in line and f"{0.5 + 0.01 * i:.2f}" in line
    hostile = int(np.flatnonzero(t["text"] == HOSTILE)[0])
    assert hostile in expect
    hostile_line = next(x for x in out.splitlines() if t["ids"][hostile] in x)
    assert "<img src=x onerror=alert(1)> second line red[/red]" in hostile_line
    # per class: the calibrated estimate, noisiest first
    per_class = out[out.index("Per class"):out.index("Top suspects")]
    assert [n for n in ("owl", "dog <b>&", "[bold]fox[/bold]", "cat")] == sorted(
        ["owl", "dog <b>&", "[bold]fox[/bold]", "cat"], key=per_class.index)
    assert "40.0%" in per_class and "cat.n.01 (name)" in per_class
    assert "not known: no clean labels" in out and "not known: not trained (A, C): no val split" in out
    assert "Noise detection" not in out and "accuracy (%)" not in out  # no tables against a truth


def test_summary_says_when_the_noise_estimate_is_missing(tmp_path, sinet):
    art = tmp_path / "art"
    crawl_artifacts(art, estimate=False, skipped=False)
    code, out, err = sinet("summary", "--out", art)
    assert code == 0, err
    assert "no noise estimate in scores.h5 (rerun score-noise)" in out
    assert "not known: no accuracy: no model trained" in out
    code, _, err = sinet("report", "--out", art)
    assert code == 0, err
    text = (art / "report" / "index.html").read_text()
    assert "No noise estimate in scores.h5 (rerun score-noise)" in text


def test_summary_with_clean_labels_keeps_detection_and_accuracy_tables(tmp_path, sinet):
    art = tmp_path / "art"
    write_synthetic(art, 4, 6)
    code, out, err = sinet("summary", "--out", art)
    assert code == 0, err
    assert "Noise detection against the clean labels" in out and "0.9000" in out and "0.8000" in out
    assert "Clean validation accuracy (%)" in out and "81.00" in out and "74.50" in out
    assert out.index("74.50") < out.index("81.00")  # A before C
    assert "not known: no clean labels" not in out and "no noise estimate in scores.h5" in out


def test_report_demo_thumbnails_come_from_the_recorded_demo(tmp_path, sinet):
    from sinet_cli.datasets import load_demo

    prov = {"reader": "demo", "noise": "symmetric", "rate": 0.2, "seed": 3, "confusion_pairs": None}
    table = load_demo("symmetric", 0.2, 3)
    ids = table.ids[:5 * 3 + 5]  # ids are matched, not positions
    art = tmp_path / "art"
    truth = write_synthetic(art, 5, 3, provenance=prov, ids=ids, metrics=False)
    code, _, err = sinet("report", "--out", art, "--per-class", 1, "--max-classes", 5, "--thumb-size", 28)
    assert code == 0, err
    text = (art / "report" / "index.html").read_text()
    assert "Accuracy" not in text
    srcs = re.findall(r'<figure[^>]*title="([^":]+):[^"]*"><img src="data:image/png;base64,([^"]+)"', text)
    assert len(srcs) == 10
    from PIL import Image

    pos = {str(i): k for k, i in enumerate(table.ids)}
    for image_id, b64 in srcs:
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        assert np.array_equal(got, table.pixels[pos[image_id]])  # 28 px: the demo's own pixels
    assert truth["ids"][0] in text


def test_report_2000_classes_stays_under_the_bound(tmp_path, sinet):
    """Worst case for the size: random-noise RGB thumbnails (incompressible), long class names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        p = tmp_path / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    C, per = 2000, 3
    n = C * per + C
    names = [f"n{c:08d} a rather long class name number {c}" for c in range(C)]
    art = tmp_path / "art"
    write_synthetic(art, C, per, paths=[files[i % 4] for i in range(n)], names=names, graph_dtype=np.float16)
    code, _, err = sinet("report", "--out", art, "--max-classes", 50, "--per-class", 8)
    assert code == 0, err
    text = (art / "report" / "index.html").read_text()
    size = len(text.encode())
    assert text.count("<tr><td>") == C  # every class in the searchable index
    assert text.count('class="class-block"') == 50
    # per=3 train rows per class: up to 3 suspects + 3 typical per shown class, all real images, and
    # the 50 rows of the top-suspects table
    assert len(image_tags(text)) == 6 + 50 * 6 + 50
    # the bound for 5,000 classes with the defaults: the per-class index row grows linearly, the
    # rest (thumbnails of 50 classes x 16 at worst, plots of <= 60 classes) does not grow with C
    rows = sum(len(r.encode()) for r in re.findall(r"<tr><td>.*?</tr>", text))
    figures = re.findall(r"<figure (?:class=\"\w+\" )?title=.*?</figure>", text)
    assert len(figures) == 50 * 6
    per_thumb = np.mean([len(f.encode()) for f in figures])
    rest = size - rows - per_thumb * len(figures)  # plots (<= 60 classes each), styles, provenance
    projected = rest + rows / C * 5000 + per_thumb * 50 * 16
    assert projected < PAGE_BOUND, f"projected {projected / 2**20:.1f} MiB for 5,000 classes"
    assert size < PAGE_BOUND
    assert "the heat maps show 60 of them" in text


# -- the page in a browser ---------------------------------------------------------------------


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(binary: str, page: Path, profile: Path) -> tuple[str, str]:
    """Load a page headless; return (DOM after load, Chromium's stderr log)."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if ("CONSOLE" in line and ("ERROR" in line.upper() or "Uncaught" in line)) or "Uncaught" in line]


def ci_was_set() -> bool:
    """CI as the process was started with (tests/conftest.py sets CI=1 for every test run, so
    os.environ cannot tell): /proc/self/environ keeps the environment given at exec time."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return bool(os.environ.get("CI"))
    env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
    return env.get(b"CI", b"").lower() not in (b"", b"0", b"false", b"no")


@pytest.fixture
def browser() -> str:
    binary = chromium()
    if binary is None:
        if ci_was_set() or os.environ.get("SINET_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return binary


def test_report_opens_in_chromium(tmp_path, sinet, browser):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3 * 4 + 3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
        paths.append(str(p))
    art = tmp_path / "art"
    write_synthetic(art, 3, 4, paths=paths, names=["a", "b", "c"])
    code, _, err = sinet("report", "--out", art)
    assert code == 0, err
    page = art / "report" / "index.html"
    n_img = len(image_tags(page.read_text()))
    dom, log = browse(browser, page, tmp_path / "profile")
    m = re.search(r'data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert m, "the page's load script did not run"
    assert int(m.group(1)) == int(m.group(2)) == n_img > 6
    assert re.search(r'id="class-count"[^>]*>3 of 3 classes<', dom)  # the filter script ran
    assert console_errors(log) == [], console_errors(log)
    # the check itself: a page with a script error and a broken image is caught
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("<script>", "<script>undefinedFunction();</script><script>", 1)
                   .replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom, log = browse(browser, bad, tmp_path / "profile2")
    m = re.search(r'data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert m and int(m.group(1)) == int(m.group(2)) - 1
    assert console_errors(log), log[-2000:]
