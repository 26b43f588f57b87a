"""Read a downstream dataset from disk into train/val/test samples plus nested label fractions (1/10/100%).

Four layouts (REFERENCE.md §3):
- "official": the ECAMP fine-tuning split lists, `train_list{,_1,_10}.txt`, `val_list.txt`, `test_list.txt`
  for classification, or the same names as `.csv` (`image_path,bbox`) for RSNA detection/segmentation;
- "siim": the SIIM pneumothorax CSVs (`ImageId,EncodedPixels`, Kaggle stage-1 RLE);
- "generic": one CSV with `image_path,split` and per-task columns (e.g. the fundus sets of Tables 10-11);
- "synth": the demo corpus's `downstream/` folder.

A bad row is an error naming the file and 1-based line (`DatasetError`), never a silent skip: a dropped row
would change the split sizes that the paper's numbers are compared against. Where a dataset ships its own
1% and 10% lists they are used as given; otherwise `nested_fractions` draws them, seeded and nested.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

from models.images import ImageLoadError, image_size

TASKS = ("classification", "segmentation", "detection")
Task = Literal["classification", "segmentation", "detection"]
BoxFormat = Literal["xyxy", "xywh"]
Box = tuple[float, float, float, float]
PERCENTS = (1, 10, 100)
OFFICIAL_LISTS = ("train_list", "train_list_1", "train_list_10", "val_list", "test_list")
SPLIT_ALIASES = {"train": "train", "val": "val", "validate": "val", "test": "test"}
LESION = ("lesion",)  # the single foreground class of segmentation/detection sets that name none


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, the 1-based line and the problem."""

    def __init__(self, path: Path, line: int | None, problem: str):
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable (e.g. across process or Prefect task boundaries) despite the 3 args
        return (type(self), (self.path, self.line, self.problem))


@dataclass(frozen=True)
class Sample:
    image: Path  # absolute path
    labels: tuple[int, ...] = ()  # multi-hot for multi-label; (class_index,) for multi-class
    mask: Path | None = None  # PNG mask (nonzero = lesion)
    rle: str | None = None  # SIIM Kaggle RLE (relative offsets, column-major); "-1" = empty; " | " joins rows
    boxes: tuple[Box, ...] = ()  # x1, y1, x2, y2 in source-image pixels (x2/y2 = right/bottom edge)


@dataclass(frozen=True)
class Splits:
    name: str
    task: str
    classes: tuple[str, ...]
    multilabel: bool
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    fractions: dict[int, tuple[int, ...]]  # label percent (1, 10, 100) -> sorted indices into train


# ------------------------------------------------------------------------------------------------------------
# Official ECAMP classification lists


def read_official_classification(
    folder: Path,
    classes: Sequence[str],
    multilabel: bool,
    image_root: Path | None = None,
    seed: int = 0,
) -> Splits:
    """Read `train_list.txt`, `val_list.txt`, `test_list.txt` (+ optional `train_list_1/_10.txt`).

    Each line is `<relative image path> <label> [<label> ...]`: len(classes) 0/1 labels when `multilabel`,
    else one class index. The 1%/10% lists are looked up in train_list by image path; without them the
    fractions come from `nested_fractions(seed=seed)`.
    """
    folder = Path(folder)
    root = Path(image_root) if image_root is not None else folder
    files = _official_files(folder, ".txt")

    def read(path: Path) -> list[tuple[int, Sample]]:
        return list(_read_list_txt(path, root, tuple(classes), multilabel))

    return _assemble_official(folder, "classification", tuple(classes), multilabel, files, read, seed)


def _read_list_txt(
    path: Path, root: Path, classes: tuple[str, ...], multilabel: bool
) -> Iterator[tuple[int, Sample]]:
    for line_no, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        fields = line.split()
        if not fields:
            continue
        labels = _official_labels(path, line_no, fields[1:], classes, multilabel)
        yield line_no, Sample(image=_image(path, line_no, root, fields[0]), labels=labels)


