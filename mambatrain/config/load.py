"""Recipe YAML (+ dotted command-line overrides) -> a validated ``Recipe``.

jsonargparse does the typing and the overrides over our own dataclasses; this
module adds what a tired researcher needs on top: unknown keys with the keys
that are allowed, required sections, and every error on one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .schema import Recipe, RecipeError

if typing.TYPE_CHECKING:
    from jsonargparse import ArgumentParser

REQUIRED_SECTIONS = ("model", "data")


class RecipeYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the numbers of YAML 1.2 (what a reader of the recipe expects): ``010`` is ten
    (YAML 1.1 reads octal 8), ``08`` a number (1.1: text), ``1e-3`` a float (1.1 wants ``1.0e-3``), ``0o17`` and
    ``0x1f`` octal and hex; ``1:30`` stays text (1.1: 90, base 60) and underscores are not digits."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
RecipeYAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeYAMLLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                       list("-+0123456789"))
RecipeYAMLLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))


def _yaml_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    bases = {"0o": 8, "0x": 16}
    return int(text[2:], bases[text[:2]]) if text[:2] in bases else int(text, 10)


RecipeYAMLLoader.add_constructor(_INT, _yaml_int)


def load_yaml(text: str) -> Any:
    """A recipe's YAML (a file, or one override's value) read with YAML 1.2's numbers."""
    return yaml.load(text, Loader=RecipeYAMLLoader)


