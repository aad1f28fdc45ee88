"""The listing index of a split: (file, class) pairs written once beside the data.

Listing 1.28 million objects takes minutes on S3; the first process to need a
split lists it once and writes `ROOT/<split>.index.json`, and every later start
(every rank, every restart) reads that one object instead.
"""

import json
import logging
from dataclasses import dataclass

from jcl_k8s import storage
from jcl_k8s.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INDEX_VERSION = 1


@dataclass(frozen=True)
class SplitIndex:
    """The classes of a split and its samples as (path relative to the split, class id)."""

    classes: list[str]
    samples: list[tuple[str, int]]

    def to_json(self) -> str:
        return json.dumps(
            {"version": INDEX_VERSION, "classes": self.classes, "samples": self.samples}
        )

    @classmethod
    def from_json(cls, text: str, url: str) -> "SplitIndex":
        try:
            data = json.loads(text)
            if data.get("version") != INDEX_VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            samples = [(str(path), int(label)) for path, label in data["samples"]]
            return cls(classes=list(data["classes"]), samples=samples)
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"index {url} is not a jcl-k8s index ({error}); delete it") from None


def index_url(root: str, split: str) -> str:
    return storage.join(root, f"{split}.index.json")


def list_split(root: str, split: str, classes: list[str] | None = None) -> SplitIndex:
    """List `ROOT/<split>/<class>/<image>`; `classes` fixes the class ids (val uses train's)."""
    fs, root_path = storage.url_to_fs(root)
    split_path = f"{root_path.rstrip('/')}/{split}"
    with storage.explained(root, "listing"):
        fs.invalidate_cache()
        if not fs.exists(root_path):
            raise DataError(f"data.url {root} does not exist")
        if not fs.isdir(split_path):
            raise DataError(
                f"data.url {root} has no {split}/ folder (expected {split}/<class>/<image>)"
            )
        folders = sorted(
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in fs.ls(split_path, detail=True)
            if entry["type"] == "directory"
        )
        files = fs.find(split_path)

    by_class: dict[str, list[str]] = {name: [] for name in folders}
    for file in files:
        relative = file[len(split_path) :].lstrip("/")
        parts = relative.split("/")
        if len(parts) == 2 and parts[1].lower().endswith(IMAGE_SUFFIXES):
            by_class.setdefault(parts[0], []).append(relative)

    if not by_class:
        raise DataError(f"{root}/{split}/ has no class folders")
    for name, images in by_class.items():
        if not images:
            raise DataError(f"class folder {root}/{split}/{name}/ has no .jpg/.jpeg/.png images")

    if classes is None:
        classes = sorted(by_class)
    unknown = sorted(set(by_class) - set(classes))
    if unknown:
        raise DataError(f"{root}/{split}/ has class {unknown[0]!r}, which train/ does not have")
    ids = {name: i for i, name in enumerate(classes)}
    samples = [(path, ids[name]) for name in sorted(by_class) for path in sorted(by_class[name])]
    return SplitIndex(classes=classes, samples=samples)


def load_index(root: str, split: str, write: bool, classes: list[str] | None = None) -> SplitIndex:
    """The split's index: read it if present, else list the split (and write it if `write`).

    Only one process should pass `write=True`; the others wait for it and read.
    """
    url = index_url(root, split)
    if storage.exists(url):
        return SplitIndex.from_json(storage.read_text(url), url)
    index = list_split(root, split, classes)
    if write:
        try:
            storage.write_text(url, index.to_json())
        except DataError as error:
            # A read-only data bucket is normal; the listing is then repeated per start.
            log.warning("could not write the listing index %s (%s); listing again next time",
                        url, error)
        else:
            log.info("listed %s/%s: %d images in %d classes; index written to %s",
                     root, split, len(index.samples), len(index.classes), url)
    return index
