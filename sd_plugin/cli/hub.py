"""``python -m sd_plugin export`` and ``python -m sd_plugin push``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["export_main", "push_main"]


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_plugin export", description="Export a trained model folder.")
    parser.add_argument("source", help="a SaliencyDecorTrainer output or checkpoint folder")
    parser.add_argument("output", help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing, non-empty OUTPUT folder: everything in it is deleted and the export takes its place",
    )
    parser.add_argument("--keep-adapter", action="store_true", help="save PEFT adapters separately (no merge)")
    parser.add_argument("--evaluation", default=None, help="results.json of `python -m sd_plugin evaluate`")
    parser.add_argument("--dataset", action="append", default=None, help="dataset id for the card (repeatable)")
    parser.add_argument("--base-model", default=None, help="Hub id of the model it was fine-tuned from")
    parser.add_argument("--training-command", default=None, help="the command that trained it, for the card")
    parser.add_argument("--license", default=None, help="the card's license, a Hub id such as apache-2.0")
    parser.add_argument(
        "--preprocessing-from",
        default=None,
        help="a folder whose preprocessor_config.json goes with the model (when SOURCE records none)",
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    from ..hub.export import export
    from ..storage.checkpoint import PREPROCESSOR_FILE

    if args.preprocessing_from is not None and not (Path(args.preprocessing_from) / PREPROCESSOR_FILE).is_file():
        print(
            f"error: --preprocessing-from {args.preprocessing_from} has no {PREPROCESSOR_FILE}; pass the folder of "
            "the model training started from (or any folder saved with processor.save_pretrained).",
            file=sys.stderr,
        )
        return 2

    try:
        path = export(
            args.source,
            args.output,
            overwrite=args.overwrite,
            merge_adapter=not args.keep_adapter,
            evaluation=args.evaluation,
            datasets=args.dataset,
            base_model=args.base_model,
            training_command=args.training_command,
            license=args.license,
            preprocessing_from=args.preprocessing_from,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {path}")
    return 0


def push_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_plugin push", description="Push an exported folder.")
    parser.add_argument("path", help="an exported model folder")
    parser.add_argument("--repo-id", required=True, help="user-or-org/model-name")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--create-pr", action="store_true")
    parser.add_argument("--commit-message", default="Upload SaliencyDecor model")
    args = parser.parse_args(argv)
    from ..hub.push import PushError, push

    try:
        url = push(
            args.path,
            args.repo_id,
            private=args.private,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
        )
    except (PushError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pushed: {url}")
    return 0
