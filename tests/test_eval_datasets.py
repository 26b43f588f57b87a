"""Downstream dataset readers: official lists, SIIM, generic CSVs, the demo corpus, and label fractions."""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.evaluate.datasets import (
    DatasetError,
    DatasetSpec,
    Sample,
    balance_positives,
    load_splits,
    nested_fractions,
    read_generic_csv,
    read_official_boxes,
    read_official_classification,
    read_siim,
    read_synth,
    rle_decode,
)
from models.evaluate.pixels import decode_split
from models.evaluate.protocol import lesion_free_test_warning
from models.images import image_size
from models.synth.corpus import SynthConfig, generate_corpus
from tasks.evaluate import Config as EvaluateConfig
from tasks.evaluate import prepare

REAL_IMAGES = Path(__file__).parent / "data" / "real" / "images"
REAL = ("00000001_000.png", "tb0005.png", "Fake_MONOHR1.dcm")
CXR14 = tuple(f"c{i}" for i in range(14))


def _png(path: Path, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if pixels is not None else np.zeros((8, 8), dtype=np.uint8)).save(path)
    return path


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# ------------------------------------------------------------------------------------------------------------
# Official classification lists


def test_official_lists_round_trip_with_real_images(tmp_path):
    lines = {
        "train_list.txt": [f"{REAL[0]} 0 1 0 ", "", f"{REAL[2]} 0 0 0"],
        "train_list_1.txt": [f"{REAL[2]} 0 0 0"],
        "train_list_10.txt": [f"{REAL[2]} 0 0 0 ", f"{REAL[0]} 0 1 0"],
        "val_list.txt": [f"{REAL[2]} 0 0 0"],
        "test_list.txt": [f"{REAL[1]} 1 0 1  "],
    }
    folder = _write(tmp_path / "lists", {name: "\n".join(rows) + "\n" for name, rows in lines.items()})
    splits = read_official_classification(folder, ("a", "b", "c"), multilabel=True, image_root=REAL_IMAGES)

    def written(sample: Sample) -> str:
        return " ".join(
            [sample.image.relative_to(REAL_IMAGES.absolute()).as_posix(), *map(str, sample.labels)]
        )

    for name, part in (
        ("train_list.txt", splits.train),
        ("val_list.txt", splits.val),
        ("test_list.txt", splits.test),
    ):
        assert [written(s) for s in part] == [" ".join(row.split()) for row in lines[name] if row.strip()]
    assert splits.fractions == {1: (1,), 10: (0, 1), 100: (0, 1)}
    assert (splits.name, splits.task, splits.classes, splits.multilabel) == (
        "lists",
        "classification",
        ("a", "b", "c"),
        True,
    )
    for sample in splits.train:
        assert sample.image.is_absolute() and len(image_size(sample.image)) == 2


def test_official_multiclass_lists_and_drawn_fractions(tmp_path):
    rows = "\n".join(f"{REAL[i % 3]} {i % 3}" for i in range(3)) + "\n"
    test_rows = "\n".join(f"test/{REAL[i % 3]} {i % 3}" for i in range(3)) + "\n"
    folder = _write(
        tmp_path / "covidx", {"train_list.txt": rows, "val_list.txt": rows, "test_list.txt": test_rows}
    )
    (folder / "test").mkdir()
    for name in REAL:
        (folder / name).symlink_to(REAL_IMAGES / name)
        (folder / "test" / name).write_bytes((REAL_IMAGES / name).read_bytes())
    splits = read_official_classification(folder, ("normal", "pneumonia", "covid"), multilabel=False)
    assert [s.labels for s in splits.test] == [(0,), (1,), (2,)]
    assert splits.fractions[100] == (0, 1, 2) and len(splits.fractions[1]) == 1  # none listed: drawn
    assert splits.train[0].image == (folder / REAL[0]).absolute()


def _official(tmp_path: Path, **files: str) -> Path:
    good = f"{REAL[0]} {' '.join(['0'] * 14)}\n"
    texts = {"train_list.txt": good, "val_list.txt": good, "test_list.txt": good.replace(REAL[0], REAL[2])}
    texts.update({name.replace("__", "."): text for name, text in files.items()})
    return _write(tmp_path / "cxr14", texts)


