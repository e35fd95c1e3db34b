"""Localization datasets whose class evidence is known by construction.

``layout="pasted"`` (default): each image is a random crop of a natural photo (no class
information) with one object pasted at a random position and scale, in a random colour; the label
is the object's class and the object's pixel mask is written beside the image. Objects: Fashion-MNIST items (Debian's
``dataset-fashion-mnist``) or scikit-learn's digits; backgrounds: scikit-learn's two sample
photos (offline everywhere) or any folder of photos (e.g. the fetched clothing or Tiny-ImageNet
images, ``benchmarks/localization_data.py``).

``layout="blocks"``, Block-MNIST-style (Shah, Jain & Netrapalli, NeurIPS 2021): the image is a
2 x 2 grid of blocks; two of them, drawn at random per image, are filled: one with the object (the
class evidence), the other with one pattern shared by every class (evidence of nothing). The
ground-truth mask is the object's whole block.

Layout (an image folder the recipes and ``evaluate`` read as usual, plus the masks)::

    <root>/localization.json             classes, objects, backgrounds, seed, image size
    <root>/<split>/<class>/<index>.png   the images
    <root>/masks/<split>/<class>/<index>.png   the object masks (255 = object)

``LocalizationDataset`` yields ``{"pixel_values", "labels", "masks"}``, the mask put through
the same resize / crop as the image, so the evaluation can score relevance mass, relevance rank
and the pointing game (``sd_plugin.evaluation.localization``).

Example:
    >>> import tempfile
    >>> root = write_localization_dataset(tempfile.mkdtemp(), objects="digits", counts={"test": 20}, image_size=32)
    >>> data = LocalizationDataset(root, "test", resize_and_scale(32, 3))
    >>> item = data[0]
    >>> tuple(item["pixel_values"].shape), tuple(item["masks"].shape), item["masks"].dtype
    ((3, 32, 32), (32, 32), torch.bool)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .builtin_datasets import load_fashion_mnist
from .image_datasets import IMAGE_EXTENSIONS
from .model_preprocessing import resize_and_scale

__all__ = ["LAYOUTS", "MANIFEST", "LocalizationDataset", "is_localization_dataset", "write_localization_dataset"]

MANIFEST = "localization.json"
LAYOUTS = ("pasted", "blocks")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


def _photo_objects(folder: Path, split: str) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """The RGB photos ``uint8 (h, w, 3)`` of a labelled photo folder's split, their labels, the class names.

    The test objects come from ``test`` (else ``validation`` / ``val``): held out from the training objects.
    """
    from PIL import Image

    names = ("train",) if split == "train" else (split, "validation", "val")
    split_folder = next((folder / name for name in names if (folder / name).is_dir()), None)
    if split_folder is None:
        raise ValueError(f"objects={folder}: no {' or '.join(names)} folder of <class>/ photos in it.")
    classes = sorted(p.name for p in split_folder.iterdir() if p.is_dir())
    photos, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (split_folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            with Image.open(path) as image:
                photos.append(np.asarray(image.convert("RGB")))
            labels.append(label)
    if not photos:
        raise ValueError(f"objects={folder}: no photos under {split_folder}/<class>/.")
    return photos, np.asarray(labels), classes


def _objects(source: str, split: str) -> tuple[Any, np.ndarray, list[str]]:
    """Object intensities in [0, 1] ``(N, h, w)`` (or a folder's RGB photos), labels, class names."""
    if Path(source).is_dir():
        return _photo_objects(Path(source), split)
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        half = len(digits.target) // 2  # train objects from the first half, test objects from the second
        part = slice(0, half) if split == "train" else slice(half, None)
        return digits.images[part] / 16.0, digits.target[part], [str(i) for i in range(10)]
    if source == "fashion-mnist":
        data = load_fashion_mnist("train" if split == "train" else "test")
        return ((data.images[:, 0].numpy() + 1) / 2), data.labels.numpy(), list(FASHION_MNIST_CLASSES)
    raise ValueError(f"objects={source!r} is not supported; use 'fashion-mnist', 'digits' or a labelled photo folder.")


def _backgrounds(source: str | Path | None) -> list[np.ndarray]:
    """RGB photos as ``uint8 (H, W, 3)`` arrays."""
    if source is None:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    from PIL import Image

    paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ValueError(f"backgrounds={source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in that folder.")
    photos = []
    for path in paths[:2000]:
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB")))
    return photos


def _background_crop(photo: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of ``photo`` resized to ``(S, S, 3)``, float in [0, 1]."""
    from PIL import Image

    side = min(photo.shape[:2])
    crop = int(rng.integers(max(8, side // 3), side + 1))
    top, left = int(rng.integers(0, photo.shape[0] - crop + 1)), int(rng.integers(0, photo.shape[1] - crop + 1))
    background = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((image_size, image_size))
    return np.asarray(background, dtype=np.float32) / 255.0


def _compose_photo(
    photo: np.ndarray, item: np.ndarray, image_size: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A photo object pasted whole (its box) on a background crop: ``uint8 (S, S, 3)`` and the box ``bool (S, S)``."""
    from PIL import Image

    image = _background_crop(photo, image_size, rng)
    size = max(4, int(round(rng.uniform(*scale) * image_size)))
    pasted = np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    row, col = int(rng.integers(0, image_size - size + 1)), int(rng.integers(0, image_size - size + 1))
    image[row : row + size, col : col + size] = pasted
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[row : row + size, col : col + size] = True
    return (image * 255).round().astype(np.uint8), mask


def _compose(
    photo: np.ndarray, item: np.ndarray, image_size: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One image ``uint8 (S, S, 3)`` and its object mask ``bool (S, S)``."""
    from PIL import Image

    if item.ndim == 3:  # an RGB photo object: pasted whole
        return _compose_photo(photo, item, image_size, scale, rng)
    background = _background_crop(photo, image_size, rng)
    size = max(4, int(round(rng.uniform(*scale) * image_size)))
    alpha = Image.fromarray((item * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    alpha = np.clip(np.asarray(alpha, dtype=np.float32) / 255.0 * 2.0, 0.0, 1.0)  # a solid object
    row, col = int(rng.integers(0, image_size - size + 1)), int(rng.integers(0, image_size - size + 1))
    full = np.zeros((image_size, image_size), dtype=np.float32)
    full[row : row + size, col : col + size] = alpha
    colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    under = (background * full[..., None]).sum((0, 1)) / max(float(full.sum()), 1e-6)  # what it covers
    if float(np.abs(colour - under).mean()) < 0.35:  # keep the object visible against what it covers
        colour = np.where(under > 0.5, under - 0.5, under + 0.5).astype(np.float32)
    image = background * (1 - full[..., None]) + colour * full[..., None]
    return (image * 255).round().astype(np.uint8), full > 0.25


def _null_pattern(side: int) -> np.ndarray:
    """The block shared by every class: a square frame with a cross, in ``[0, 1]`` (Block-MNIST's null block)."""
    pattern = np.zeros((side, side), dtype=np.float32)
    width = max(1, side // 8)
    pattern[:width], pattern[-width:], pattern[:, :width], pattern[:, -width:] = 1, 1, 1, 1
    middle = side // 2
    pattern[middle - width // 2 : middle + (width + 1) // 2 + 0, :] = 1
    pattern[:, middle - width // 2 : middle + (width + 1) // 2 + 0] = 1
    return pattern


def _compose_blocks(item: np.ndarray, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Block-MNIST image ``uint8 (S, S, 3)`` (object and null block in two random cells) and its mask."""
    from PIL import Image

    side = image_size // 2
    cells = rng.permutation(4)[:2]  # the object's cell, the null block's cell
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    mask = np.zeros((image_size, image_size), dtype=bool)
    resized = Image.fromarray((item * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    blocks = (np.asarray(resized, dtype=np.float32) / 255.0, _null_pattern(side))
    for cell, block in zip(cells, blocks, strict=True):
        row, col = (int(cell) // 2) * side, (int(cell) % 2) * side
        canvas[row : row + side, col : col + side] = block
    row, col = (int(cells[0]) // 2) * side, (int(cells[0]) % 2) * side
    mask[row : row + side, col : col + side] = True
    image = np.repeat(canvas[..., None], 3, axis=2)
    return (image * 255).round().astype(np.uint8), mask


def write_localization_dataset(
    root: str | Path,
    objects: str = "fashion-mnist",
    backgrounds: str | Path | None = None,
    counts: dict[str, int] | None = None,
    image_size: int = 64,
    scale: tuple[float, float] = (0.35, 0.6),
    seed: int = 0,
    layout: str = "pasted",
) -> Path:
    """Write the dataset under ``root`` (see the module docstring) and return ``root``.

    Args:
        objects: ``"fashion-mnist"``, ``"digits"`` or a labelled photo folder (what carries the class).
        backgrounds: a folder of photos, or None for scikit-learn's two sample photos.
        counts: images per split, default ``{"train": 2000, "test": 500}``.
        image_size: side of the square images in pixels.
        scale: the object's side as a fraction of the image side, drawn uniformly.
        seed: everything random (crops, objects, positions, colours) comes from it.
        layout: ``"pasted"`` (an object on a photo) or ``"blocks"`` (Block-MNIST-style, no photo).
    """
    from PIL import Image

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; use one of {LAYOUTS}.")
    root = Path(root)
    counts = counts or {"train": 2000, "test": 500}
    photos = _backgrounds(backgrounds) if layout == "pasted" else []
    rng = np.random.default_rng(seed)
    classes: list[str] = []
    for split, count in counts.items():
        items, labels, classes = _objects(objects, split)
        for index in range(count):
            pick = int(rng.integers(0, len(labels)))
            if layout == "blocks":
                if items[pick].ndim == 3:
                    raise ValueError("layout='blocks' takes grey objects ('fashion-mnist', 'digits'), not photos.")
                image, mask = _compose_blocks(items[pick], image_size, rng)
            else:
                image, mask = _compose(photos[int(rng.integers(0, len(photos)))], items[pick], image_size, scale, rng)
            name = classes[int(labels[pick])]
            for folder, array in ((root / split / name, image), (root / "masks" / split / name, mask * np.uint8(255))):
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"{index:06d}.png")
    manifest = {
        "classes": classes,
        "layout": layout,
        "objects": objects,
        "backgrounds": None if layout == "blocks" else str(backgrounds or "sklearn.datasets.load_sample_images"),
        "counts": counts,
        "image_size": image_size,
        "scale": list(scale),
        "seed": seed,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


def is_localization_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``write_localization_dataset``."""
    return (Path(path) / MANIFEST).is_file()


class LocalizationDataset(Dataset):
    """``{"pixel_values", "labels", "masks"}`` of one split; the mask goes through ``transform`` too.

    The transform (the model's own: resize, crop, normalise) is applied to the mask as a white-on-
    black RGB image and thresholded halfway between its extremes, so the mask stays aligned with
    the pixels whatever the geometry of the transform.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[[Any], Tensor] | None = None):
        self.root = Path(root)
        manifest = json.loads((self.root / MANIFEST).read_text())
        self.classes: list[str] = manifest["classes"]
        directory = self.root / split
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} does not exist; the splits written are {list(manifest['counts'])}.")
        self.samples = [
            (path, self.classes.index(path.parent.name))
            for path in sorted(directory.glob("*/*.png"))
            if path.parent.name in self.classes
        ]
        self.split = split
        self.transform = transform or resize_and_scale(manifest["image_size"], 3)

    def __len__(self) -> int:
        return len(self.samples)

    def mask_path(self, index: int) -> Path:
        path = self.samples[index][0]
        return self.root / "masks" / self.split / path.parent.name / path.name

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = self.transform(image.convert("RGB"))
        with Image.open(self.mask_path(index)) as mask_image:
            raw = mask_image.convert("L")
            transformed = self.transform(raw.convert("RGB"))[0]
            extremes = raw.getextrema()
        if extremes[0] == extremes[1]:  # all object or all background: nothing to threshold
            mask = torch.full(transformed.shape, extremes[0] > 127, dtype=torch.bool)
        else:
            low, high = transformed.amin(), transformed.amax()
            mask = transformed > (low + high) / 2
        return {"pixel_values": pixels, "labels": label, "masks": mask}
