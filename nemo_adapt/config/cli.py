"""`nemo-adapt config RECIPE [key=value ...]`: print the recipe as it would run, fully resolved.

Every key is shown, defaults included, after the overrides and `${...}` interpolation; the output is
what the run directory keeps as config.yaml, and a recipe itself: a literal `${` is printed `\\${`, as
recipes write it, so the output loads back to the same values. An invalid recipe or override is a
one-line error naming the file and line (or the override) and exit code 2.

Examples:
    nemo-adapt config recipes/llama3_8b_lora.yaml
    nemo-adapt config recipes/llama3_8b_lora.yaml train.micro_batch_size=2 optim.lr=3e-4 \\
        'peft.target_modules=[linear_qkv,linear_proj]' parallel.virtual_pipeline=null
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    """Add the `config` subcommand to the `nemo-adapt` parser.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers`.
    """
    p = subparsers.add_parser(
        "config", help="print a recipe fully resolved (defaults, overrides, interpolation) or its error",
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a recipe key, YAML value syntax (later ones win)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the resolved config of `args.recipe` with `args.overrides`.

    Args:
        args: parsed arguments (`recipe`, `overrides`).

    Returns:
        0 when the recipe is valid.

    Raises:
        ConfigError: the recipe or an override is invalid (the CLI prints it and exits 2).
    """
    # Imported here: the loader pulls in the PEFT registry (torch), which `nemo-adapt --help` should not pay.
    from nemo_adapt.config.loader import dump_resolved, load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(dump_resolved(cfg))
    return 0
