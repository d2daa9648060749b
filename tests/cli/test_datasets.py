import numpy as np
import pytest
from PIL import Image

from sinet_cli.datasets import ClassTable, load_demo, read_imagefolder, read_manifest
from sinet_cli.datasets import noise
from sinet_cli.errors import InputError


def test_demo_is_real_fashion_mnist_with_clean_val():
    t = load_demo(noise="none")
    assert len(t) == 6000 and t.pixels.shape == (6000, 28, 28) and t.pixels.dtype == np.uint8
    assert (t.splits == "train").sum() == 5000 and (t.splits == "val").sum() == 1000
    assert np.bincount(t.labels[t.splits == "train"]).tolist() == [500] * 10
    assert t.classes.synsets[0] == "tee_shirt.n.01" and t.classes.names[6] == "Shirt"
    # real images: not blank, varied, and classes differ in mean appearance (trousers are narrow)
    assert t.pixels.std() > 50
    means = np.stack([t.pixels[t.labels == c].mean(0) for c in range(10)])
    assert means[1][:, :5].mean() < means[4][:, :5].mean()  # trouser edges darker than coat edges


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_demo_symmetric_noise_matches_rate_and_is_reproducible(rate):
    t = load_demo(noise="symmetric", rate=rate, seed=3)
    train = t.splits == "train"
    noisy = t.labels[train] != t.clean_labels[train]
    assert noisy.mean() == pytest.approx(rate, abs=1e-3)
    assert (t.labels[~train] == t.clean_labels[~train]).all()  # validation stays clean
    # flips go to every other class, roughly uniformly
    flips = t.labels[train][noisy]
    counts = np.bincount(flips, minlength=10)
    assert counts.min() > 0.5 * counts.mean()
    again = load_demo(noise="symmetric", rate=rate, seed=3)
    np.testing.assert_array_equal(t.labels, again.labels)
    other = load_demo(noise="symmetric", rate=rate, seed=4)
    assert (other.labels != t.labels).any()
    assert t.fingerprint() != other.fingerprint()


def test_demo_confusion_noise_flips_lookalikes_only():
    t = load_demo(noise="confusion", rate=0.3, seed=0)
    train = t.splits == "train"
    y, yc = t.labels[train], t.clean_labels[train]
    names = t.classes.names
    flipped = y != yc
    pairs = {(names[a], names[b]) for a, b in zip(yc[flipped], y[flipped])}
    assert pairs == {("T-shirt/top", "Shirt"), ("Shirt", "T-shirt/top"), ("Pullover", "Coat"), ("Coat", "Pullover"),
                     ("Sandal", "Sneaker"), ("Sneaker", "Sandal"), ("Ankle boot", "Sneaker")}
    for c in ("Shirt", "Coat", "Ankle boot"):
        k = names.index(c)
        assert (flipped & (yc == k)).sum() == 150  # exactly 30% of 500
    assert (flipped & (yc == names.index("Trouser"))).sum() == 0


def test_noise_rejects_bad_rate_and_pairs():
    with pytest.raises(ValueError, match="outside"):
        noise.symmetric(np.zeros(3, int), 1.5, 3, 0)
    with pytest.raises(ValueError, match="unknown class"):
        noise.parse_pairs("Shirt<->Hat", ["Shirt", "Coat"])


def _jpeg(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12), value, np.uint8)).save(path)


