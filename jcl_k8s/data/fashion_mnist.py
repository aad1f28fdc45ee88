"""`prepare-data fashion-mnist`: Fashion-MNIST's IDX files to ImageNet layout.

Writes ROOT/train/<class>/<n>.png (from the 60k training images) and
ROOT/val/<class>/<n>.png (from the 10k test images) at any fsspec URL, plus the
listing index of both splits, so that training never has to list them.
"""

import gzip
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from jcl_k8s import storage
from jcl_k8s.data.index import SplitIndex, index_url
from jcl_k8s.errors import DataError

log = logging.getLogger(__name__)

CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
SOURCES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
WRITE_CHUNK = 500


def _read_idx(directory: Path, stem: str) -> np.ndarray:
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.exists():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                raw = f.read()
            break
    else:
        raise DataError(
            f"{directory / stem}[.gz] not found: install Debian's dataset-fashion-mnist "
            "or pass --source DIR"
        )
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def balanced_subset(labels: np.ndarray, per_class: int | None) -> list[int]:
    """The first `per_class` images of every class, in file order (all when None)."""
    chosen = []
    for label in range(len(CLASSES)):
        ids = np.flatnonzero(labels == label)
        if per_class is not None:
            if per_class > len(ids):
                raise DataError(f"--per-class {per_class}: class {CLASSES[label]} has {len(ids)}")
            ids = ids[:per_class]
        chosen.extend(int(i) for i in ids)
    return chosen


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def prepare_fashion_mnist(
    url: str,
    source: str = "/usr/share/datasets/fashion-mnist",
    per_class: int | None = None,
    val_per_class: int | None = None,
) -> dict[str, int]:
    """Write the dataset under `url`; returns the number of images per split."""
    if per_class is not None and per_class < 1 or val_per_class is not None and val_per_class < 1:
        raise DataError("--per-class and --val-per-class must be at least 1")
    directory = Path(source)
    fs, root = storage.url_to_fs(url)
    counts = {}
    for split, (images_stem, labels_stem) in SOURCES.items():
        images = _read_idx(directory, images_stem)
        labels = _read_idx(directory, labels_stem)
        chosen = balanced_subset(labels, per_class if split == "train" else val_per_class)

        samples: list[tuple[str, int]] = []
        pending: dict[str, bytes] = {}
        for n, i in enumerate(chosen):
            relative = f"{CLASSES[labels[i]]}/{n:06d}.png"
            samples.append((relative, int(labels[i])))
            pending[f"{root.rstrip('/')}/{split}/{relative}"] = _png(images[i])
            if len(pending) >= WRITE_CHUNK or n == len(chosen) - 1:
                with storage.explained(url, "writing"):
                    if storage.is_local(fs):
                        for path in pending:
                            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    fs.pipe(pending)
                pending = {}

        samples.sort()
        index = SplitIndex(classes=list(CLASSES), samples=samples)
        storage.write_text(index_url(url, split), index.to_json())
        counts[split] = len(samples)
        log.info("wrote %d %s images to %s/%s", len(samples), split, url, split)
    return counts
