"""--data webdataset:PATTERN: tiny tar shards of real demo JPEGs (written with webdataset's TarWriter,
or tarfile where a shard must be broken), read, extracted, resumed and rescored."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import stages.extract_features as stage
from fixtures_layouts import _pixels, score_on_flat_graph
from sinet_cli import store
from sinet_cli.common import dataset_name, load_table
from sinet_cli.datasets import ClassTable
from sinet_cli.datasets import webdataset as wdr
from sinet_cli.errors import InputError, SinetError

CLASSES = ["boot", "coat", "shirt"]
TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--device", "cpu"]


def jpeg_bytes(k: int) -> bytes:
    """The k-th demo image (cycled), upscaled to 40 x 36 so that decoding resizes it, as JPEG."""
    pixels = _pixels()
    im = Image.fromarray(pixels[k % len(pixels)]).convert("RGB").resize((40, 36), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sample(k: int, label=None, **meta) -> dict:
    """Image k with a caption, and a JSON holding ``label`` (when given) and ``meta``."""
    out = {"__key__": f"{k:09d}", "jpg": jpeg_bytes(k), "txt": f"caption {k}"}
    body = dict(meta, **({} if label is None else {"label": label}))
    if body:
        out["json"] = body
    return out


def write_shard(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A shard written member by member with tarfile (to break it afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def crawl(root: Path, shards: int = 2, per_shard: int = 6, start: int = 0, folder: str = "crawl") -> list[Path]:
    """``shards`` shards of ``per_shard`` samples, labelled by JSON class name (k % 3), one val sample each."""
    out = []
    for s in range(shards):
        first = start + s * per_shard
        out.append(write_shard(root / folder / f"{start // per_shard + s:05d}.tar",
                               [sample(k, CLASSES[k % 3], title=f"title {k}", caption=f"caption {k}",
                                       **({"split": "val"} if k == first else {}))
                                for k in range(first, first + per_shard)]))
    return out


def class_table(root: Path) -> Path:
    path = root / "classes.tsv"
    ClassTable.from_names(CLASSES).to_tsv(path)
    return path


def features(path: Path) -> dict:
    with store.open_artifact(path, "features") as art:
        out = {k: art.read(k) for k in ("ids", "labels", "features", "splits", "paths")}
        out["skipped_ids"] = list(art.read("skipped_ids")) if "skipped_ids" in art else []
        out["skipped_reasons"] = list(art.read("skipped_reasons")) if "skipped_reasons" in art else []
        out["provenance"] = art.json_attr("dataset_provenance")
        return out


# --- the reader -------------------------------------------------------------------------------------


def test_labels_from_json_names_captions_titles_splits_ids_and_paths(tmp_path):
    crawl(tmp_path)
    t = load_table(f"webdataset:{tmp_path}/crawl/{{00000..00001}}.tar")
    assert t.classes.names == CLASSES and len(t) == 12
    assert t.ids.tolist() == [f"{k // 6:05d}/{k:09d}" for k in range(12)]
    assert t.paths[7] == f"{tmp_path}/crawl/00001.tar#000000007.jpg"
    assert [CLASSES[c] for c in t.labels] == [CLASSES[k % 3] for k in range(12)]
    assert t.splits.tolist() == ["val"] + ["train"] * 5 + ["val"] + ["train"] * 5
    # the caption once (the .txt and the JSON's caption are the same), then the title
    assert t.side_text[3] == "caption 3. title 3"
    assert t.name == "crawl" and dataset_name(f"webdataset:{tmp_path}/crawl/{{00000..00001}}.tar") == "crawl"
    assert t.provenance["reader"] == "webdataset" and t.provenance["shards"] == 2


def test_label_as_a_json_index_needs_a_class_table(tmp_path):
    write_shard(tmp_path / "s" / "00000.tar", [sample(0, 2), sample(1, "0"), sample(2, "coat")])
    t = load_table(f"webdataset:{tmp_path}/s/00000.tar", class_table(tmp_path))
    assert t.labels.tolist() == [2, 0, 1]
    with pytest.raises(InputError, match=r"00000\.tar: sample '000000000': label 2 .* indices need a class table"):
        load_table(f"webdataset:{tmp_path}/s/00000.tar")
    write_shard(tmp_path / "t" / "00000.tar", [sample(0, 3)])
    with pytest.raises(InputError, match=r"t/00000\.tar: sample '000000000': label 3 .* outside the class indices "
                                         r"0..2"):
        load_table(f"webdataset:{tmp_path}/t/00000.tar", class_table(tmp_path))


def test_labels_from_the_folder_and_keys_restarting_per_folder(tmp_path):
    for c, name in enumerate(["dress", "coat"]):
        write_shard(tmp_path / "crawl" / name / "00000.tar", [sample(k, title=f"t{k}") for k in range(3)])
    t = load_table(f"webdataset:{tmp_path}/crawl/*/*.tar")
    assert t.classes.names == ["coat", "dress"]
    assert t.ids.tolist() == [f"{f}/00000/{k:09d}" for f in ("coat", "dress") for k in range(3)]
    assert t.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert t.side_text[0] == "caption 0. t0"


def test_label_field_option_and_empty_label_field(tmp_path, sinet):
    write_shard(tmp_path / "crawl" / "boot" / "00000.tar",
                [sample(0, "coat", query="shirt"), sample(1, "coat", query="boot")])
    pattern = f"webdataset:{tmp_path}/crawl/boot/00000.tar"
    assert load_table(pattern).classes.names == ["coat"]
    t = load_table(pattern, label_field="query")
    assert [t.classes.names[c] for c in t.labels] == ["shirt", "boot"]
    t = load_table(pattern, label_field="")
    assert t.classes.names == ["boot"] and t.ids.tolist() == ["boot/00000/000000000", "boot/00000/000000001"]
    with pytest.raises(SinetError, match="--label-field query: applies to --data webdataset:PATTERN only"):
        load_table("manifest:x.tsv", label_field="query")
    code, _, err = sinet("extract-features", "--data", "demo", "--label-field", "query", "--out", tmp_path / "o")
    assert code == 1 and "applies to --data webdataset:PATTERN only" in err


def test_unknown_label_is_an_error_naming_shard_and_key(tmp_path, sinet):
    shard = write_shard(tmp_path / "s" / "00003.tar", [sample(0, "boot"), sample(1, "hat")])
    code, _, err = sinet("extract-features", "--data", f"webdataset:{shard}", "--classes", class_table(tmp_path),
                         *TINY, "--out", tmp_path / "out")
    assert code == 1
    assert err.startswith(f"sinet: error: {shard}: sample '000000001': label 'hat' (JSON field 'label') is not a "
                          "class of"), err
    # from the folder: said so
    shard = write_shard(tmp_path / "hat" / "00000.tar", [sample(0)])
    with pytest.raises(InputError, match=r"hat/00000\.tar: sample '000000000': label 'hat' \(the shard's folder name; "
                                         r"the sample's JSON has no 'label' field\) is not a class"):
        load_table(f"webdataset:{shard}", class_table(tmp_path))


def test_duplicate_key_across_shards_names_both_shards(tmp_path):
    a = write_shard(tmp_path / "s" / "00000.tar", [sample(0, "boot"), sample(1, "coat")])
    b = write_shard(tmp_path / "s" / "00001.tar", [sample(2, "boot"), sample(1, "coat")])
    with pytest.raises(InputError) as e:
        load_table(f"webdataset:{tmp_path}/s/*.tar")
    assert str(e.value) == f"{b}: key '000000001' is also in {a}; a sample's key must be unique across shards"


def test_bad_split_and_bad_label_type_name_shard_and_key(tmp_path):
    write_shard(tmp_path / "a" / "00000.tar", [sample(0, "boot", split="training")])
    with pytest.raises(InputError, match=r"a/00000\.tar: sample '000000000': split 'training' is not one of train"):
        load_table(f"webdataset:{tmp_path}/a/00000.tar")
    write_shard(tmp_path / "b" / "00000.tar", [sample(0, ["boot"])])
    for classes in (class_table(tmp_path), None):
        with pytest.raises(InputError, match=r"b/00000\.tar: sample '000000000': label must be a class name or "
                                             r"index, not list \(JSON field 'label'\)"):
            load_table(f"webdataset:{tmp_path}/b/00000.tar", classes)
    write_shard(tmp_path / "c" / "00000.tar", [sample(0, "boot"), sample(1, " ")])
    with pytest.raises(InputError, match=r"c/00000\.tar: sample '000000001': empty label \(JSON field 'label'\)"):
        load_table(f"webdataset:{tmp_path}/c/00000.tar")


def test_bad_and_oversized_json_are_logged_and_skipped(tmp_path, capsys, monkeypatch):
    members = [("000000000.jpg", jpeg_bytes(0)), ("000000000.json", b'{"title": "fine"}'),
               ("000000001.jpg", jpeg_bytes(1)), ("000000001.json", b'{"title": "broken",\n "x": }'),
               ("000000002.jpg", jpeg_bytes(2)), ("000000002.json", b'{"title": "' + b"x" * 200 + b'"}'),
               ("000000003.json", b'{"title": "no image"}')]
    shard = raw_tar(tmp_path / "coat" / "00000.tar", members)
    monkeypatch.setattr(wdr, "MAX_SAMPLE_JSON_BYTES", 100)
    t = load_table(f"webdataset:{shard}")
    err = capsys.readouterr().err
    assert f"{shard}#000000001.json:2:7: invalid JSON (Expecting value)" in err
    assert f"{shard}#000000002.json: 213 bytes, over the 100-byte limit" in err
    assert f"{shard}: sample '000000003' has no .jpg/.jpeg/.png/.webp image; skipped" in err
    assert t.ids.tolist() == [f"coat/00000/{k:09d}" for k in range(3)]  # kept, labelled by their folder
    assert t.side_text.tolist() == ["fine", "", ""]
    assert t.provenance["problems"] == {"unusable JSON members": 2, "samples without an image": 1}


def test_corrupt_tar_header_is_named_and_reading_resumes_after_it(tmp_path, capsys):
    members = [(f"{k:09d}.{ext}", jpeg_bytes(k) if ext == "jpg" else json.dumps({"label": CLASSES[k % 3]}).encode())
               for k in range(4) for ext in ("jpg", "json")]
    shard = raw_tar(tmp_path / "s" / "00000.tar", members)
    raw = bytearray(shard.read_bytes())
    bad = raw.find(b"000000001.jpg")  # the header of sample 1's image
    raw[bad + 100 : bad + 108] = b"garbage!"  # its mode field: the header checksum fails
    shard.write_bytes(bytes(raw))
    t = load_table(f"webdataset:{shard}", class_table(tmp_path))
    err = capsys.readouterr().err
    assert f"{shard}: corrupt tar header at byte {bad} (name field '000000001.jpg')" in err
    assert t.ids.tolist() == ["00000/000000000", "00000/000000002", "00000/000000003"]  # the members after it are read
    assert "sample '000000001' has no .jpg" in err

    # a shard cut short inside its last member (sample 3's image): that member named, the others kept
    cut = tmp_path / "c" / "00000.tar"
    cut.parent.mkdir()
    whole = raw_tar(tmp_path / "w" / "00000.tar", [members[i] for i in (0, 1, 2, 3, 4, 5, 7, 6)]).read_bytes()
    last = whole.find(b"000000003.jpg")
    cut.write_bytes(whole[: last + 512 + 3])
    t = load_table(f"webdataset:{cut}", class_table(tmp_path))
    err = capsys.readouterr().err
    assert f"{cut}: member '000000003.jpg' is cut short (3 of {len(jpeg_bytes(3))} bytes); skipped" in err
    assert t.ids.tolist() == ["00000/000000000", "00000/000000001", "00000/000000002"]


def test_patterns_braces_globs_urls_and_missing_shards(tmp_path):
    crawl(tmp_path, shards=3, per_shard=4)
    base = f"{tmp_path}/crawl"
    assert len(load_table(f"webdataset:{base}/{{00000..00001}}.tar")) == 8
    assert len(load_table(f"webdataset:{base}/0000[02].tar")) == 8
    (tmp_path / "crawl" / "00000_stats.json").write_text("{}")  # img2dataset's files beside the shards
    t = load_table(f"webdataset:file://{base}/*.tar")
    assert len(t) == 12 and t.paths[0] == f"file://{base}/00000.tar#000000000.jpg"
    assert t.ids.tolist() == load_table(f"webdataset:{base}/*.tar").ids.tolist()
    # an fsspec filesystem other than the local one (opened, globbed and seeked through fsspec)
    import fsspec

    mem = fsspec.filesystem("memory")
    try:
        for k in range(3):
            mem.pipe(f"/wds-test/boot/{k:05d}.tar", (tmp_path / "crawl" / f"{k:05d}.tar").read_bytes())
        t = load_table("webdataset:memory://wds-test/boot/*.tar")
        assert len(t) == 12 and t.paths[5] == "memory:///wds-test/boot/00001.tar#000000005.jpg"
        assert wdr.read_image_bytes(t.paths[5]) == jpeg_bytes(5)
    finally:
        mem.rm("/wds-test", recursive=True)
    with pytest.raises(InputError, match=r"00003\.tar: shard not found"):
        load_table(f"webdataset:{base}/{{00000..00003}}.tar")
    with pytest.raises(SinetError, match=r"no \.tar shard matches .*/nothing/\*\.tar"):
        load_table(f"webdataset:{tmp_path}/nothing/*.tar")
    with pytest.raises(SinetError, match="pipe: commands are not run"):
        load_table("webdataset:pipe:curl -s http://example.com/x.tar")
    assert wdr.expand_pattern(f"{base}/{{00001,00000,00001}}.tar") == [f"{base}/00001.tar", f"{base}/00000.tar"]


def test_keys_follow_webdatasets_rule():
    from webdataset.tariterators import base_plus_ext

    for name in ["000012.jpg", "a/b/000012.JPG", "k.seg.png", "dir.v2/k.json", "noext", ".hidden", "a/.b.txt", "x."]:
        key, ext = base_plus_ext(name)
        assert wdr.split_key(name) == (key, None if ext is None else ext.lower()), name


def test_read_image_bytes_opens_a_stored_member_path(tmp_path):
    crawl(tmp_path, shards=1, per_shard=6)
    t = load_table(f"webdataset:{tmp_path}/crawl/00000.tar")
    assert wdr.read_image_bytes(t.paths[2]) == jpeg_bytes(2)
    with Image.open(wdr.image_source(t.paths[2])) as im:
        assert im.size == (40, 36)
    assert wdr.image_source("/some/file.jpg") == "/some/file.jpg"
    with pytest.raises(OSError, match="no member 'nope.jpg'"):
        wdr.read_image_bytes(f"{tmp_path}/crawl/00000.tar#nope.jpg")


# --- extraction -------------------------------------------------------------------------------------


def files_and_shards(root: Path) -> tuple[Path, str]:
    """The same 12 JPEGs as files (a manifest) and as members of 2 shards, the ids alike."""
    crawl(root)
    lines = ["id\tpath\tlabel\tsplit"]
    for k in range(12):
        f = root / "img" / f"{k:09d}.jpg"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(jpeg_bytes(k))
        lines.append(f"{k // 6:05d}/{k:09d}\t{f}\t{CLASSES[k % 3]}\t{'val' if k % 6 == 0 else 'train'}")
    (root / "m.tsv").write_text("\n".join(lines) + "\n")
    return root / "m.tsv", f"webdataset:{root}/crawl/*.tar"


def test_extract_from_shards_equals_extract_from_the_same_files(tmp_path, sinet):
    manifest, shards = files_and_shards(tmp_path)
    code, _, err = sinet("extract-features", "--data", f"manifest:{manifest}", *TINY, "--workers", "0",
                         "--batch-size", "5", "--out", tmp_path / "files")
    assert code == 0, err
    code, _, err = sinet("extract-features", "--data", shards, *TINY, "--workers", "0", "--batch-size", "5",
                         "--out", tmp_path / "shards")
    assert code == 0, err
    a, b = features(tmp_path / "files" / "features.h5"), features(tmp_path / "shards" / "features.h5")
    assert a["ids"].tolist() == b["ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()
    np.testing.assert_array_equal(a["features"], b["features"])  # the same decoded pixels
    assert b["paths"][0].endswith("crawl/00000.tar#000000000.jpg") and b["provenance"]["reader"] == "webdataset"


def test_archive_stream_decodes_as_file_images_and_two_workers_keep_the_order(tmp_path):
    manifest, shards = files_and_shards(tmp_path)
    table = load_table(shards)
    archives, of, members = wdr.archive_members(table.paths)
    source = stage.ArchiveImages(archives, of, members, wdr.read_members)
    files = [str(tmp_path / "img" / f"{k:09d}.jpg") for k in range(12)]
    for k in (0, 7, 11):
        want, _, ok, _ = stage.FileImages(files, range(12), 40, 32)[k]
        got = [item for item in stage.ArchiveStream(source, range(12), 40, 32) if item[1] == k][0]
        assert ok and got[2] and torch_equal(got[0], want)
    model, _ = stage.build_backbone("test_efficientnet", None, random_init=True)
    pre = stage.Preprocess.for_model(model, 32)
    positions = [1, 2, 3, 8, 9, 10, 11]  # parts of both shards (a resumed or rescored run)
    runs = {w: list(stage.extract(model, pre, archives=source, positions=positions, batch_size=2, workers=w))
            for w in (0, 2)}
    for w, batches in runs.items():
        assert np.concatenate([b.positions for b in batches]).tolist() == positions, w
    np.testing.assert_allclose(np.concatenate([b.features for b in runs[2]]),
                               np.concatenate([b.features for b in runs[0]]), atol=1e-6)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_in_order_puts_shuffled_batches_back_in_position_order():
    positions = np.array([5, 9, 12, 20, 21, 30])
    rng = np.random.default_rng(0)
    ranks = rng.permutation(6)
    out = []
    reorder = stage._InOrder(positions)
    for chunk in (ranks[:2], ranks[2:3], ranks[3:]):
        fb = stage.FeatureBatch(chunk, chunk[:, None].astype(np.float32) * np.ones((1, 4), np.float32), None,
                                np.ones(len(chunk), bool), [str(r) for r in chunk])
        out += list(reorder(fb))
    reorder.check_done()
    assert np.concatenate([b.positions for b in out]).tolist() == positions.tolist()
    assert np.concatenate([b.features[:, 0] for b in out]).tolist() == list(range(6))
    assert sum((b.reasons for b in out), []) == [str(r) for r in range(6)]
    with pytest.raises(RuntimeError, match="gave 0 of 6 rows"):
        stage._InOrder(positions).check_done()


def test_undecodable_member_is_logged_and_skipped_with_shard_and_key(tmp_path, sinet):
    members = []
    for k in range(6):
        members += [(f"{k:09d}.jpg", b"\xff\xd8\xff\xe0 not a jpeg" if k == 4 else jpeg_bytes(k)),
                    (f"{k:09d}.json", json.dumps({"label": CLASSES[k % 3]}).encode())]
    shard = raw_tar(tmp_path / "s" / "00000.tar", members)
    code, _, err = sinet("extract-features", "--data", f"webdataset:{shard}", *TINY, "--workers", "0",
                         "--out", tmp_path / "out")
    assert code == 0, err
    f = features(tmp_path / "out" / "features.h5")
    assert f["ids"].tolist() == [f"00000/{k:09d}" for k in (0, 1, 2, 3, 5)]
    assert f["skipped_ids"] == ["00000/000000004"]
    assert f["skipped_reasons"][0].startswith(f"{shard}#000000004.jpg: cannot decode image")
    assert "skipped image 00000/000000004" in err


def test_interrupted_extraction_from_shards_resumes_without_redoing_chunks(tmp_path, sinet, monkeypatch):
    _, shards = files_and_shards(tmp_path)
    args = ["extract-features", "--data", shards, *TINY, "--workers", "0", "--batch-size", "2", "--chunk-rows", "4"]
    code, _, err = sinet(*args, "--out", tmp_path / "full")
    assert code == 0, err
    full = features(tmp_path / "full" / "features.h5")

    real_extract = stage.extract
    seen: list[int] = []

    def interrupted(*a, **kw):
        for k, batch in enumerate(real_extract(*a, **kw)):
            if k == 5:  # 2 chunks of 4 rows flushed (batches 0-3), mid third chunk
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(stage, "extract", interrupted)
    code, _, err = sinet(*args, "--out", tmp_path / "part")
    assert code != 0 and "8 rows written; run the same command again to resume" in err
    assert (tmp_path / "part" / "features.h5.partial").exists()

    def recording(*a, **kw):
        seen.extend(kw["positions"])
        yield from real_extract(*a, **kw)

    monkeypatch.setattr(stage, "extract", recording)
    code, _, err = sinet(*args, "--out", tmp_path / "part")
    assert code == 0, err
    assert "resuming at image 8" in err and seen == list(range(8, 12))
    part = features(tmp_path / "part" / "features.h5")
    assert part["ids"].tolist() == full["ids"].tolist()
    np.testing.assert_array_equal(part["features"], full["features"])


def test_rescore_appends_only_the_new_shards_ids(tmp_path, sinet):
    classes = class_table(tmp_path)
    crawl(tmp_path, shards=2, per_shard=6)
    art = tmp_path / "art"
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/*.tar", "--classes", classes,
                         *TINY, "--workers", "0", "--out", art)
    assert code == 0, err
    score_on_flat_graph(art, CLASSES, sinet)
    before = features(art / "features.h5")

    crawl(tmp_path, shards=1, per_shard=6, start=12, folder="new")  # new/00002.tar: samples 12-17
    new = f"webdataset:{tmp_path}/new/*.tar"
    code, _, err = sinet("rescore", "--data", new, "--classes", classes, "--out", art, "--workers", "0",
                         "--device", "cpu")
    assert code == 0, err
    assert "appended 6 new images" in err and "scoring 6 new" in err, err
    after = features(art / "features.h5")
    assert after["ids"][:12].tolist() == before["ids"].tolist()
    assert after["ids"][12:].tolist() == [f"00002/{k:09d}" for k in range(12, 18)]
    np.testing.assert_array_equal(after["features"][:12], before["features"])
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert sorted(s.read("ids")) == sorted(after["ids"])

    # the new rows are what extract-features computes for those shards from scratch
    code, _, err = sinet("extract-features", "--data", new, "--classes", classes, *TINY, "--workers", "0",
                         "--out", tmp_path / "fresh")
    assert code == 0, err
    np.testing.assert_array_equal(features(tmp_path / "fresh" / "features.h5")["features"], after["features"][12:])

    # again, or with every shard: nothing new
    for data in (new, f"webdataset:{tmp_path}/{{crawl,new}}/*.tar"):
        code, _, err = sinet("rescore", "--data", data, "--classes", classes, "--out", art, "--workers", "0",
                             "--device", "cpu")
        assert code == 0 and "nothing new" in err, err