def _manifest(tmp_path, rows, header="id\tpath\tlabel\tsplit"):
    p = tmp_path / "m.tsv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_manifest_reads_names_and_indices(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    classes = ClassTable.from_names(["cat", "dog"])
    p = _manifest(tmp_path, ["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\t1\ttrain", "i3\ta.jpg\tdog\tval"])
    t = read_manifest(p, classes)
    assert t.labels.tolist() == [0, 1, 1] and t.splits.tolist() == ["train", "train", "val"]
    assert t.paths[0] == str(tmp_path / "a.jpg")


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\t7\ttrain"], None, "m.tsv:3: label 7 out of range 0..1"),
        (["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\tdog"], None, "m.tsv:3: 3 fields, header has 4"),
        (["i1\ta.jpg\tcat\ttrain", "i1\ta.jpg\tdog\ttrain"], None, "m.tsv:3: duplicate id 'i1'"),
        (["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\tdog\tholdout"], None, "m.tsv:3: split 'holdout'"),
        (["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\thorse\ttrain"], None, "m.tsv:3: label 'horse' is not a class"),
        (["i1\ta.jpg\tcat\ttrain", "i2\ta.jpg\tcat\ttrain"], None, "m.tsv: class 'dog' has no training images"),
        (["i1\ta.jpg"], "id\tpath", "m.tsv:1: header lacks column(s) ['label']"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, rows, header, message):
    p = _manifest(tmp_path, rows, header or "id\tpath\tlabel\tsplit")
    with pytest.raises(InputError) as e:
        read_manifest(p, ClassTable.from_names(["cat", "dog"]))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_manifest_not_utf8(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_bytes(b"id\tpath\tlabel\n\xff\xfe\tx\tcat\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_manifest(p, ClassTable.from_names(["cat"]))


def test_class_table_errors(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("name\tsynset\ncat\tcat.n.01\ncat\tdog.n.01\n")
    with pytest.raises(InputError, match=r"c.tsv:3: duplicate class name 'cat' \(first on line 2\)"):
        ClassTable.from_tsv(p)
    p.write_text("name\tcolour\ncat\tred\n")
    with pytest.raises(InputError, match="unknown column"):
        ClassTable.from_tsv(p)


def test_imagefolder_with_and_without_splits(tmp_path):
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            _jpeg(tmp_path / "r" / split / c / "x.png")
    t = read_imagefolder(tmp_path / "r")
    assert t.classes.names == ["ant", "bee"] and sorted(t.splits.tolist()) == ["train"] * 2 + ["val"] * 2
    _jpeg(tmp_path / "flat" / "ant" / "1.jpg")
    (tmp_path / "flat" / "bee").mkdir()
    with pytest.raises(InputError, match="class 'bee' has no training images"):
        read_imagefolder(tmp_path / "flat")


def test_openset_junk_is_real_outside_images_at_the_requested_share():
    t = load_demo(noise="confusion:0.2+openset:0.2", seed=1)
    train = t.splits == "train"
    junk = t.clean_labels == -2
    assert junk[train].mean() == pytest.approx(0.2, abs=1e-3)
    assert not junk[~train].any()
    assert all(i.startswith("mnist-junk-") for i in t.ids[junk])
    assert t.noise_mask()[junk].all()  # junk counts as noise whatever its random label
    assert np.bincount(t.labels[junk], minlength=10).min() > 0  # labels spread over all classes
    # the junk really is MNIST: digits have far more black background than garments
    assert (t.pixels[junk] == 0).mean() > (t.pixels[train & ~junk] == 0).mean() + 0.2
    closed = train & ~junk
    assert 0.05 < (t.labels[closed] != t.clean_labels[closed]).mean() < 0.2


def test_second_demo_is_mnist_with_fashion_junk():
    t = load_demo(noise="symmetric:0.4+openset:0.1", name="demo-mnist")
    assert t.classes.names[:3] == ["zero", "one", "two"] and t.classes.synsets[4] == "four.n.01"
    junk = t.clean_labels == -2
    assert all(i.startswith("fmnist-junk-") for i in t.ids[junk])
    closed = (t.splits == "train") & ~junk
    assert (t.labels[closed] != t.clean_labels[closed]).mean() == pytest.approx(0.4, abs=1e-3)


def test_noise_mask_ignores_unknown_clean_labels():
    t = load_demo(noise="symmetric", rate=0.4)
    t.clean_labels[:10] = -1
    assert not t.noise_mask()[:10].any()


def test_bad_noise_spec():
    with pytest.raises(ValueError, match="unknown noise kind 'gaussian'"):
        load_demo(noise="gaussian")
    with pytest.raises(ValueError, match="open-set rate"):
        load_demo(noise="openset:1.0")
