"""`load_config`: configs/base.yaml, then a run's YAML (with its includes), then `key=value` overrides.

Where YAML files are found (`configs_dir()`):
  1. `$HYJAX_CONFIGS`, if set;
  2. `hyjax/configs`, the package's copy of the project's `configs/` (a link to it in a source checkout,
     the files themselves in an installed wheel), so every install finds them from any directory.
Without a configs folder base.yaml is skipped (the dataclass defaults are base.yaml's values; a test
keeps them equal) and only absolute or working-directory-relative files can be named.

A config file argument may be a path (absolute, or relative to the working directory) or a name inside
the configs folder, with or without `.yaml` (`quickstart`, `methods/lora.yaml`). A file's `include:`
(or `defaults:`) list names other files, resolved in the configs folder, then beside the including
file; they are merged in order, then the file itself on top. Mappings merge key by key; lists and
scalars replace. Paths *inside* a config (data.path, logging.output_dir, ...) are used as given, i.e.
relative to the working directory of the run.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import yaml

from hyjax.config.run import RunConfig
from hyjax.config.typed import ConfigError, build, check_keys, check_path, convert
from hyjax.methods import METHODS

ENV_CONFIGS = "HYJAX_CONFIGS"
INCLUDE_KEYS = ("include", "defaults")
# Settings that moved, old dotted key -> new (`Method.moved_settings`): a config that names the old one is
# refused with the new name; a run saved before the move (its checkpoints' metadata) is read with it moved
# (`saved_tree`).
MOVED = {old: new for method in METHODS.values() for old, new in method.moved_settings.items()}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus floats without a dot (`3e-4`), which PyYAML reads as strings,
    and a duplicated key is an error (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value read with YAML scalar rules: `16` int, `3e-4` float, `true` bool, `null`,
    `[a, b]` list, anything else a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def configs_dir() -> pathlib.Path | None:
    """The folder of the shipped YAML configs (see the module docstring), or None."""
    env = os.environ.get(ENV_CONFIGS)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{ENV_CONFIGS}={env!r} is not a folder")
        return path
    packaged = pathlib.Path(__file__).resolve().parents[1] / "configs"
    return packaged if (packaged / "base.yaml").is_file() else None


def load_config(config_path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """The validated `RunConfig` of base.yaml + `config_path` (and its includes) + `overrides`.

    overrides: `dotted.key=value` strings, e.g. `["train.learning_rate=3e-4", "method.lora.rank=16"]`;
    a value naming a whole section is a YAML mapping (`method.lora={rank: 16, alpha: 32}`).
    Raises `ConfigError` naming the offending key (and the closest valid keys when it is unknown).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    tree: dict = {}
    folder = configs_dir()
    if folder is not None and (folder / "base.yaml").is_file():
        deep_merge(tree, read_yaml(folder / "base.yaml"))
    if config_path is not None:
        deep_merge(tree, read_yaml(find_config(config_path)))
    for override in overrides:
        apply_override(tree, override)
    return build(RunConfig, tree)


def find_config(name: str | os.PathLike, beside: pathlib.Path | None = None) -> pathlib.Path:
    """A config file by path, or by name in the configs folder (then beside `beside`), `.yaml` optional."""
    name = pathlib.Path(name).expanduser()
    candidates = [name] if name.is_absolute() else []
    if not name.is_absolute():
        roots = [pathlib.Path.cwd()] if beside is None else []
        folder = configs_dir()
        roots += [folder] if folder is not None else []
        roots += [beside] if beside is not None else []
        candidates = [root / name for root in roots]
    candidates += [c.with_name(c.name + ".yaml") for c in candidates if c.suffix not in (".yaml", ".yml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = "" if configs_dir() is not None else (
        f"; no configs folder was found (hyjax/configs is missing: reinstall hyjax, or set {ENV_CONFIGS})")
    raise ConfigError(f"config file {str(name)!r} not found; tried {[str(c) for c in candidates]}{hint}")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint in one line, with the line and column it points at."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return problem if mark is None else f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def read_yaml(path: pathlib.Path, _stack: tuple[pathlib.Path, ...] = ()) -> dict:
    """The config tree of one file: its includes merged in order, then its own keys (checked)."""
    path = path.resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in _stack + (path,))
        raise ConfigError(f"config files include each other in a cycle: {chain}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from err
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    data = dict(data)
    includes = []
    for key in INCLUDE_KEYS:
        value = data.pop(key, None)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} in {path} must be a file name or a list of them, got {value!r}")
        includes += value
    refuse_moved(dotted_keys(data), str(path))
    check_keys(data, RunConfig, source=str(path))
    tree: dict = {}
    for name in includes:
        deep_merge(tree, read_yaml(find_config(name, beside=path.parent), _stack + (path,)))
    deep_merge(tree, data)
    return tree


def dotted_keys(tree: Mapping, prefix: str = "") -> list[str]:
    """Every key of `tree` and of its mappings, dotted (`train`, `train.learning_rate`, ...)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.append(dotted)
        if isinstance(value, Mapping):
            out += dotted_keys(value, dotted + ".")
    return out


def refuse_moved(keys: Iterable[str], source: str) -> None:
    """Raises `ConfigError` for the first of `keys` under a section that moved (`MOVED`), naming its new place."""
    for key in keys:
        for old, new in MOVED.items():
            if key == old or key.startswith(old + "."):
                raise ConfigError(f"{key!r} has moved to {new + key[len(old):]!r} (in {source}); write it there")


def saved_tree(tree: Mapping) -> dict:
    """A config tree that a run saved (its checkpoints' metadata) as today's layout: the sections that
    moved since it was saved (`MOVED`) taken from their old place to their new one."""
    tree = copy.deepcopy(dict(tree))
    for old, new in MOVED.items():
        *parents, last = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            set_dotted(tree, new, node.pop(last))
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Sets the dotted `key` of `tree` to `value`, merging into a mapping already there."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        deep_merge(node[last], value)
    else:
        node[last] = value


def apply_override(tree: dict, override: str) -> None:
    """Sets `dotted.key=value` in `tree` (value parsed by `parse_value`), checking the key first."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like dotted.key=value (e.g. train.learning_rate=3e-4)")
    source = f"override {override!r}"
    refuse_moved([key], source)
    tp = check_path(RunConfig, key, source=source)
    value = parse_value(text)
    try:
        convert(tp, value, key)
    except ConfigError:
        try:  # e.g. `data.template=Review: {text}` is a YAML mapping but meant as the string
            value = convert(tp, text, key)
        except ConfigError:
            pass  # `build` reports the type error
    set_dotted(tree, key, value)


def deep_merge(into: dict, update: Mapping) -> dict:
    """Merges `update` into `into`: mappings key by key, everything else replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return into
