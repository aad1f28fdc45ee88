import collections
import json
import shutil

import pytest
import torch

from jcl_k8s.data.dataset import ImageSplit, SkipCounter
from jcl_k8s.data.fashion_mnist import CLASSES, prepare_fashion_mnist
from jcl_k8s.data.index import list_split, load_index
from jcl_k8s.data.transforms import MultiCrop, eval_transform, moco_v2_augmentation
from jcl_k8s.errors import DataError
from tests.conftest import FASHION_MNIST


def test_prepare_data_round_trip_counts_per_class_and_split(fashion_mnist_dir):
    for split, per_class in (("train", 20), ("val", 5)):
        listed = list_split(str(fashion_mnist_dir), split)
        counts = collections.Counter(label for _path, label in listed.samples)
        assert listed.classes == sorted(CLASSES)
        assert len(counts) == 10 and set(counts.values()) == {per_class}
        written = json.loads((fashion_mnist_dir / f"{split}.index.json").read_text())
        assert len(written["samples"]) == 10 * per_class
        by_name = collections.Counter(path.split("/")[0] for path, _ in written["samples"])
        assert by_name == {name: per_class for name in CLASSES}


def test_written_index_is_reused(fashion_mnist_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fashion_mnist_dir, root)
    index = json.loads((root / "train.index.json").read_text())
    index["samples"] = index["samples"][:7]
    (root / "train.index.json").write_text(json.dumps(index))
    assert len(load_index(str(root), "train", write=False).samples) == 7


def test_unreadable_image_is_skipped_counted_and_warned_once(fashion_mnist_dir, tmp_path, caplog):
    root = tmp_path / "damaged"
    shutil.copytree(fashion_mnist_dir, root)
    (root / "train.index.json").unlink()
    index = list_split(str(root), "train")
    bad = root / "train" / index.samples[3][0]
    bad.write_bytes(b"not a png")
    dataset = ImageSplit(str(root), "train", index, eval_transform(32))
    counter = SkipCounter()
    for _ in range(2):
        image, _label, sample_id, skipped = dataset[(0, 3)]
        assert image.shape == (3, 32, 32) and sample_id == 3
        counter.update([skipped])
    assert counter.count == 2
    warnings = [r for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()


def test_views_depend_only_on_seed_epoch_and_sample(fashion_mnist_dir):
    index = list_split(str(fashion_mnist_dir), "train")
    views = MultiCrop(moco_v2_augmentation(32), 3)
    dataset = ImageSplit(str(fashion_mnist_dir), "train", index, views, seed=5)
    first, again = dataset[(1, 10)][0], dataset[(1, 10)][0]
    assert first.shape == (3, 3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, dataset[(2, 10)][0])
    assert not torch.equal(first[0], first[1])


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    from PIL import Image

    for mode, suffix in (("L", "png"), ("CMYK", "jpg")):
        folder = tmp_path / "train" / f"class_{mode}"
        folder.mkdir(parents=True)
        Image.new(mode, (40, 30)).save(folder / f"a.{suffix}")
    index = list_split(str(tmp_path), "train")
    dataset = ImageSplit(str(tmp_path), "train", index, eval_transform(32))
    for i in range(2):
        assert dataset[i][0].shape == (3, 32, 32) and dataset[i][3] == ""


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("no_train", "has no train/ folder"),
        ("empty_class", "class folder .*/train/empty/ has no"),
    ],
)
def test_bad_dataset_layouts_are_named(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "val" / "a").mkdir(parents=True)
    if layout == "empty_class":
        (root / "train" / "full").mkdir(parents=True)
        (root / "train" / "full" / "x.png").write_bytes(b"png")
        (root / "train" / "empty").mkdir()
        (root / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=message):
        load_index(str(root), "train", write=True)


def test_prepare_data_rejects_a_subset_larger_than_the_class(tmp_path):
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    with pytest.raises(DataError, match="--per-class 7000"):
        prepare_fashion_mnist(str(tmp_path), per_class=7000)
    with pytest.raises(DataError, match="not found"):
        prepare_fashion_mnist(str(tmp_path), source=str(tmp_path / "none"))
