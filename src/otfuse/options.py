"""Command-line options and JSON option files, both made from the config dataclasses.

    add_options(parser, FuseConfig)                      # one --flag per field, help from its comment
    cfg = resolve(FuseConfig, vars(args), args.config)   # defaults <- JSON file <- flags given
    flatten(cfg)                                         # {"method": "activation", "bn_batches": 40, ...}

A nested stage config (a field whose value is a dataclass with a FLAG_PREFIX) contributes its
fields as `<prefix>_<field>`, and its `enabled` field as `<prefix>` itself: FuseConfig's
`refit.ridge` is `--refit-ridge`, `refit.enabled` is `--refit/--no-refit`, and the alignment's
fields (prefix "") keep their own names (`--method`, `--n-images`). JSON files use the same
flat names (underscores). Flags written on the command line override the file, however they
are written: `--no-refit`, `--refit-ridge=0.1`, or an abbreviation such as `--meth`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from otfuse.errors import OtfuseError, printable
from otfuse.storage import regular_file

CONFIG_LIMIT = 1 << 20  # bytes: a file of options is a few hundred

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other otfuse error: the usage goes to --help."""

    def error(self, message: str):
        prog = self.prog.split()[0] if self.prog else "otfuse"
        self.exit(2, printable(f"{prog}: error: {' '.join(message.split())}; see --help") + "\n")


@dataclass(frozen=True)
class Option:
    name: str  # flat name, e.g. "bn_batches"
    path: tuple[str, ...]  # attribute path in the config, e.g. ("bn", "batches")
    kind: type  # int, float, str or bool
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache  # inspect.getsource parses the whole module, and every parser and every build asks again
def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source: the option's help."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {k: v.replace("%", "%%") for k, v in re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", src, flags=re.M)}


def _default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def options_of(cls, prefix: str = "", path: tuple[str, ...] = ()) -> list[Option]:
    """Every option of a config dataclass, nested stages flattened (see the module docstring)."""
    comments = _field_comments(cls)
    out: list[Option] = []
    for f in fields(cls):
        value = _default(f)
        if is_dataclass(value):
            out += options_of(type(value), getattr(type(value), "FLAG_PREFIX", f.name), path + (f.name,))
            continue
        name = prefix if (f.name == "enabled" and prefix) else (f"{prefix}_{f.name}" if prefix else f.name)
        kind = TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        out.append(Option(name, path + (f.name,), kind, value, comments.get(f.name, "")))
    return out


def add_options(
    parser: argparse.ArgumentParser,
    cls,
    defaults: dict | None = None,
    only_given: bool = False,
    helps: dict[str, str] | None = None,
    exclude: Callable[[str], bool] = lambda _: False,
) -> None:
    """One --option per field, its help from the field's comment (or `helps`), except the names `exclude`
    accepts (options the command sets itself). With `only_given`, an option not written on the command
    line stays out of the parsed namespace, so a JSON file can fill it (help still shows the real default)."""
    for o in options_of(cls):
        if exclude(o.name):
            continue
        default = (defaults or {}).get(o.name, o.default)
        text = (helps or {}).get(o.name, o.help)
        note = f"{text} (default: {default})" if text else f"default: {default}"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS if only_given else default, "help": note}
        if o.kind is bool:
            parser.add_argument(o.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(o.flag, type=_parser_of(o), metavar=o.name.upper(), **kw)


INT_LIMIT = 2**63  # torch's seeds and sizes are 64-bit: a larger integer is a traceback deep inside
SEED_LIMIT = 2**32  # seeds are combined with epochs and batch numbers (seed * 100003 + epoch) within 64 bits


def _parser_of(o: Option):
    """The argparse type of an option: a bad value is one line naming the option."""

    def parse(text: str):
        try:
            value = o.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if o.kind is int else 'a number'}") from None
        if o.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if o.kind is int and not -INT_LIMIT < value < INT_LIMIT:
            raise argparse.ArgumentTypeError(f"{text!r} is beyond a 64-bit integer")
        if o.name.endswith("seed") and not (0 <= value < SEED_LIMIT or value == o.default == -1):  # -1: none given
            raise argparse.ArgumentTypeError(f"{text!r}: a seed is from 0 to {SEED_LIMIT - 1}")
        return value

    return parse