def _official_labels(
    path: Path, line_no: int, tokens: list[str], classes: tuple[str, ...], multilabel: bool
) -> tuple[int, ...]:
    expected = len(classes) if multilabel else 1
    if len(tokens) != expected:
        what = f"the dataset has {len(classes)} classes" if multilabel else "a multi-class line has 1 index"
        raise DatasetError(path, line_no, f"{len(tokens)} labels, {what}")
    if multilabel:
        return tuple(_binary(path, line_no, token) for token in tokens)
    return (_class_index(path, line_no, tokens[0], classes),)


# ------------------------------------------------------------------------------------------------------------
# Official ECAMP box CSVs (RSNA detection and segmentation) and SIIM


def read_official_boxes(
    folder: Path,
    task: Literal["detection", "segmentation"],
    image_root: Path | None = None,
    box_format: BoxFormat = "xyxy",
    seed: int = 0,
) -> Splits:
    """Read the RSNA-style `train_list{,_1,_10}.csv`, `val_list.csv`, `test_list.csv` (`image_path,bbox`).

    `bbox` is a JSON list of boxes in source-image pixels; an all-zero box means "no finding". The official
    code reads them as `[x1, y1, x2, y2]` ("xyxy", the default); "xywh" (`[x, y, w, h]`) is accepted for
    files written that way. Reading an xywh file as xyxy usually fails loudly (x2 <= x1). For segmentation
    the boxes are filled into masks by the consumer.
    """
    if task not in ("detection", "segmentation"):
        raise ValueError(f"official box lists are for detection or segmentation, not {task!r}")
    folder = Path(folder)
    root = Path(image_root) if image_root is not None else folder
    files = _official_files(folder, ".csv")

    def read(path: Path) -> list[tuple[int, Sample]]:
        return [
            (
                line_no,
                Sample(
                    image=_image(path, line_no, root, row["image_path"]),
                    boxes=parse_boxes(path, line_no, row["bbox"], box_format),
                ),
            )
            for line_no, row in _read_csv(path, ("image_path", "bbox"))
        ]

    return _assemble_official(folder, task, LESION, False, files, read, seed)


def read_siim(folder: Path, image_root: Path | None = None, seed: int = 0) -> Splits:
    """Read the SIIM pneumothorax CSVs (`ImageId,EncodedPixels`); images are `<image_root>/<ImageId>.png`.

    Rows sharing an ImageId are one image whose RLEs are OR-ed: `Sample.rle` keeps the non-empty RLEs joined
    by " | " ("-1" when all are empty); `rle_decode` takes that string. The training rule "all positives plus
    as many negatives" is `balance_positives`, applied by the consumer to the chosen fraction.
    """
    folder = Path(folder)
    root = Path(image_root) if image_root is not None else folder
    files = _official_files(folder, ".csv")

    def read(path: Path) -> list[tuple[int, Sample]]:
        return _read_siim_csv(path, root)

    return _assemble_official(folder, "segmentation", ("pneumothorax",), False, files, read, seed)


def _read_siim_csv(path: Path, root: Path) -> list[tuple[int, Sample]]:
    first_line: dict[str, int] = {}
    images: dict[str, Path] = {}
    rles: dict[str, list[str]] = {}
    for line_no, row in _read_csv(path, ("ImageId", "EncodedPixels")):
        image_id = row["ImageId"].strip()
        if not image_id:
            raise DatasetError(path, line_no, "empty ImageId")
        rle = " ".join(row["EncodedPixels"].split())
        _check_rle(path, line_no, rle)
        if image_id not in first_line:
            first_line[image_id] = line_no
            images[image_id] = _image(path, line_no, root, f"{image_id}.png")
        _check_rle_extent(path, line_no, rle, images[image_id])
        rles.setdefault(image_id, []).append(rle)
    return [(first_line[i], Sample(image=images[i], rle=_join_rles(parts))) for i, parts in rles.items()]


