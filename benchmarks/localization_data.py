"""Write the ground-truth localization dataset (sd_plugin.storage.localization_data) as an image folder with masks.

CI-sized, offline everywhere (Fashion-MNIST items on scikit-learn's two sample photos):

    python benchmarks/localization_data.py --output data/localization

Benchmark-sized, on the fetched natural photos (see benchmarks/natural_images.py):

    python benchmarks/localization_data.py --output data/localization-clothing \\
        --backgrounds data/clothing-small-224 --train 10000 --test 2000 --image-size 96

Block-MNIST-style (Shah et al. 2021: the object and a pattern shared by every class in two random
cells of a 2 x 2 grid; the ground truth is the object's cell):

    python benchmarks/localization_data.py --output data/blocks --layout blocks --objects digits

Then train on ``<output>/train`` like any image folder and score with
``python -m sd_plugin evaluate --model <model> --dataset <output>``.
"""

from __future__ import annotations

import argparse

from sd_plugin.storage.localization_data import write_localization_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument(
        "--objects",
        default="fashion-mnist",
        help="'fashion-mnist', 'digits', or a labelled photo folder (<split>/<class>/ photos, pasted whole: box masks)",
    )
    parser.add_argument("--backgrounds", default=None, help="a folder of photos (default: scikit-learn's samples)")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layout",
        default="pasted",
        choices=["pasted", "blocks"],
        help="'pasted': an object on a photo; 'blocks': Block-MNIST-style, the object and a class-free pattern "
        "in two random cells of a 2 x 2 grid",
    )
    args = parser.parse_args(argv)
    root = write_localization_dataset(
        args.output,
        objects=args.objects,
        backgrounds=args.backgrounds,
        counts={"train": args.train, "test": args.test},
        image_size=args.image_size,
        seed=args.seed,
        layout=args.layout,
    )
    print(f"wrote {args.train} + {args.test} images with masks to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
