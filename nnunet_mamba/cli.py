"""``nnmamba`` command line: one entry point, one module per sub-command.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when its sub-command runs, so ``nnmamba info`` stays fast. Errors meant for
the user are raised as :class:`nnunet_mamba.errors.UserError` and printed without a
traceback, with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

SUBCOMMANDS = {
    "info": ("nnunet_mamba.info", "versions and which selective-scan backend runs where"),
    "plans": ("nnunet_mamba.nnunet.plans_presets", "apply a plans preset (e.g. the paper's) to a dataset"),
    "demo": ("nnunet_mamba.demo", "synthetic dataset -> plan -> train briefly -> predict -> Dice"),
    "brats2023": ("nnunet_mamba.brats.cli", "BraTS 2023 GLI: synth, convert, evaluate, reproduce"),
    "cls": ("nnunet_mamba.classification.cli", "3D classification: train, predict"),
    "landmarks": ("nnunet_mamba.landmarks.cli", "3D landmark detection: train, predict, evaluate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnmamba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # sub-command arguments are added lazily in main(), after the command is known
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"nnmamba {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"nnmamba {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