def _official_error(folder: Path, multilabel: bool = True, classes=CXR14) -> str:
    with pytest.raises(DatasetError) as err:
        read_official_classification(folder, classes, multilabel, image_root=REAL_IMAGES)
    return str(err.value)


def test_official_wrong_label_count_names_file_and_line(tmp_path):
    folder = _official(tmp_path, train_list__txt=f"{REAL[0]} {'0 ' * 14}\n{REAL[1]} {'0 ' * 13}\n")
    assert _official_error(folder) == f"{folder / 'train_list.txt'}:2: 13 labels, the dataset has 14 classes"
    err = DatasetError(folder / "train_list.txt", 2, "13 labels, the dataset has 14 classes")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_official_bad_labels_name_file_and_line(tmp_path):
    folder = _official(tmp_path, val_list__txt=f"\n{REAL[0]} {'0 ' * 13}2\n")
    assert _official_error(folder) == f"{folder / 'val_list.txt'}:2: label '2' is not 0 or 1"
    multiclass = ("a", "b", "c")
    folder = _official(
        tmp_path,
        train_list__txt=f"{REAL[0]} 1\n",
        val_list__txt=f"{REAL[0]} 1\n",
        test_list__txt=f"{REAL[0]} 1\n{REAL[1]} x\n",
    )
    message = _official_error(folder, False, multiclass)
    assert message == f"{folder / 'test_list.txt'}:2: label 'x' is neither a class name nor an integer"
    one = f"{REAL[0]} 1\n"
    folder = _official(tmp_path, train_list__txt=one, val_list__txt=one, test_list__txt=f"{REAL[0]} 3\n")
    assert "test_list.txt:1: label 3 is out of range: the dataset has 3 classes" in _official_error(
        folder, False, multiclass
    )


def test_official_missing_image_names_file_line_and_path(tmp_path):
    folder = _official(tmp_path, test_list__txt=f"{REAL[0]} {'0 ' * 14}\nmissing/x.png {'0 ' * 14}\n")
    message = _official_error(folder)
    assert (
        message
        == f"{folder / 'test_list.txt'}:2: image not found: {REAL_IMAGES.absolute() / 'missing/x.png'}"
    )


def test_official_missing_list_file_names_it_and_the_expected_files(tmp_path):
    folder = _official(tmp_path)
    (folder / "val_list.txt").unlink()
    message = _official_error(folder)
    assert message.startswith(
        f"{folder / 'val_list.txt'}: missing; expected train_list.txt, train_list_1.txt"
    )
    assert "val_list.txt, test_list.txt" in message
    folder = _official(tmp_path, train_list_1__txt=f"{REAL[0]} {'0 ' * 14}\n")
    assert _official_error(folder).startswith(
        f"{folder / 'train_list_10.txt'}: missing while train_list_1.txt"
    )


def test_official_fraction_lines_must_be_train_lines(tmp_path):
    zeros = "0 " * 14
    folder = _official(
        tmp_path, train_list_1__txt=f"{REAL[1]} {zeros}\n", train_list_10__txt=f"{REAL[0]} {zeros}\n"
    )
    assert (
        _official_error(folder)
        == f"{folder / 'train_list_1.txt'}:1: {REAL_IMAGES / REAL[1]} is not in train_list.txt"
    )
    folder = _official(
        tmp_path, train_list_1__txt=f"{REAL[0]} {zeros}\n", train_list_10__txt=f"{REAL[0]} 1 {zeros[2:]}"
    )
    assert _official_error(folder) == f"{folder / 'train_list_10.txt'}:1: labels differ from train_list.txt:1"
    folder = _official(tmp_path, train_list__txt=f"{REAL[0]} {zeros}\n{REAL[0]} {zeros}\n")
    assert (
        _official_error(folder)
        == f"{folder / 'train_list.txt'}:2: {REAL_IMAGES / REAL[0]} is already listed on line 1"
    )


# ------------------------------------------------------------------------------------------------------------
# Official box CSVs


