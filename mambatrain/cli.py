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
  mambatrain export runs/x/version_0/checkpoints/last.ckpt out/   a Hugging Face folder (transformers layout)
  mambatrain generate last.ckpt --prompt "Once upon a time"  sample with the recurrent state (+ KV cache)
  mambatrain eval last.ckpt recipe.yaml                      loss by position and passkey retrieval, JSON + plots
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


CHECKPOINT_HELP = "a .ckpt file, or a model folder (exported, transformers, state-spaces/mamba)"


def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mambatrain export", description="Write a checkpoint (or model folder) as "
                                     "config.json + model.safetensors (+ the run's tokenizer), in the layout of the "
                                     "transformers class that computes the same model when there is one.")
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("out_dir", help="folder to write")
    args = parser.parse_args(argv)
    import json
    from .checkpoint.convert import export
    out = export(args.checkpoint, args.out_dir)
    architectures = json.loads((out / "config.json").read_text()).get("architectures")
    print(f"wrote {out}: " + (f"loads with transformers' {architectures[0]} (AutoModelForCausalLM)" if architectures
                              else "mambatrain's own layout (no transformers class computes this model)"))
    return 0


def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mambatrain generate", description="Continue a prompt: one forward pass "
                                     "over the prompt, then one token at a time with the Mamba state and a KV cache.")
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--prompt", required=True,
                        help="text; for a model trained on synthetic data (no tokenizer), token ids such as '3 17 5'")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding (default 1.0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                        "holding this much probability (default 1.0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or its folder) instead of the checkpoint's own")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    args = parser.parse_args(argv)
    from .inference.generate import run
    run(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
        args.tokenizer, args.device)
    return 0


def eval_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mambatrain eval", description="Loss by token position over long documents "
                                     "of the recipe's validation data, and passkey retrieval by length and depth (its "
                                     "eval section), written as results.json, loss_by_position.png and passkey.png. "
                                     "Any recipe key can be overridden as --section.key VALUE.")
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("recipe", help="YAML recipe: its data and eval sections say what to evaluate on")
    parser.add_argument("--out", help="folder to write (default: the run's eval/<checkpoint name>/)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    args, overrides = parser.parse_known_args(argv)
    from .config.load import load_recipe
    from .eval.suite import run, summary
    results, out = run(args.checkpoint, load_recipe(args.recipe, overrides), args.out, args.device)
    for name, value in summary(results).items():
        print(f"{name:<24} {value:.4f}")
    print(f"wrote {out / 'results.json'} and the plots beside it")
    return 0


COMMANDS = {"fit": fit_command, "plan": plan_command, "data": data_command, "tokenizer": tokenizer_command,
            "export": export_command, "generate": generate_command, "eval": eval_command}


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