def _check_rle_extent(path: Path, line_no: int, rle: str, image: Path) -> None:
    """A mask's runs must end inside its image (read from the image's header, for the images with a
    lesion only): found here, the error names the line; found while decoding, it could name neither."""
    if rle == "-1":
        return
    end = sum(int(t) for t in rle.split())  # each run starts where the previous one ended
    try:
        height, width = image_size(image)
    except ImageLoadError as err:
        raise DatasetError(path, line_no, f"image {err}") from None
    if end > height * width:
        raise DatasetError(
            path, line_no, f"EncodedPixels run to pixel {end}, outside the {height}x{width} image {image}"
        )


def _check_rle(path: Path, line_no: int, rle: str) -> None:
    if rle == "-1":
        return
    tokens = rle.split()
    if not tokens or len(tokens) % 2 or not all(t.isdigit() for t in tokens):
        raise DatasetError(
            path, line_no, f"EncodedPixels must be -1 or pairs of non-negative integers: {rle!r}"
        )


def _join_rles(parts: list[str]) -> str:
    runs = [p for p in parts if p != "-1"]
    return " | ".join(runs) if runs else "-1"


def rle_decode(rles: str | Sequence[str], height: int, width: int) -> np.ndarray:
    """Decode Kaggle stage-1 SIIM RLE(s) to a bool [height, width] mask; several RLEs are OR-ed.

    Each RLE is `start length start length ...` where every start is relative to the end of the previous
    run and pixels are numbered column-major (the official `reshape(1024, 1024).T`). "-1" is empty; a string
    may hold several RLEs joined by "|" (as `Sample.rle` does).
    """
    parts = rles.split("|") if isinstance(rles, str) else list(rles)
    flat = np.zeros(height * width, dtype=bool)
    for part in parts:
        tokens = part.split()
        if tokens == ["-1"] or not tokens:
            continue
        if len(tokens) % 2:
            raise ValueError(f"RLE has an odd number of values: {part.strip()[:60]!r}")
        position = 0
        values = [int(t) for t in tokens]
        for start, length in zip(values[0::2], values[1::2], strict=True):
            position += start
            if start < 0 or length < 0 or position + length > flat.size:
                raise ValueError(f"RLE run at {position} (+{length}) is outside a {height}x{width} image")
            flat[position : position + length] = True
            position += length
    return flat.reshape(width, height).T


def balance_positives(samples: Sequence[Sample], seed: int) -> tuple[Sample, ...]:
    """All samples with a lesion plus as many seeded random negatives (all if fewer), in input order.

    The official SIIM training rule: it keeps the mostly-negative set from drowning the Dice loss.
    """
    flags = [has_lesion(s) for s in samples]
    negatives = [i for i, positive in enumerate(flags) if not positive]
    n_keep = min(len(negatives), sum(flags))
    chosen = set(np.random.default_rng(seed).choice(negatives, size=n_keep, replace=False).tolist())
    return tuple(s for i, s in enumerate(samples) if flags[i] or i in chosen)