def _box_csvs(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    """The same rows in the three lists; the test list's images are copies in `test/` (splits are
    disjoint)."""
    folder = tmp_path / "rsna"
    for name, _ in rows:
        _png(folder / name)
        _png(folder / "test" / name)
    text = "image_path,bbox\n" + "".join(f'{name},"{bbox}"\n' for name, bbox in rows)
    test = "image_path,bbox\n" + "".join(f'test/{name},"{bbox}"\n' for name, bbox in rows)
    return _write(folder, {"train_list.csv": text, "val_list.csv": text, "test_list.csv": test})


def test_official_boxes_xyxy_xywh_and_no_box(tmp_path):
    folder = _box_csvs(
        tmp_path,
        [("a.png", "[[0.0, 0.0, 0.0, 0.0]]"), ("b.png", "[[296.0, 297.0, 482.0, 478.0], [6, 2, 8, 9]]")],
    )
    splits = read_official_boxes(folder, "detection")
    assert [s.boxes for s in splits.train] == [(), ((296, 297, 482, 478), (6, 2, 8, 9))]
    assert splits.fractions[100] == (0, 1) and splits.classes == ("lesion",)
    as_xywh = read_official_boxes(folder, "segmentation", box_format="xywh")
    assert as_xywh.train[1].boxes == ((296, 297, 778, 775), (6, 2, 14, 11))
    folder = _box_csvs(tmp_path, [("a.png", "[[300, 300, 50, 40]]")])  # an xywh box read as xyxy
    with pytest.raises(DatasetError, match=r"train_list.csv:2: box 1 \[300, 300, 50, 40\] is empty as xyxy"):
        read_official_boxes(folder, "detection")
    assert read_official_boxes(folder, "detection", box_format="xywh").test[0].boxes == (
        (300, 300, 350, 340),
    )


def test_official_boxes_bad_json_names_line(tmp_path):
    folder = _box_csvs(tmp_path, [("a.png", "[[1, 2, 3, 4]]"), ("b.png", "[[1, 2, 3]]")])
    with pytest.raises(DatasetError, match=r"train_list.csv:3: box 1 is not a list of 4 finite numbers"):
        read_official_boxes(folder, "detection")


# ------------------------------------------------------------------------------------------------------------
# SIIM


def test_rle_decode_hand_example():
    # 4x4, column-major (pixel k is row k % 4, column k // 4), starts relative to the previous run's end:
    # "1 2 5 3" -> pixels 1, 2, then 3 + 5 = 8, 9, 10
    expected = np.zeros((4, 4), dtype=bool)
    expected[[1, 2], 0] = True
    expected[[0, 1, 2], 2] = True
    assert (rle_decode("1 2 5 3", 4, 4) == expected).all()
    assert not rle_decode("-1", 4, 4).any()
    both = rle_decode("1 2 5 3 | 15 1", 4, 4)  # OR of two rows: adds pixel 15 (row 3, column 3)
    assert both[3, 3] and both.sum() == 6
    assert (rle_decode(["-1", "1 2 5 3"], 4, 4) == expected).all()
    with pytest.raises(ValueError, match="outside a 4x4 image"):
        rle_decode("14 3", 4, 4)


def test_read_siim_groups_rows_and_balances(tmp_path):
    images = tmp_path / "png"
    for name in ("p1", "n1", "n2", "n3", "p2"):
        _png(images / f"{name}.png")
    train = "ImageId,EncodedPixels\np1,1 2 5 3\nn1,-1\np1, 15 1\nn2, -1\nn3,-1\n"
    folder = _write(
        tmp_path / "siim",
        {
            "train_list.csv": train,
            "val_list.csv": "ImageId,EncodedPixels\nn1,-1\n",
            "test_list.csv": "ImageId,EncodedPixels\np2,1 2\n",
        },
    )
    splits = read_siim(folder, image_root=images)
    assert [(s.image.name, s.rle) for s in splits.train] == [
        ("p1.png", "1 2 5 3 | 15 1"),
        ("n1.png", "-1"),
        ("n2.png", "-1"),
        ("n3.png", "-1"),
    ]
    assert rle_decode(splits.train[0].rle, 4, 4).sum() == 6
    balanced = balance_positives(splits.train, seed=0)
    assert len(balanced) == 2 and balanced[0] == splits.train[0] and balanced[1].rle == "-1"
    assert balance_positives(splits.train, seed=0) == balanced
    (folder / "test_list.csv").write_text("ImageId,EncodedPixels\np2,1 2 3\n")
    with pytest.raises(DatasetError, match="test_list.csv:2: EncodedPixels must be -1 or pairs"):
        read_siim(folder, image_root=images)
    (folder / "test_list.csv").write_text("ImageId,EncodedPixels\nzz,-1\n")
    with pytest.raises(DatasetError, match=r"test_list.csv:2: image not found: .*zz\.png"):
        read_siim(folder, image_root=images)


# ------------------------------------------------------------------------------------------------------------
# Label fractions


def _binary_samples(n: int, n_positive: int) -> list[Sample]:
    return [Sample(image=Path(f"/x/{i}.png"), labels=(int(i < n_positive),)) for i in range(n)]


def test_fractions_are_deterministic_nested_and_sized():
    train = _binary_samples(200, 40)
    a = nested_fractions(train, seed=3)
    assert a == nested_fractions(train, seed=3)
    assert a != nested_fractions(train, seed=4)
    assert {p: len(ix) for p, ix in a.items()} == {1: 2, 10: 20, 100: 200}
    assert set(a[1]) <= set(a[10]) <= set(a[100]) and a[100] == tuple(range(200))
    assert all(list(ix) == sorted(ix) for ix in a.values())
    assert len(nested_fractions(train[:7])[1]) == 1  # rounded up to at least one sample


def test_fractions_are_stratified():
    train = _binary_samples(200, 40)  # 20% positives
    for seed in range(10):
        ten = nested_fractions(train, seed=seed)[10]
        assert 3 <= sum(train[i].labels[0] for i in ten) <= 5  # 20% of 20 = 4, to within one
    multiclass = [Sample(image=Path(f"/x/{i}.png"), labels=(i % 4,)) for i in range(400)]
    ten = nested_fractions(multiclass, seed=1, multilabel=False)[10]
    assert sorted(np.bincount([multiclass[i].labels[0] for i in ten]).tolist()) == [10, 10, 10, 10]
    lesions = [
        Sample(image=Path(f"/x/{i}.png"), boxes=((0, 0, 1, 1),) if i % 10 == 0 else ()) for i in range(300)
    ]
    ten = nested_fractions(lesions, seed=2, multilabel=False)[10]
    assert sum(bool(lesions[i].boxes) for i in ten) == 3


# ------------------------------------------------------------------------------------------------------------
# Generic CSV


def _rows(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def test_generic_csv_classification(tmp_path):
    for name in ("a", "b", "c", "d"):
        _png(tmp_path / "img" / f"{name}.png")
    path = _rows(
        tmp_path / "fundus.csv",
        ["image_path", "split", "dr", "amd"],
        [
            ["img/a.png", "train", 1, 0],
            ["img/b.png", "val", 0, 1],
            ["img/c.png", "validate", 1, 1],
            ["img/d.png", "test", 0, 0],
        ],
    )
    splits = read_generic_csv(path, "classification", ["amd", "dr"])
    assert [s.labels for s in splits.train + splits.val + splits.test] == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert splits.train[0].image == (tmp_path / "img" / "a.png").absolute() and splits.name == "fundus"
    labels = _rows(
        tmp_path / "aptos.csv",
        ["image_path", "split", "label"],
        [["img/a.png", "train", "severe"], ["img/b.png", "train", 0], ["img/c.png", "test", "2"]],
    )
    splits = read_generic_csv(labels, "classification", ["none", "mild", "severe"], multilabel=False)
    assert [s.labels for s in splits.train + splits.test] == [(2,), (0,), (2,)] and not splits.multilabel
    bad = _rows(
        tmp_path / "bad.csv",
        ["image_path", "split", "label"],
        [["img/a.png", "train", 0], ["img/b.png", "dev", 1]],
    )
    with pytest.raises(
        DatasetError, match=r"bad.csv:3: split 'dev' is not one of train, val, validate, test"
    ):
        read_generic_csv(bad, "classification", ["x", "y"], multilabel=False)
    with pytest.raises(DatasetError, match=r"aptos.csv:1: has a 'label' column .* multilabel=False"):
        read_generic_csv(labels, "classification", ["none", "mild", "severe"])
    with pytest.raises(DatasetError, match=r"fundus.csv:1: no column for classes glaucoma"):
        read_generic_csv(path, "classification", ["dr", "glaucoma"])


def test_generic_csv_segmentation_and_detection(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "masks" / "a.png", np.full((8, 8), 255, dtype=np.uint8))
    path = _rows(
        tmp_path / "seg.csv",
        ["image_path", "split", "mask_path"],
        [["a.png", "train", "masks/a.png"], ["b.png", "test", "masks/a.png"]],
    )
    splits = read_generic_csv(path, "segmentation")
    assert splits.train[0].mask == (tmp_path / "masks" / "a.png").absolute() and splits.val == ()
    missing = _rows(
        tmp_path / "seg2.csv", ["image_path", "split", "mask_path"], [["a.png", "train", "masks/b.png"]]
    )
    with pytest.raises(DatasetError, match=r"seg2.csv:2: mask not found: .*masks/b.png"):
        read_generic_csv(missing, "segmentation")
    det = _rows(
        tmp_path / "det.csv",
        ["image_path", "split", "boxes"],
        [["a.png", "train", "[[1, 2, 5, 6]]"], ["a.png", "train", "[]"], ["a.png", "val", "[[0, 0, 8, 8]]"]],
    )
    splits = read_generic_csv(det, "detection")
    assert [s.boxes for s in splits.train + splits.val] == [((1, 2, 5, 6),), (), ((0, 0, 8, 8),)]


# ------------------------------------------------------------------------------------------------------------
# Demo corpus and the dispatcher


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "mimic"
    generate_corpus(SynthConfig(n_studies=20, image_size=64, seed=5), root)
    return root


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_read_synth_matches_the_corpus_files(tiny_corpus):
    rows = _csv_rows(tiny_corpus / "downstream" / "classes.csv")
    box_rows = _csv_rows(tiny_corpus / "downstream" / "boxes.csv")
    cls = read_synth(tiny_corpus, "classification")
    for split, part in (("train", cls.train), ("validate", cls.val), ("test", cls.test)):
        expected = [r for r in rows if r["split"] == split]
        assert [s.image for s in part] == [(tiny_corpus / r["image_path"]).absolute() for r in expected]
        assert [s.labels for s in part] == [tuple(int(r[c]) for c in cls.classes) for r in expected]
    assert len(cls.classes) == 10 and cls.multilabel
    det = read_synth(tiny_corpus, "detection")
    all_det = det.train + det.val + det.test
    assert sum(len(s.boxes) for s in all_det) == len(box_rows) > 0
    seg = read_synth(tiny_corpus, "segmentation")
    assert all(s.mask is not None and s.mask.is_file() for s in seg.train + seg.val + seg.test)
    lesion_images = {r["dicom_id"] for r in box_rows}
    assert {s.image.stem for s in all_det if s.boxes} == lesion_images


def test_load_splits_dispatches_and_validates(tiny_corpus, tmp_path):
    spec = DatasetSpec(name="demo-cls", kind="synth", task="classification", path=tiny_corpus)
    splits = load_splits(spec)
    assert splits.name == "demo-cls" and splits == load_splits(spec)
    folder = _box_csvs(tmp_path, [("a.png", "[[1, 1, 3, 3]]")])
    spec = DatasetSpec(name="rsna", kind="official", task="detection", path=folder, paper="rsna")
    assert load_splits(spec).train[0].boxes == ((1, 1, 3, 3),)
    with pytest.raises(ValidationError, match="needs `classes`"):
        DatasetSpec(name="x", kind="official", task="classification", path=folder)
    with pytest.raises(ValidationError, match="take their classes"):
        DatasetSpec(name="x", kind="synth", task="classification", path=folder, classes=["a"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        DatasetSpec(name="x", kind="synth", task="detection", path=folder, colour="red")


# ------------------------------------------------------------------------------------------------------------
# Evaluation sets that would give a wrong score without a sign (reliability #17c)


def test_a_test_image_that_is_also_a_training_image_is_refused_naming_the_count_and_a_few(tmp_path):
    names = [f"{i}.png" for i in range(6)]
    for name in names:
        _png(tmp_path / "img" / name)
    (tmp_path / "img" / "alias.png").symlink_to(tmp_path / "img" / "5.png")
    train = "".join(f"{n} 1\n" for n in names)
    test = "".join(f"{n} 0\n" for n in ["0.png", "sub/../1.png", "2.png", "alias.png"])
    (tmp_path / "img" / "sub").mkdir()
    folder = _write(
        tmp_path / "lists", {"train_list.txt": train, "val_list.txt": "0.png 1\n", "test_list.txt": test}
    )
    with pytest.raises(DatasetError) as err:
        read_official_classification(folder, ("a", "b"), multilabel=False, image_root=tmp_path / "img")
    img = (tmp_path / "img").resolve()
    assert str(err.value) == (
        f"{folder / 'test_list.txt'}: 4 test image(s) are also in train_list.txt ({img / '0.png'}, "
        f"{img / '1.png'}, {img / '2.png'} and 1 more): a test image the model was trained on inflates "
        "its score; list each image in one split"
    )
    path = _rows(
        tmp_path / "fundus.csv",
        ["image_path", "split", "label"],
        [["img/0.png", "train", 0], ["img/1.png", "val", 1], ["img/0.png", "test", 1]],
    )
    with pytest.raises(DatasetError) as err:
        read_generic_csv(path, "classification", ["x", "y"], multilabel=False)
    assert str(err.value) == (
        f"{path}: 1 test image(s) are also in the train split ({img / '0.png'}): a test image the model "
        "was trained on inflates its score; list each image in one split"
    )


def test_a_mask_of_another_size_is_refused_not_stretched(tmp_path):
    _png(tmp_path / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    _png(tmp_path / "masks" / "a.png", np.full((16, 12), 255, dtype=np.uint8))
    sample = Sample(image=tmp_path / "a.png", mask=tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError) as err:
        decode_split([sample], 4, "segmentation", workers=1)
    assert str(err.value) == (
        f"{tmp_path / 'masks' / 'a.png'}: mask is 12x16 px but its image {tmp_path / 'a.png'} is 8x8 px "
        "(width x height): a mask must have its image's size"
    )
    _png(tmp_path / "masks" / "a.png", np.full((8, 8), 255, dtype=np.uint8))
    assert decode_split([sample], 4, "segmentation", workers=1).masks.all()


def test_a_box_reaching_outside_its_image_is_refused(tmp_path):
    folder = _box_csvs(tmp_path, [("a.png", "[[2, 2, 8, 8]]"), ("b.png", "[[0, 0, 4, 4], [1, 3, 9, 6]]")])
    splits = read_official_boxes(folder, "detection")
    assert decode_split(splits.train[:1], 4, "detection", workers=1).boxes[0].tolist() == [[1, 1, 4, 4]]
    for task in ("detection", "segmentation"):
        with pytest.raises(DatasetError) as err:
            decode_split(splits.train, 4, task, workers=1)
        assert str(err.value) == (
            f"{folder / 'b.png'}: box 2 [1, 3, 9, 6] (x1, y1, x2, y2) reaches outside the image of 8x8 px "
            "(width x height): boxes are in the image's own pixels"
        )


def test_a_test_split_without_a_lesion_is_warned_about(tmp_path, caplog):
    """The Dice of such a split only counts images left empty: 5 of 6 gave a plausible 83.3."""
    rows = []
    for i, split in enumerate(["train", "train", "val", "test", "test"]):
        _png(tmp_path / f"{i}.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
        _png(tmp_path / "masks" / f"{i}.png", np.full((8, 8), 255 * (split != "test"), dtype=np.uint8))
        rows.append([f"{i}.png", split, f"masks/{i}.png", "[[1, 1, 3, 3]]" if split != "test" else "[]"])
    path = _rows(tmp_path / "set.csv", ["image_path", "split", "mask_path", "boxes"], rows)
    ctx = SimpleNamespace(log=logging.getLogger("test.evaluate"))
    expected = {
        "segmentation": "seg: no image of the test split (2) has a lesion at the input size: its Dice only "
        "counts the images the head leaves empty and says nothing about segmentation",
        "detection": "det: no image of the test split (2) has a box: its mAP is 0 whatever the head predicts",
    }
    for task, message in expected.items():
        spec = DatasetSpec(name=task[:3], kind="generic", task=task, path=path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test.evaluate"):
            prepare(ctx, spec, EvaluateConfig(datasets=[spec], fractions=[100]), 8)
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]
    assert lesion_free_test_warning("cls", "classification", decode_split([], 8, "classification")) is None