def recipe_parser(prog: str = "mambatrain fit", with_docs: bool = False) -> ArgumentParser:
    """The jsonargparse parser of every recipe key, as ``--section.key`` options.

    ``with_docs`` reads the fields' docstrings into the help (slower: only for --help).
    """
    # Imported here: training from Python (scripts/bench_multi_gpu.py) needs recipe_to_dict, not the parser.
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=with_docs)
    parser = ArgumentParser(prog=prog, exit_on_error=False)
    parser.add_class_arguments(Recipe, fail_untyped=True)
    return parser


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside a field type such as ``ModelConfig`` or ``Optional[ModelConfig]``."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _expected(hint: Any) -> str:
    """A field's type as the recipe's reader says it: ``int``, ``int or null``, ``one of auto, cpu, gpu``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if type(None) in args:
        inner = _expected(next(arg for arg in args if arg is not type(None)))
        return f"{inner}, null" if inner.startswith("one of") else f"{inner} or null"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _hint(schema: type, dotted: str) -> Any:
    """The type of a dotted key below ``schema`` (None when there is no such key)."""
    hint = None
    for part in dotted.split("."):
        hint = typing.get_type_hints(schema).get(part) if schema is not None else None
        schema = _nested_dataclass(hint)
    return hint


@functools.lru_cache
def _section_parser(schema: type) -> ArgumentParser:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(schema, fail_untyped=True)
    return parser


def _check_keys(values: dict, schema: type, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            section = prefix.rstrip(".") or "the recipe"
            raise RecipeError(f"{where}: unknown key{hint}; {section} accepts: {', '.join(allowed)}")
        if value is None and type(None) not in typing.get_args(hints[key]):
            # jsonargparse lets null through for plain types; the checks after it would then fail obscurely.
            raise RecipeError(f"{where}: must not be null; expected {_expected(hints[key])}")
        sub = _nested_dataclass(hints[key])
        if sub is not None and typing.get_origin(hints[key]) is list:
            # A list of sections, such as data.text.sources: check each item's keys and types (jsonargparse's own
            # message for an item would name neither the item nor its key).
            if not isinstance(value, list):
                raise RecipeError(f"{where}: expected a list of sections, got {value!r}")
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise RecipeError(f"{where}[{i}]: expected a section of keys "
                                      f"({', '.join(f.name for f in dataclasses.fields(sub))}), got {item!r}")
                _check_keys(item, sub, f"{where}[{i}].")
                try:
                    _section_parser(sub).parse_object(item)
                except (argparse.ArgumentError, TypeError, ValueError) as error:
                    raise RecipeError(_one_line(error, sub, f"{where}[{i}].")) from None
        elif sub is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: expected a section of keys ({', '.join(f.name for f in dataclasses.fields(sub))}), "
                                  f"got {value!r}")
            _check_keys(value, sub, f"{where}.")


def _one_line(error: Exception, schema: type = Recipe, prefix: str = "") -> str:
    """jsonargparse's multi-line messages (about a key of ``schema``) as one line that starts with the key."""
    text = str(error)
    match = re.search(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if match:
        key, detail = match.groups()
        hint, given = _hint(schema, key), re.search(r"Given value: (.*)", detail)
        if detail.startswith("Does not validate against any of the Union subtypes") and hint and given:
            detail = f"expected {_expected(hint)}; got {given.group(1).strip()}"
        detail = re.sub(r"<class '(\w+)'>", r"\1", detail.strip().splitlines()[0])
        detail = re.sub(r"typing\.Literal\[(.*)\]", lambda m: "one of " + m.group(1).replace("'", ""), detail)
        detail = re.sub(r"^Expected a ", "expected ", detail)
        detail = re.sub(r"\.? Got value:", "; got", detail)
        if str in (hint, *typing.get_args(hint)) and re.search(r"; got (True|False|[-+.\d_eE]+)$", detail):
            detail += (" (YAML reads unquoted yes/no/on/off/true/false as booleans and numbers as numbers: "
                       "quote the value)")
        return f"{prefix}{key}: {detail}"
    return " ".join(text.split())


def _overrides_to_dict(overrides: Sequence[str]) -> dict:
    """``["--trainer.max_steps", "10"]`` (or ``--trainer.max_steps=10``) -> ``{"trainer": {"max_steps": 10}}``."""
    result: dict = {}
    items = list(overrides)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--") or len(flag) == 2:
            raise RecipeError(f"{flag}: expected an override such as --trainer.max_steps 10")
        if "=" in flag:
            key, raw = flag[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise RecipeError(f"{flag[2:]}: override has no value; write {flag} VALUE")
            key, raw = flag[2:], items[i + 1]
            i += 2
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{key}: {part} is a value, not a section")
        node[leaf] = _override_value(raw)
    return result


def _override_value(raw: str) -> Any:
    """An override's value read as YAML (``10``, ``null``, ``[256, 1024]``); what YAML cannot read is the text
    typed (``@night``), which the type check then accepts or refuses by its key."""
    try:
        return load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _duplicate_key(node: yaml.Node, prefix: str = "") -> str | None:
    """The first key given twice in one mapping, as "model.d_model ... (lines 2 and 3)"; PyYAML keeps the last."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := _duplicate_key(item, f"{prefix.rstrip('.')}[{i}]."):
                return found
    if not isinstance(node, yaml.MappingNode):
        return None
    lines: dict[str, int] = {}
    for key, value in node.value:
        name = str(key.value)
        if name in lines:
            return f"{prefix}{name} is given twice (lines {lines[name]} and {key.start_mark.line + 1})"
        lines[name] = key.start_mark.line + 1
        if found := _duplicate_key(value, f"{prefix}{name}."):
            return found
    return None


def read_recipe_file(path: str | Path) -> dict:
    """The raw YAML mapping of a recipe file, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        raw = load_yaml(text)
        duplicate = _duplicate_key(yaml.compose(text, Loader=RecipeYAMLLoader))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if duplicate:
        raise RecipeError(f"{path}: {duplicate}; YAML would keep only the last, so merge them")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = (), values: dict | None = None) -> Recipe:
    """Read, merge, type-check and validate a recipe; raise ``RecipeError`` naming the key on any problem."""
    raw = read_recipe_file(path) if path is not None else {}
    raw = _merge(raw, values or {})
    raw = _merge(raw, _overrides_to_dict(overrides))
    _check_keys(raw, Recipe, "")
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise RecipeError(f"{section}: missing section; every recipe needs {' and '.join(REQUIRED_SECTIONS)} "
                              f"(see recipes/quickstart.yaml)")
    parser = recipe_parser()
    try:
        sections = parser.instantiate(parser.parse_object(raw))
        return Recipe(**{f.name: sections[f.name] for f in dataclasses.fields(Recipe)})
    except RecipeError:
        raise
    except (argparse.ArgumentError, TypeError, ValueError) as error:
        raise RecipeError(_one_line(error)) from None


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in, hybrid ratio resolved to a pattern)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