def parse_boxes(path: Path, line_no: int, text: str, box_format: BoxFormat = "xyxy") -> tuple[Box, ...]:
    """Boxes from a JSON list like `[[x1, y1, x2, y2], ...]`; all-zero boxes (the official "none") dropped."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(path, line_no, f"boxes are not valid JSON ({err.msg}): {text[:60]!r}") from None
    if not isinstance(value, list):
        raise DatasetError(path, line_no, f"boxes must be a JSON list of [4 numbers] lists: {text[:60]!r}")
    boxes = []
    for k, item in enumerate(value, start=1):
        if not _four_numbers(item):
            raise DatasetError(path, line_no, f"box {k} is not a list of 4 finite numbers: {item!r}")
        if not any(item):
            continue
        x1, y1, a, b = (float(v) for v in item)
        x2, y2 = (x1 + a, y1 + b) if box_format == "xywh" else (a, b)
        if x2 <= x1 or y2 <= y1:
            problem = f"box {k} {item} is empty as {box_format} (x2 <= x1 or y2 <= y1); is the format right?"
            raise DatasetError(path, line_no, problem)
        boxes.append((x1, y1, x2, y2))
    return tuple(boxes)


def _four_numbers(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in item)
    )


# ------------------------------------------------------------------------------------------------------------
# Shared assembly of the official five-file layout


def _official_files(folder: Path, suffix: str) -> dict[str, Path | None]:
    """The five list files; train/val/test must exist, the 1%/10% pair is optional but comes as a pair."""
    files = {stem: folder / f"{stem}{suffix}" for stem in OFFICIAL_LISTS}
    expected = ", ".join(f"{stem}{suffix}" for stem in OFFICIAL_LISTS)
    for stem in ("train_list", "val_list", "test_list"):
        if not files[stem].is_file():
            problem = f"missing; expected {expected} in {folder} (the 1% and 10% lists are optional)"
            raise DatasetError(files[stem], None, problem)
    present = [stem for stem in ("train_list_1", "train_list_10") if files[stem].is_file()]
    if len(present) == 1:
        other = "train_list_10" if present == ["train_list_1"] else "train_list_1"
        problem = f"missing while {present[0]}{suffix} exists; give both or neither (neither: drawn by seed)"
        raise DatasetError(files[other], None, problem)
    return {stem: (path if path.is_file() else None) for stem, path in files.items()}


def _assemble_official(
    folder: Path,
    task: str,
    classes: tuple[str, ...],
    multilabel: bool,
    files: dict[str, Path | None],
    read: Callable[[Path], list[tuple[int, Sample]]],
    seed: int,
) -> Splits:
    lists: dict[str, list[tuple[int, Sample]]] = {}
    for stem, path in files.items():
        if path is None:
            continue
        lists[stem] = read(path)
        if not lists[stem]:
            raise DatasetError(path, None, "lists no images")
        _check_unique(path, lists[stem])
    train_path, test_path = files["train_list"], files["test_list"]
    assert train_path is not None and test_path is not None  # checked by _official_files
    train = tuple(s for _, s in lists["train_list"])
    test = tuple(s for _, s in lists["test_list"])
    check_disjoint(test_path, train, test, train_path.name)
    if "train_list_1" in lists:
        fractions = {
            1: _subset(files["train_list_1"], lists["train_list_1"], train_path, lists["train_list"]),
            10: _subset(files["train_list_10"], lists["train_list_10"], train_path, lists["train_list"]),
            100: tuple(range(len(train))),
        }
    else:
        fractions = nested_fractions(train, PERCENTS, seed, multilabel)
    return Splits(
        name=folder.name,
        task=task,
        classes=classes,
        multilabel=multilabel,
        train=train,
        val=tuple(s for _, s in lists["val_list"]),
        test=test,
        fractions=fractions,
    )


def check_disjoint(source: Path, train: Sequence[Sample], test: Sequence[Sample], train_name: str) -> None:
    """DatasetError (on `source`) when a test image is also a training image, naming how many and a few.

    A test image the model was trained on inflates every score of the table, and nothing downstream can see
    it. Paths are compared with symlinks resolved, so `img/../a.png`, `a.png` and a link to it are one image.
    """
    both = sorted({os.path.realpath(s.image) for s in test} & {os.path.realpath(s.image) for s in train})
    if not both:
        return
    shown = ", ".join(both[:3]) + (f" and {len(both) - 3} more" if len(both) > 3 else "")
    problem = (
        f"{len(both)} test image(s) are also in {train_name} ({shown}): a test image the model was trained "
        "on inflates its score; list each image in one split"
    )
    raise DatasetError(source, None, problem)


def _check_unique(path: Path, rows: list[tuple[int, Sample]]) -> None:
    seen: dict[Path, int] = {}
    for line_no, sample in rows:
        if sample.image in seen:
            raise DatasetError(
                path, line_no, f"{sample.image} is already listed on line {seen[sample.image]}"
            )
        seen[sample.image] = line_no


def _subset(
    path: Path | None, rows: list[tuple[int, Sample]], train_path: Path, train_rows: list[tuple[int, Sample]]
) -> tuple[int, ...]:
    """Indices into train_list of a 1%/10% list's rows; each must be a train_list row with the same labels."""
    assert path is not None
    where = {s.image: (i, line_no, s) for i, (line_no, s) in enumerate(train_rows)}
    indices = []
    for line_no, sample in rows:
        if sample.image not in where:
            raise DatasetError(path, line_no, f"{sample.image} is not in {train_path.name}")
        index, train_line, train_sample = where[sample.image]
        if sample != train_sample:
            raise DatasetError(path, line_no, f"labels differ from {train_path.name}:{train_line}")
        indices.append(index)
    return tuple(sorted(indices))