def build(cls, flat: dict[str, Any], source: str = "option"):
    """A config from flat option values (missing ones take their defaults), each value type-checked."""
    by_name = {o.name: o for o in options_of(cls)}
    unknown = sorted(set(flat) - set(by_name))
    if unknown:
        raise OtfuseError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(by_name))}")
    cfg = cls()
    for name, value in flat.items():
        o = by_name[name]
        target = cfg
        for attr in o.path[:-1]:
            target = getattr(target, attr)
        setattr(target, o.path[-1], _typed(o, value, source))
    return cfg


def _typed(o: Option, value: Any, source: str) -> Any:
    ok = isinstance(value, o.kind) and not (o.kind is int and isinstance(value, bool))
    if o.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if o.kind is float and ok and not math.isfinite(value):
        ok = False
    seed_ok = lambda v: 0 <= v < SEED_LIMIT or v == o.default == -1  # -1: none given (init_seed: the run's seed)
    if o.kind is int and ok and not (seed_ok(value) if o.name.endswith("seed") else -INT_LIMIT < value < INT_LIMIT):
        raise OtfuseError(f"{source}: option {o.name} {value} is out of range (a seed: 0 to {SEED_LIMIT - 1}; other integers: 64-bit)")
    if not ok:
        want = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[o.kind]
        raise OtfuseError(f"{source}: option {o.name} must be {want}, got {value!r}")
    return value


def parse_assignments(text: str, cls) -> dict[str, Any]:
    """'point=both,repair=True' -> {'point': 'both', 'repair': True}, typed like `cls`'s options."""
    by_name = {o.name: o for o in options_of(cls)}
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in by_name:
            raise OtfuseError(f"{item!r}: write name=value with a known option ({', '.join(sorted(by_name))})")
        o = by_name[name]
        if o.kind is bool:
            if value not in ("True", "False", "true", "false"):
                raise OtfuseError(f"{item!r}: {name} is True or False")
            out[name] = value in ("True", "true")
        else:
            try:
                out[name] = _parser_of(o)(value)
            except argparse.ArgumentTypeError as exc:
                raise OtfuseError(f"{item!r}: {exc}") from None
    return out


def flatten(cfg) -> dict[str, Any]:
    """{flat name: value} of a config: what a JSON option file holds."""
    out = {}
    for o in options_of(type(cfg)):
        value = cfg
        for attr in o.path:
            value = getattr(value, attr)
        out[o.name] = value
    return out


def _bounded_int(text: str) -> int:
    """A JSON integer of at most 18 digits: longer ones are no option's value, and convert to no float."""
    if len(text.lstrip("-")) > 18:
        raise ValueError(f"the number {text[:12]}... has {len(text.lstrip('-'))} digits, more than any option takes")
    return int(text)


def _unique_keys(path: str | Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON object hook that refuses a key given twice (json keeps the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise ValueError(f"the key {twice!r} is given twice; keep one")
        return dict(pairs)

    return hook


def read_config(path: str | Path) -> dict[str, Any]:
    """Flat options from a JSON object (keys starting with '_' are notes); one clear error otherwise."""
    p = regular_file(path, "--config")
    if p.stat().st_size > CONFIG_LIMIT:
        raise OtfuseError(f"--config {path} is {p.stat().st_size} bytes, not a file of options; give a JSON file (otfuse tune writes one)")
    try:
        obj = json.loads(p.read_text(), parse_int=_bounded_int, object_pairs_hook=_unique_keys(path))
    except RecursionError:
        raise OtfuseError(f"--config {path}: nested too deeply to be a file of options; give a flat JSON object") from None
    except (OSError, ValueError) as exc:
        raise OtfuseError(f"--config {path}: not a readable JSON file ({str(exc)[:100]}); write one with otfuse tune") from None
    if not isinstance(obj, dict):
        raise OtfuseError(f"--config {path}: expected a JSON object of options")
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def resolve(cls, given: dict[str, Any], config: str = "", defaults: dict[str, Any] | None = None):
    """The config from the defaults (the dataclass's, then `defaults`, e.g. those the checkpoints'
    training recipe implies), then the JSON file `config`, then the options `given` on the command
    line (`vars(args)` of a parser made with `only_given`; other keys are ignored), each later source
    overriding the earlier."""
    names = {o.name for o in options_of(cls)}
    flat = {**(defaults or {}), **(read_config(config) if config else {})}
    cfg = build(cls, flat, f"--config {config}")
    return build(cls, {**flatten(cfg), **{k: v for k, v in given.items() if k in names}})
