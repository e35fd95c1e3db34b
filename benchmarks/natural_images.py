"""Natural-image folders for the fine-tuning benchmark, from the fetched public repositories.

The images are real photos kept in two public GitHub repositories; the search tool's
``fetch`` mirrors them under ``../.mirror`` (there is no other download here, and CI cannot
fetch: what needs these folders skips with a message naming this script):

- ``github:alexeygrigorev/clothing-dataset-small`` (CC0): 3,781 clothing photos, 10 classes,
  split train / validation / test (3,068 / 341 / 372), about 400x533.
- ``github:Sachitbansal/DLA``: ``tiny-imagenet-200/`` in the raw layout (200 classes x 500
  training images, ``val/images`` + ``val_annotations.txt``, 64x64). Its ``wnids.txt`` was cut to
  10 lines, so the classes are taken from the ``train/`` folders.

Each becomes ``<output>/<split>/<class>/<image>.jpg`` (what ``recipes/tiny_imagenet.py
--train_dir`` and ``benchmarks/finetune.py`` read), optionally shrunk so that the shorter side is
``--max-side`` pixels and re-encoded at ``--quality`` (the clothing photos at 224 and quality 70
take 38 MB, small enough to carry to a GPU machine).

    python benchmarks/natural_images.py clothing --output data/clothing-small-224 --max-side 224 --quality 70
    python benchmarks/natural_images.py tiny-imagenet --output data/tiny-imagenet-20 --classes 20
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

MIRRORS = {
    "clothing": "alexeygrigorev+clothing-dataset-small",
    "tiny-imagenet": "Sachitbansal+DLA",
}
REPOSITORIES = {"clothing": "github:alexeygrigorev/clothing-dataset-small", "tiny-imagenet": "github:Sachitbansal/DLA"}
DEFAULT_MIRROR_ROOT = Path(__file__).resolve().parents[2] / ".mirror"


def git_dir(source: Path) -> Path:
    """The git directory of a fetched mirror (``repo/.git`` or a bare ``repo``)."""
    for candidate in (source / "repo" / ".git", source / "repo", source / ".git", source):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    raise FileNotFoundError(f"{source} is not a fetched repository (no git directory in it).")


def repository_files(source: Path, prefix: str) -> dict[str, bytes]:
    """``{path: bytes}`` of the files under ``prefix`` at the mirror's HEAD."""
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir(source)), "archive", "--format=tar", "HEAD", prefix],
        check=True,
        capture_output=True,
    ).stdout
    files = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[member.name] = tar.extractfile(member).read()
    return files


def write_image(data: bytes, target: Path, max_side: int | None, quality: int = 90) -> None:
    """The image as RGB JPEG, its shorter side shrunk to ``max_side`` (never enlarged)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if max_side is not None and min(image.size) > max_side:
        scale = max_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    image.save(target.with_suffix(".jpg"), quality=quality)


def clothing(source: Path, output: Path, max_side: int | None, quality: int = 90) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split in ("train", "validation", "test"):
        files = repository_files(source, split)
        for path, data in files.items():
            split_name, label, name = path.split("/")
            write_image(data, output / split_name / label / name, max_side, quality)
        counts[split] = len(files)
    return counts


def tiny_imagenet(
    source: Path, output: Path, classes: int | None, max_side: int | None, quality: int = 90
) -> dict[str, int]:
    train = repository_files(source, "tiny-imagenet-200/train")
    wnids = sorted({path.split("/")[2] for path in train})
    chosen = set(wnids[:classes] if classes else wnids)
    counts = {"classes": len(chosen), "train": 0, "val": 0}
    for path, data in train.items():
        wnid = path.split("/")[2]
        if wnid in chosen and path.lower().endswith(".jpeg"):
            write_image(data, output / "train" / wnid / Path(path).stem, max_side, quality)
            counts["train"] += 1
    val = repository_files(source, "tiny-imagenet-200/val")
    annotations = val["tiny-imagenet-200/val/val_annotations.txt"].decode().splitlines()
    for line in annotations:
        name, wnid = line.split()[:2]
        if wnid in chosen:
            image = val[f"tiny-imagenet-200/val/images/{name}"]
            write_image(image, output / "val" / wnid / Path(name).stem, max_side, quality)
            counts["val"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(MIRRORS))
    parser.add_argument("--output", required=True, help="folder to write <split>/<class>/<image>.jpg into")
    parser.add_argument("--source", default=None, help="the fetched mirror (default: ../.mirror/<owner>+<name>)")
    parser.add_argument("--max-side", type=int, default=None, help="shrink the shorter side to this many pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the written images")
    parser.add_argument("--classes", type=int, default=None, help="tiny-imagenet: the first N classes (sorted wnids)")
    args = parser.parse_args(argv)
    source = Path(args.source) if args.source else DEFAULT_MIRROR_ROOT / MIRRORS[args.dataset]
    if not source.exists():
        raise SystemExit(
            f"{source} does not exist: fetch {REPOSITORIES[args.dataset]} with the search tool's fetch "
            "(or pass --source to a clone of it)."
        )
    output = Path(args.output)
    if args.dataset == "clothing":
        counts = clothing(source, output, args.max_side, args.quality)
    else:
        counts = tiny_imagenet(source, output, args.classes, args.max_side, args.quality)
    print(f"{output}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