# ------------------------------------------------------------------------------------------------------------
# Generic CSV


def read_generic_csv(
    path: Path,
    task: Task,
    classes: Sequence[str] | None = None,
    multilabel: bool = True,
    seed: int = 0,
) -> Splits:
    """Read one CSV with `image_path,split` (train/val/validate/test) and per-task columns.

    classification: one 0/1 column per class (`classes` names them), or a `label` column holding a class
    name or index (multi-class, so `multilabel=False`); segmentation: `mask_path`; detection: `boxes`, a
    JSON list of [x1, y1, x2, y2] ("[]" for none). Relative paths resolve against the CSV's folder.
    Train must be non-empty; val/test may be empty.
    """
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if task == "classification" and not classes:
        raise ValueError("classification needs `classes` (the class names, in label order)")
    names = tuple(classes) if classes else LESION
    header = _csv_header(path)
    row_reader = _generic_row_reader(path, header, task, names, multilabel)
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for line_no, row in _read_csv(path, ("image_path", "split")):
        split = SPLIT_ALIASES.get(row["split"].strip().lower())
        if split is None:
            raise DatasetError(
                path, line_no, f"split {row['split']!r} is not one of train, val, validate, test"
            )
        splits[split].append(row_reader(line_no, row))
    return drawn_splits(path, path.stem, task, names, multilabel and task == "classification", splits, seed)


def _generic_row_reader(
    path: Path, header: list[str], task: str, classes: tuple[str, ...], multilabel: bool
) -> Callable[[int, dict[str, str]], Sample]:
    """A function (line_no, row) -> Sample for this CSV's task and columns; header problems raise here."""
    root = path.parent

    def need(column: str) -> None:
        if column not in header:
            raise DatasetError(path, 1, f"no {column!r} column (the header has {', '.join(header)})")

    if task == "segmentation":
        need("mask_path")
        return lambda n, row: Sample(
            image=_image(path, n, root, row["image_path"]),
            mask=_image(path, n, root, row["mask_path"], "mask"),
        )
    if task == "detection":
        need("boxes")
        return lambda n, row: Sample(
            image=_image(path, n, root, row["image_path"]), boxes=parse_boxes(path, n, row["boxes"])
        )
    if "label" in header:
        if multilabel:
            raise DatasetError(path, 1, "has a 'label' column (one class per image): pass multilabel=False")
        return lambda n, row: Sample(
            image=_image(path, n, root, row["image_path"]),
            labels=(_class_index(path, n, row["label"], classes),),
        )
    missing = [c for c in classes if c not in header]
    if missing:
        raise DatasetError(path, 1, f"no column for classes {', '.join(missing)} and no 'label' column")
    return lambda n, row: Sample(
        image=_image(path, n, root, row["image_path"]),
        labels=_class_columns(path, n, row, classes, multilabel),
    )


