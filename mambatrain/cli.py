"""``mambatrain``: the command line. Each subcommand maps to one function."""

from __future__ import annotations

import argparse
import logging
import sys

from .config.schema import RecipeError

DESCRIPTION = """\
mambatrain trains Mamba, Transformer and hybrid language models on long contexts.

  mambatrain fit recipes/quickstart.yaml                     train as the recipe says
  mambatrain fit recipes/quickstart.yaml --print-config      show the resolved recipe, then stop
  mambatrain fit recipes/quickstart.yaml --trainer.max_steps 10 --model.d_model 128
                                                             override any recipe key
  mambatrain fit recipes/quickstart.yaml --resume auto       continue the newest run of that name, if any
  mambatrain plan recipes/quickstart.yaml --gpu-memory 80    parameters, FLOPs/token, memory: does it fit?
  mambatrain tokenizer train recipe.yaml                     train a byte-level BPE on the recipe's text
  mambatrain data prepare recipe.yaml                        tokenize the recipe's text once into shards
"""


def _fit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambatrain fit", formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
        description="Train a model from a YAML recipe. Any recipe key can be overridden as --section.key VALUE.")
    parser.add_argument("recipe", help="path of the YAML recipe (see recipes/)")
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="print the fully resolved recipe (defaults filled in) and exit")
    parser.add_argument("--resume", metavar="auto|last|PATH",
                        help="continue a run: 'auto' resumes the newest complete checkpoint of logging.run_name "
                        "(skipping damaged ones) or starts fresh when there is none, which is what a requeued job "
                        "wants; 'last' the same but fails without one; or a .ckpt path. A run stopped by SIGTERM "
                        "or SIGUSR1 checkpoints at the next step and exits with status 75 (requeue me)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every recipe key, then exit")
    return parser


def _fit_help() -> str:
    from .config.load import recipe_parser
    keys = recipe_parser(with_docs=True).format_help()
    # Keep the documented options and drop jsonargparse's usage line, which lists every key a second time.
    keys = keys[keys.index("\n\n") + 2:] if "\n\n" in keys else keys
    return (_fit_parser().format_help()
            + "\nrecipe keys (set them in the YAML, or override them as --section.key VALUE):\n\n" + keys)


def fit_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_fit_help())
        return 0
    args, overrides = _fit_parser().parse_known_args(argv)
    if args.help:
        print(_fit_help())
        return 0
    from .config.load import load_recipe, recipe_to_yaml
    recipe = load_recipe(args.recipe, overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    from .run import fit
    fit(recipe, resume=args.resume)
    return 0


def _recipe_tool_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description + " Any recipe key can be overridden as "
                                     "--section.key VALUE.")
    parser.add_argument("recipe", help="path of the YAML recipe (its data.text section is read)")
    return parser


def data_command(argv: list[str]) -> int:
    if not argv or argv[0] != "prepare":
        print("usage: mambatrain data prepare RECIPE [--out DIR] [--section.key VALUE ...]", file=sys.stderr)
        return 2
    parser = _recipe_tool_parser("mambatrain data prepare", "Tokenize data.text.sources (and val_sources) once "
                                 "into memory-mapped shards under data.prepared.path; train with data.source: prepared.")
    parser.add_argument("--out", help="folder to write (default: data.prepared.path)")
    args, overrides = parser.parse_known_args(argv[1:])
    from .config.load import load_recipe
    from .data.shards import prepare
    print(f"prepared shards in {prepare(load_recipe(args.recipe, overrides), args.out)}")
    return 0


def tokenizer_command(argv: list[str]) -> int:
    if not argv or argv[0] != "train":
        print("usage: mambatrain tokenizer train RECIPE [--vocab-size N] [--out DIR] [--max-documents N]",
              file=sys.stderr)
        return 2
    parser = _recipe_tool_parser("mambatrain tokenizer train", "Train a byte-level BPE on data.text.sources and "
                                 "write tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer).")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included "
                        "(default: model.vocab_size)")
    parser.add_argument("--out", help="folder to write (default: the folder data.text.tokenizer names)")
    parser.add_argument("--max-documents", type=int, help="train on at most this many documents")
    args, overrides = parser.parse_known_args(argv[1:])
    from .config.load import load_recipe
    from .data.tokenizer import train_tokenizer
    path = train_tokenizer(load_recipe(args.recipe, overrides), args.out, args.vocab_size, args.max_documents)
    print(f"wrote {path} and {path.parent / 'tokenizer_config.json'}")
    return 0


def plan_command(argv: list[str]) -> int:
    parser = _recipe_tool_parser("mambatrain plan", "Parameters by block kind, FLOPs per token and predicted peak "
                                 "memory per device of the recipe's training step, without touching a GPU.")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB",
                        help="memory of the target GPU, to say whether the recipe fits (default 80)")
    args, overrides = parser.parse_known_args(argv)
    from .config.load import load_recipe
    from .plan import describe_plan
    report, fits = describe_plan(load_recipe(args.recipe, overrides), args.gpu_memory)
    print(report)
    return 0 if fits else 1


COMMANDS = {"fit": fit_command, "plan": plan_command, "data": data_command, "tokenizer": tokenizer_command}


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("mambatrain")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    # Lightning's start-up chatter (accelerator tips, advertising) hides our own summary.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(DESCRIPTION)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    _configure_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except RecipeError as error:
        print(f"recipe error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