def _class_columns(
    path: Path, line_no: int, row: dict[str, str], classes: tuple[str, ...], multilabel: bool
) -> tuple[int, ...]:
    hot = tuple(_binary(path, line_no, row[c]) for c in classes)
    if multilabel:
        return hot
    if sum(hot) != 1:
        raise DatasetError(path, line_no, f"{sum(hot)} classes marked 1; a multi-class row marks exactly one")
    return (hot.index(1),)


# ------------------------------------------------------------------------------------------------------------
# Demo corpus


def read_synth(root: Path, task: Task, seed: int = 0) -> Splits:
    """The demo corpus's downstream sets (models/synth/corpus.py).

    `downstream/classes.csv` gives the frontal images, split (validate -> val) and the finding labels;
    segmentation adds `downstream/masks/<dicom_id>.png`, detection the rows of `downstream/boxes.csv`
    (pixels, x2/y2 exclusive, i.e. the box's right/bottom edge; an image without a row has no box).
    """
    root = Path(root)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    classes_csv = root / "downstream" / "classes.csv"
    header = _csv_header(classes_csv)
    fixed = ["dicom_id", "image_path", "study_id", "split"]
    if header[:4] != fixed or len(header) == 4:
        raise DatasetError(classes_csv, 1, f"header must start {','.join(fixed)} and then name the classes")
    classes = tuple(header[4:])
    boxes = _synth_boxes(root / "downstream" / "boxes.csv") if task == "detection" else {}
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    dicom_ids = set()
    for line_no, row in _read_csv(classes_csv, tuple(fixed)):
        split = SPLIT_ALIASES.get(row["split"])
        if split is None:
            raise DatasetError(classes_csv, line_no, f"split {row['split']!r} is not train, validate or test")
        dicom_ids.add(row["dicom_id"])
        splits[split].append(_synth_sample(classes_csv, line_no, row, task, classes, boxes))
    for dicom_id, (line_no, _) in boxes.items():
        if dicom_id not in dicom_ids:
            raise DatasetError(
                root / "downstream" / "boxes.csv", line_no, f"{dicom_id} is not in classes.csv"
            )
    multilabel = task == "classification"
    names = classes if multilabel else LESION
    return drawn_splits(classes_csv, root.name, task, names, multilabel, splits, seed)


def drawn_splits(
    source: Path,
    name: str,
    task: str,
    classes: tuple[str, ...],
    multilabel: bool,
    splits: dict[str, list[Sample]],
    seed: int,
) -> Splits:
    """Splits read from one file, with the 1/10/100 % subsets drawn by seed (no official fraction lists)."""
    if not splits["train"]:
        raise DatasetError(source, None, "has no train rows")
    train = tuple(splits["train"])
    check_disjoint(source, train, splits["test"], "the train split")
    return Splits(
        name=name,
        task=task,
        classes=classes,
        multilabel=multilabel,
        train=train,
        val=tuple(splits["val"]),
        test=tuple(splits["test"]),
        fractions=nested_fractions(train, PERCENTS, seed, multilabel),
    )


def _synth_sample(
    path: Path,
    line_no: int,
    row: dict[str, str],
    task: str,
    classes: tuple[str, ...],
    boxes: dict[str, tuple[int, list[Box]]],
) -> Sample:
    corpus = path.parent.parent
    image = _image(path, line_no, corpus, row["image_path"])
    if task == "classification":
        return Sample(image=image, labels=tuple(_binary(path, line_no, row[c]) for c in classes))
    if task == "segmentation":
        mask = _image(path, line_no, corpus, f"downstream/masks/{row['dicom_id']}.png", "mask")
        return Sample(image=image, mask=mask)
    return Sample(image=image, boxes=tuple(boxes.get(row["dicom_id"], (0, []))[1]))


def _synth_boxes(path: Path) -> dict[str, tuple[int, list[Box]]]:
    """dicom_id -> (first line, its boxes) from boxes.csv."""
    out: dict[str, tuple[int, list[Box]]] = {}
    for line_no, row in _read_csv(path, ("dicom_id", "x1", "y1", "x2", "y2")):
        try:
            x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        except ValueError:
            raise DatasetError(path, line_no, "x1, y1, x2, y2 must be numbers") from None
        if not (x2 > x1 and y2 > y1):
            raise DatasetError(path, line_no, f"empty box ({x1}, {y1}, {x2}, {y2})")
        out.setdefault(row["dicom_id"], (line_no, []))[1].append((x1, y1, x2, y2))
    return out


# ------------------------------------------------------------------------------------------------------------
# Label fractions


def nested_fractions(
    train: Sequence[Sample],
    percents: Sequence[int] = PERCENTS,
    seed: int = 0,
    multilabel: bool = True,
) -> dict[int, tuple[int, ...]]:
    """Seeded, nested, stratified label fractions: percent -> sorted indices into `train`.

    One global order of the training set is drawn and every fraction is a prefix of it, which is what makes
    1% ⊂ 10% ⊂ 100%; a fraction has max(1, ceil(p * n / 100)) samples. The order interleaves strata so each
    prefix keeps their proportions to within one sample: stratum s's j-th member (in a seeded permutation)
    sits at (j + u_s) / n_s, u_s a seeded offset in [0, 1). Strata: multi-class -> the class; multi-label ->
    the sample's rarest positive class, or "none" (so a rare class is spread along the order instead of
    hiding behind a common co-occurring one); samples without labels (segmentation, detection) -> whether
    they have a lesion (`has_lesion`).
    """
    if not train:
        raise ValueError("cannot draw label fractions from an empty training set")
    if any(not 0 < p <= 100 for p in percents):
        raise ValueError(f"percents must be in (0, 100]: {list(percents)}")
    rng = np.random.default_rng(seed)
    strata = _strata(train, multilabel)
    keyed: list[tuple[float, int, int]] = []
    for rank, key in enumerate(sorted(strata)):
        members = rng.permutation(strata[key])
        offset = rng.random()
        keyed.extend(((j + offset) / len(members), rank, int(i)) for j, i in enumerate(members))
    order = [i for _, _, i in sorted(keyed)]
    n = len(order)
    return {int(p): tuple(sorted(order[: max(1, -(-p * n // 100))])) for p in percents}


def _strata(train: Sequence[Sample], multilabel: bool) -> dict[int, list[int]]:
    labelled = [bool(s.labels) for s in train]
    if any(labelled) and not all(labelled):
        raise ValueError("some training samples have labels and some do not; cannot stratify")
    if not all(labelled):
        keys = [int(has_lesion(s)) for s in train]
    elif not multilabel:
        keys = [s.labels[0] for s in train]
    else:
        counts = np.asarray([s.labels for s in train]).sum(axis=0)
        keys = [
            min((int(counts[c]), c) for c, v in enumerate(s.labels) if v)[1] if any(s.labels) else -1
            for s in train
        ]
    strata: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        strata.setdefault(key, []).append(i)
    return strata


def has_lesion(sample: Sample) -> bool:
    """Whether a segmentation/detection sample shows a lesion: a box, a non-empty RLE, or a nonzero mask."""
    if sample.boxes:
        return True
    if sample.rle is not None:
        return sample.rle.strip() != "-1"
    if sample.mask is not None:
        with Image.open(sample.mask) as mask:
            return bool(np.asarray(mask).any())
    return False


# ------------------------------------------------------------------------------------------------------------
# Spec and dispatcher


class DatasetSpec(BaseModel):
    """Which downstream dataset to load and how (one entry of an evaluation config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["official", "siim", "generic", "synth"]
    task: Task
    path: Path  # folder (official, siim, synth) or CSV file (generic)
    image_root: Path | None = None
    classes: list[str] | None = None
    multilabel: bool = True
    box_format: BoxFormat = "xyxy"
    seed: int = 0  # for drawn fractions
    paper: str | None = None  # the paper's dataset ("chestxray14", "chexpert", "rsna", "covidx", "siim")

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.kind in ("official", "generic") and self.task == "classification" and not self.classes:
            raise ValueError(f"{self.kind} classification needs `classes`")
        if self.kind == "synth" and self.classes is not None:
            raise ValueError("synth datasets take their classes from downstream/classes.csv; drop `classes`")
        if self.kind == "siim" and self.task != "segmentation":
            raise ValueError("siim is a segmentation dataset")
        if self.image_root is not None and self.kind in ("generic", "synth"):
            raise ValueError(f"{self.kind} paths resolve against the data itself; drop `image_root`")
        return self


def load_splits(spec: DatasetSpec) -> Splits:
    """Read the dataset `spec` describes; the returned Splits carries `spec.name`."""
    if spec.kind == "official" and spec.task == "classification":
        assert spec.classes is not None  # validated
        splits = read_official_classification(
            spec.path, spec.classes, spec.multilabel, spec.image_root, spec.seed
        )
    elif spec.kind == "official":
        task = "detection" if spec.task == "detection" else "segmentation"
        splits = read_official_boxes(spec.path, task, spec.image_root, spec.box_format, spec.seed)
    elif spec.kind == "siim":
        splits = read_siim(spec.path, spec.image_root, spec.seed)
    elif spec.kind == "generic":
        splits = read_generic_csv(spec.path, spec.task, spec.classes, spec.multilabel, spec.seed)
    else:
        splits = read_synth(spec.path, spec.task, spec.seed)
    return replace(splits, name=spec.name)


# ------------------------------------------------------------------------------------------------------------
# Small shared readers


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV whose header holds `required`; a row with the wrong field count raises."""
    header = _csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(path, 1, f"header lacks {', '.join(missing)} (it has {', '.join(header)})")
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DatasetError(
                    path, reader.line_num, f"{len(fields)} fields, the header has {len(header)}"
                )
            yield reader.line_num, dict(zip(header, fields, strict=True))


def _csv_header(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(path, None, "missing")
    with io.StringIO(read_text(path), newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DatasetError(path, 1, "empty file; expected a header line")
    return [h.strip() for h in header]


def read_text(path: Path) -> str:
    """A list or CSV file's text: UTF-8 (a BOM is dropped). Another encoding is a DatasetError naming the file
    and the line of the first byte that is not UTF-8, so the user knows which file to convert."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DatasetError(path, None, "is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError(
            path, line, f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None


def _image(path: Path, line_no: int, root: Path, relative: str, what: str = "image") -> Path:
    """Absolute path of a listed file, which must exist under `root`: a list never points outside its image
    root (`../../etc/hostname`, an absolute path), whatever the list came from. Checked on the path as
    written, so an image root holding symlinks to the real files still works."""
    if not relative.strip():
        raise DatasetError(path, line_no, f"empty {what} path")
    base = os.path.normpath(root.absolute())
    joined = os.path.normpath(os.path.join(base, relative.strip()))
    if os.path.isabs(relative.strip()) or os.path.commonpath([base, joined]) != base:
        raise DatasetError(
            path, line_no, f"{what} path {relative.strip()!r} leads outside the image root {base}"
        )
    resolved = (root / relative.strip()).absolute()
    if not resolved.is_file():
        raise DatasetError(path, line_no, f"{what} not found: {resolved}")
    return resolved


def _binary(path: Path, line_no: int, token: str) -> int:
    if token.strip() not in ("0", "1"):
        raise DatasetError(path, line_no, f"label {token!r} is not 0 or 1")
    return int(token)


def _class_index(path: Path, line_no: int, token: str, classes: tuple[str, ...]) -> int:
    token = token.strip()
    if token in classes:
        return classes.index(token)
    try:
        index = int(token)
    except ValueError:
        raise DatasetError(path, line_no, f"label {token!r} is neither a class name nor an integer") from None
    if not 0 <= index < len(classes):
        raise DatasetError(
            path, line_no, f"label {index} is out of range: the dataset has {len(classes)} classes"
        )
    return index
