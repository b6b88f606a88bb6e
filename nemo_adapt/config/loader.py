"""Recipe YAML + `key=value` overrides -> a validated `RecipeConfig`, with errors that say where.

Loading goes: read and parse the file (keeping each key's line), parse the overrides, reject unknown
keys and non-mapping sections, merge with OmegaConf (overrides win, in order), resolve `${...}`
interpolations, pick the `peft` class from `peft.method`, check every value's type against the
schema's annotations, then build the dataclasses (whose `__post_init__` checks the values).
Every failure is a `ConfigError` whose message starts with where the bad key came from:
`recipes/x.yaml:12: ...` or `override 2 'train.micro_batch_size=0': ...`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from nemo_adapt.config.schema import RecipeConfig
from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, list_peft_methods, peft_config_class

__all__ = ["config_to_dict", "dump_resolved", "escape_literals", "load_recipe", "load_resolved", "resolve_run_dir",
           "save_resolved"]

_RESOLVED_HEADER = ("# Resolved nemo-adapt config: every key, defaults included, after overrides and interpolation.\n"
                    "# A recipe as well: a literal ${ is written \\${ (and a literal ??? as \\???), so nemo-adapt\n"
                    "# config/plan/launch/run read it back unchanged, as does nemo_adapt.config.load_resolved.\n")
# The second header line of resolved files written before literal `${` was escaped: their values are literal.
_LEGACY_LITERAL_HEADER = "# Load it with nemo_adapt.config.load_resolved (values are taken literally).\n"

# A dotted key of identifiers: `train.micro_batch_size`, `peft`.
_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Float spellings YAML 1.1 leaves as strings (`1e-4`, `3E5`) but any reader means as numbers.
_FLOAT_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
# `${name:...}` is a resolver call (oc.env, oc.decode, ...), as opposed to a `${section.key}` reference.
# An even run of backslashes before `${` escapes only the backslashes (`\\${oc.env:X}` still calls).
_RESOLVER_RE = re.compile(r"(?<!\\)(?:\\\\)*\$\{\s*[A-Za-z_][\w.]*\s*:")
# A `${` and the run of backslashes right before it: OmegaConf's escape unit (`\${` is a literal `${`;
# 2n backslashes before an escaped `${` stand for n backslashes).
_DOLLAR_BRACE_RE = re.compile(r"(\\*)\$\{")
# OmegaConf's missing-value marker `???`, and its escaped spellings `\???`, `\\???`, ... (one backslash dropped).
_MISSING_RE = re.compile(r"\\*\?\?\?")
# `section.field` mentioned in a schema error message, to find the line it came from.
_DOTTED_RE = re.compile(r"\b([a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*)\b")


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML, except that dates stay strings (`run.name: 2024-05-01` is a name, not a date)."""


_RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))


class _ResolvedDumper(yaml.SafeDumper):
    """Safe YAML whose strings read back exactly.

    YAML readers fold the Unicode line breaks NEL, LS and PS (U+0085, U+2028, U+2029) inside plain and
    single-quoted scalars; in double quotes the emitter writes them as escapes (\\N, \\L, \\P) instead.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(ch in value for ch in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ResolvedDumper.add_representer(str, _represent_str)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load a recipe YAML, apply `key=value` overrides, resolve `${...}` and validate everything.

    Overrides use YAML value semantics (`optim.lr=3e-4`, `peft.target_modules=[linear_qkv,linear_proj]`,
    `parallel.virtual_pipeline=null`; an empty value is null, as in YAML). A key names a field
    (`train.micro_batch_size`) or a whole section given as a mapping (`peft={method: lora, rank: 4}`,
    merged into the recipe's section). Sections the recipe omits, or leaves empty, get their defaults.
    Interpolations may refer to other keys (`output_dir: runs/${run.name}`) and see the overrides;
    resolver calls such as `${oc.env:...}` are refused, because the resolved config is saved with the
    run and must neither depend on the environment of one rank nor capture secrets from it.

    Args:
        path: the recipe file.
        overrides: `key=value` strings, applied in order after the file (later ones win).

    Returns:
        The validated config; `peft` is the config class of the chosen `peft.method`.

    Raises:
        ConfigError: the file is missing, unreadable or not YAML; an override is malformed; a key is
            unknown; a section is not a mapping; a value has the wrong type or is out of range; an
            interpolation cannot be resolved. The message starts with the file and line, or the
            override, the problem came from.
    """
    return _load(Path(path), overrides, interpolate=True)


def load_resolved(path: str | os.PathLike[str]) -> RecipeConfig:
    """Load a config written by `save_resolved`, without interpolation.

    The writer escapes every literal `${` as `\\${` (see `dump_resolved`); those escapes are decoded
    here exactly as `load_recipe` decodes them, so both loaders give the saved values. A `${` that is not
    escaped is kept as written, never resolved: files saved before escaping existed (and hand-written
    ones) hold literal values.

    Args:
        path: the resolved config file (e.g. `<run dir>/config.yaml`).

    Returns:
        A config equal to the one that was saved.

    Raises:
        ConfigError: as `load_recipe`.
    """
    return _load(Path(path), (), interpolate=False)


def config_to_dict(cfg: RecipeConfig) -> dict[str, dict[str, Any]]:
    """The config as plain YAML-safe data: `{section: {field: value}}` in schema order.

    Args:
        cfg: a recipe config.

    Returns:
        Nested dicts of str/int/float/bool/None and lists; `peft` includes `method`.
    """
    return _plain(cfg)


def dump_resolved(cfg: RecipeConfig) -> str:
    """The config as YAML text, with a header comment: what `save_resolved` writes.

    Strings are escaped as a recipe author would write them: a literal `${` becomes `\\${` (OmegaConf's
    escape) and a literal `???` becomes `\\???`, so the text is also a recipe that `load_recipe` (and so
    `nemo-adapt config`, `plan`, `launch` and `run`) reads back to the same values.

    Args:
        cfg: a recipe config.

    Returns:
        YAML text that `load_resolved` and `load_recipe` turn back into an equal config.
    """
    body = yaml.dump(escape_literals(config_to_dict(cfg)), Dumper=_ResolvedDumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True)
    return _RESOLVED_HEADER + body


def escape_literals(value: Any) -> Any:
    """Plain config data with every string escaped so that recipe loading gives it back unchanged.

    A run of n backslashes followed by `${` becomes 2n backslashes and `\\${` (OmegaConf reads `\\${` as a
    literal `${` and each doubled backslash before it as one); a string that is only backslashes and
    `???` gets one more backslash (OmegaConf reads a bare `???` as a missing value). Other text, and
    backslashes anywhere else, are left alone, as OmegaConf leaves them.

    Args:
        value: plain data (as `config_to_dict` returns): mappings, lists, strings and scalars.

    Returns:
        The same structure with strings escaped (a new object; the input is not changed).
    """
    if isinstance(value, str):
        if _MISSING_RE.fullmatch(value) and _omegaconf_escapes_missing():
            return "\\" + value
        return _DOLLAR_BRACE_RE.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, Mapping):
        return {k: escape_literals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_literals(v) for v in value]
    return value


def _unescape_literals(value: Any) -> Any:
    """Inverse of `escape_literals` for a resolved file; an unescaped `${` stays literal (never resolved)."""
    if isinstance(value, str):
        if _MISSING_RE.fullmatch(value) and value.startswith("\\") and _omegaconf_escapes_missing():
            return value[1:]

        def decode(m: re.Match[str]) -> str:
            n = len(m.group(1))
            # Odd: n // 2 literal backslashes and an escaped `${`. Even: nothing escaped; kept as written.
            return "\\" * (n // 2) + "${" if n % 2 else m.group(0)

        return _DOLLAR_BRACE_RE.sub(decode, value)
    if isinstance(value, Mapping):
        return {k: _unescape_literals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape_literals(v) for v in value]
    return value


@cache
def _omegaconf_escapes_missing() -> bool:
    """Whether this OmegaConf reads `\\???` as the literal text `???` (2.4 does; 2.3 has no escape for it)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"v": "\\???"}).v == "???"


def save_resolved(cfg: RecipeConfig, path: str | os.PathLike[str]) -> Path:
    """Write the fully resolved config as YAML (atomically; parent directories are created).

    Args:
        cfg: a recipe config.
        path: destination file, typically `resolve_run_dir(cfg) / "config.yaml"`.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so a run killed mid-write never leaves a truncated config to resume from.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dump_resolved(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def resolve_run_dir(cfg: RecipeConfig) -> Path:
    """The run directory: `run.output_dir` if set, else `runs/<run.name>` (relative to the working dir).

    Args:
        cfg: a recipe config.

    Returns:
        The directory path (not created); `~` is expanded.
    """
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir).expanduser()
    return Path("runs") / cfg.run.name


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Override:
    label: str
    tree: dict[str, Any]


class _Where:
    """Where each dotted key's value was last set: `file:line` or `override N 'k=v'`."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.exact: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        """The key's location, else its closest enclosing key's, else the file."""
        key = key.split("[", 1)[0]
        while key:
            if key in self.exact:
                return self.exact[key]
            key = key.rpartition(".")[0]
        return self.path

    def copy(self) -> _Where:
        other = _Where(Path(self.path))
        other.exact = dict(self.exact)
        return other


def _load(path: Path, overrides: Sequence[str], interpolate: bool) -> RecipeConfig:
    data, lines = _read_yaml(path)
    parsed = [_parse_override(text, i) for i, text in enumerate(overrides, start=1)]

    in_file = _Where(path)
    in_file.exact = {key: f"{path}:{line}" for key, line in lines.items()}
    _check_shape(data, in_file)
    where = in_file.copy()
    for ov in parsed:
        _check_shape(ov.tree, lambda key, ov=ov: ov.label, null_sections=False)
        for key in _dotted_keys(ov.tree):
            where.exact[key] = ov.label

    if interpolate:
        merged = _merge_and_resolve(data, in_file, parsed, where)
    elif _LEGACY_LITERAL_HEADER in _header(path):
        merged = data  # written before literal `${` was escaped: every value is literal
    else:
        merged = _unescape_literals(data)
    return _build(merged, where)


def _header(path: Path) -> str:
    """The leading comment lines of a file (its header), or '' when it cannot be read."""
    lines = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                lines.append(line)
    except (OSError, UnicodeDecodeError):
        return ""
    return "".join(lines)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse the file; return its data (a mapping) and the 1-based line of each dotted key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe {str(path)!r} does not exist{_similar_files(path)}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {str(path)!r} is a directory, not a YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {err.strerror or err}") from None

    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        lines = _key_lines(node, path) if node is not None else {}
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        what = err.problem or err.context or "invalid YAML"
        context = f" ({err.context})" if err.context and err.problem else ""
        raise ConfigError(f"{at}: not valid YAML: {what}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()

    if data is None:  # empty, or only comments: every section takes its defaults
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections ({', '.join(_sections())}), "
                          f"got {_kind(data)}")
    return data, lines


def _key_lines(node: yaml.Node, path: Path, prefix: str = "") -> dict[str, int]:
    """1-based line of each mapping key, by dotted path; duplicate keys are an error."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    merged_in: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            # `<<: *anchor` brings keys from elsewhere; explicit keys of this mapping take precedence.
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for src in sources:
                for k, v in _key_lines(src, path, prefix).items():
                    merged_in.setdefault(k, v)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a complex key; rejected later as not a field name
        dotted = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if dotted in lines:
            raise ConfigError(f"{path}:{line}: duplicate key {dotted!r} (first set at line {lines[dotted]})")
        lines[dotted] = line
        lines.update(_key_lines(value_node, path, dotted + "."))
    for k, v in merged_in.items():
        lines.setdefault(k, v)
    return lines


def _similar_files(path: Path) -> str:
    try:
        siblings = {p.stem: p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")}
    except OSError:
        return ""
    # Compare stems: every candidate shares `.yaml`, which would make any two names look alike.
    close = difflib.get_close_matches(path.stem, list(siblings), n=1)
    return f"; did you mean {str(path.parent / siblings[close[0]])!r}?" if close else ""


def _parse_override(text: str, index: int) -> _Override:
    label = f"override {index} {text!r}"
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq:
        raise ConfigError(f"{label}: expected key=value, e.g. train.micro_batch_size=2 or "
                          f"peft.target_modules=[linear_qkv,linear_proj]")
    if not _KEY_RE.match(key):
        raise ConfigError(f"{label}: {key!r} is not a dotted key such as train.micro_batch_size")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{label}: the value is not valid YAML: {problem} "
                          f"(quote the value, e.g. {key}='\"...\"', to pass it as a string)") from None
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return _Override(label=label, tree=tree)


def _dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in tree.items():
        yield f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _dotted_keys(v, f"{prefix}{k}.")


def _check_shape(tree: Mapping[Any, Any], where: Callable[[str], str], null_sections: bool = True) -> None:
    """Sections are known and are mappings; their keys are fields (peft keys are checked later)."""
    sections = _sections()
    for name, body in tree.items():
        if not isinstance(name, str) or name not in sections:
            raise ConfigError(f"{where(str(name))}: unknown section {name!r}{_suggest_section(name)}")
        if body is None and null_sections:
            continue
        if not isinstance(body, Mapping):
            cls = sections[name]
            keys = ", ".join(_field_names(cls)) if cls is not None else "method, ..."
            raise ConfigError(f"{where(name)}: section {name!r} must be a mapping of its keys ({keys}), "
                              f"got {_kind(body)}{'' if body is None else ' ' + _show(body)}")
        cls = sections[name]
        for key in body:
            dotted = f"{name}.{key}"
            if not isinstance(key, str):
                raise ConfigError(f"{where(dotted)}: key {_show(key)} in section {name!r} is not a field name")
            if cls is None:  # the peft class depends on peft.method, known only after merging
                continue
            if key not in _field_names(cls):
                raise ConfigError(f"{where(dotted)}: unknown key {dotted!r}{_suggest_field(name, key, cls)}")


def _merge_and_resolve(data: dict[str, Any], in_file: _Where, overrides: list[_Override],
                       locate: _Where) -> dict[str, Any]:
    """The file, each override in turn, then defaults for unset keys, in OmegaConf; `${...}` resolved."""
    from omegaconf import OmegaConf  # a few hundred ms; only recipes (not load_resolved) need it
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    def create(tree: dict[str, Any], where: Callable[[str], str]):
        for key, value in _leaves(tree):
            if isinstance(value, str) and _RESOLVER_RE.search(value):
                raise ConfigError(f"{where(key)}: {key}={value!r} calls an interpolation resolver; only "
                                  f"references to other keys (${{run.name}}) are allowed, because the resolved "
                                  f"config is saved with the run and must not depend on the environment")
        # An empty section (`optim:` with every key commented out) means its defaults.
        tree = {name: {} if body is None else body for name, body in tree.items()}
        try:
            return OmegaConf.create(tree)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            raise ConfigError(f"{where(key)}: {key or 'recipe'}: not a valid value or ${{...}} interpolation: "
                              f"{_omegaconf_message(err)} (write \\${{ for a literal ${{)") from None

    def fail(err: OmegaConfBaseException) -> ConfigError:
        key = getattr(err, "full_key", None) or ""
        if isinstance(err, MissingMandatoryValue):
            return ConfigError(f"{locate(key)}: {key} is '???' (a value the recipe leaves to be given); "
                               f"set it in the recipe or with an override {key}=...")
        msg = _omegaconf_message(err)
        ref = re.search(r"Interpolation key '([^']+)' not found", msg)
        hint = ""
        if ref:
            close = difflib.get_close_matches(ref.group(1), list(_all_field_keys()), n=1)
            hint = f"; did you mean ${{{close[0]}}}?" if close else ""
        return ConfigError(f"{locate(key)}: {key}: cannot resolve interpolation: {msg}{hint}")

    try:
        merged = create(data, in_file)
        for ov in overrides:
            create(ov.tree, lambda key, ov=ov: ov.label)  # refuses resolvers and malformed ${...}
            # A field's value is replaced, never merged: `logging.wandb_tags=[x]` drops the recipe's tags.
            for section, body in ov.tree.items():
                for key, value in body.items():
                    OmegaConf.update(merged, f"{section}.{key}", value, merge=False)
        # Defaults fill only unset keys (merging them under set ones could clash: list vs mapping), so
        # that `${run.seed}` resolves when the recipe leaves run.seed alone. The peft defaults depend
        # on the method, known only now; a bad method is left for _build to report.
        method = merged.peft.get("method", "none") if "peft" in merged else "none"
        try:
            peft_cls = peft_config_class(method) if isinstance(method, str) else None
        except ConfigError:
            peft_cls = None
        for name, cls in _sections().items():
            cls = peft_cls if cls is None else cls
            if cls is None:
                continue
            # keys(), not `in`: a DictConfig says a `???` value is not in it.
            present = set(merged[name].keys()) if name in merged else set()
            missing = {k: v for k, v in _plain(cls()).items() if k not in present}
            OmegaConf.update(merged, name, missing, merge=True)
        resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise fail(err) from None
    assert isinstance(resolved, dict)
    return resolved


def _omegaconf_message(err: Exception) -> str:
    # OmegaConf appends "full_key: ... object_type=..." lines; the first line is the message.
    msg = getattr(err, "msg", None) or str(err)
    return str(msg).splitlines()[0].strip()


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _leaves(v, key + ".")
        elif isinstance(v, list):
            for item in v:
                yield key, item
        else:
            yield key, v


def _build(data: Mapping[str, Any], locate: _Where) -> RecipeConfig:
    """Typed section objects from resolved data; the dataclasses' own checks run here."""
    sections: dict[str, Any] = {}
    for name, cls in _sections().items():
        body = data.get(name) or {}
        if cls is None:
            cls = _peft_class(body, locate)
        kwargs = {}
        hints = _type_hints(cls)
        for key, value in body.items():
            dotted = f"{name}.{key}"
            kwargs[key] = _coerce(value, hints[key], dotted, locate)
        try:
            sections[name] = cls(**kwargs)
        except ConfigError as err:
            raise type(err)(f"{_locate_message(str(err), name, locate)}: {err}") from err
    return RecipeConfig(**sections)


def _peft_class(body: Mapping[str, Any], locate: _Where) -> type[PeftConfig]:
    """The config class of `peft.method`; keys that class lacks are unknown keys."""
    method = body.get("method", "none")
    if not isinstance(method, str):
        raise ConfigError(f"{locate('peft.method')}: peft.method={_show(method)}: expected a string "
                          f"(a registered method: {', '.join(list_peft_methods())}), got {_kind(method)}")
    try:
        cls = peft_config_class(method)
    except ConfigError as err:
        raise type(err)(f"{locate('peft.method')}: {err}") from err
    fields = _field_names(cls)
    for key in body:
        if key in fields:
            continue
        dotted = f"peft.{key}"
        close = difflib.get_close_matches(key, fields, n=1)
        if close:
            raise ConfigError(f"{locate(dotted)}: unknown key {dotted!r} for peft.method={method!r}; "
                              f"did you mean 'peft.{close[0]}'?")
        having = [m for m in list_peft_methods() if key in _field_names(peft_config_class(m))]
        hint = (f"; {key!r} is a setting of peft.method {' / '.join(having)}" if having
                else f"; peft.method={method!r} has: {', '.join(fields)}")
        origin, here = locate("peft.method"), locate(dotted)
        in_file = f"{locate.path}:"
        if origin != here and not (origin.startswith(in_file) and here.startswith(in_file)):
            hint += f" (peft.method={method!r} comes from {origin})"
        raise ConfigError(f"{locate(dotted)}: unknown key {dotted!r} for peft.method={method!r}{hint}")
    return cls


def _locate_message(message: str, section: str, locate: _Where) -> str:
    """Where the first key a schema error names was set (else where its section was).

    An override beats the file: when an override makes a valid recipe invalid, it is the one to blame.
    """
    found = [locate.exact[key] for key in _DOTTED_RE.findall(message) if key in locate.exact]
    overridden = [where for where in found if not where.startswith(f"{locate.path}:")]
    return (overridden or found or [locate(section)])[0]


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str, locate: _Where) -> Any:
    """`value` converted to annotation `tp` (int -> float, '1e-4' -> float), or a ConfigError."""
    ok, out = _convert(value, tp)
    if ok:
        return out
    hint = ""
    if _admits(tp, str) and not isinstance(value, str):
        hint = "; quote it to pass a string"
    elif _is_list_of(tp, str) and isinstance(value, str):
        hint = f"; write a list: {key}=[{value}]"
    elif isinstance(value, list) and _list_item_type(tp) is not Any:
        item_tp = _list_item_type(tp)
        bad = next((i for i, item in enumerate(value) if not _convert(item, item_tp)[0]), None)
        if bad is not None:
            hint = f"; item {bad} is {_kind(value[bad])} {_show(value[bad])}"
    raise ConfigError(f"{locate(key)}: {key}={_show(value)}: expected {_describe(tp)}, got {_kind(value)}{hint}")


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any or tp is object:
        return True, value
    if tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for arg in args:
            if arg is type(None):
                continue
            ok, out = _convert(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list):
            return False, value
        item_tp = args[0] if args else Any
        out = []
        for item in value:
            ok, conv = _convert(item, item_tp)
            if not ok:
                return False, value
            out.append(conv)
        return True, (tuple(out) if origin is tuple else out)
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            return False, value
        key_tp, val_tp = args if args else (Any, Any)
        out_d = {}
        for k, v in value.items():
            ok_k, k2 = _convert(k, key_tp)
            ok_v, v2 = _convert(v, val_tp)
            if not (ok_k and ok_v):
                return False, value
            out_d[k2] = v2
        return True, out_d
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return True, tp(value)
        except ValueError:
            return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation this checker does not know: leave it to __post_init__


def _admits(tp: Any, simple: type) -> bool:
    if tp is simple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_admits(a, simple) for a in typing.get_args(tp))
    return False


def _list_item_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) in (list, tuple, Sequence):
                return _list_item_type(arg)
    if typing.get_origin(tp) in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return args[0] if args else Any
    return Any


def _is_list_of(tp: Any, item: type) -> bool:
    return _list_item_type(tp) is item


def _describe(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, Sequence):
        item = _describe(args[0]) if args else "values"
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings",
                  "true or false": "booleans"}.get(item, item)
        return f"a list of {plural}"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, roughly: null, true, 'text', [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# --------------------------------------------------------------------------------------------------
# Schema introspection
# --------------------------------------------------------------------------------------------------


@cache
def _sections() -> dict[str, type | None]:
    """Section name -> dataclass; None for the section whose class depends on `peft.method`."""
    hints = _type_hints(RecipeConfig)
    out: dict[str, type | None] = {}
    for f in dataclasses.fields(RecipeConfig):
        cls = hints[f.name]
        out[f.name] = None if isinstance(cls, type) and issubclass(cls, PeftConfig) else cls
    return out


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _all_field_keys() -> dict[str, None]:
    keys: dict[str, None] = {}
    for name, cls in _sections().items():
        classes = [cls] if cls is not None else [peft_config_class(m) for m in list_peft_methods()]
        for c in classes:
            keys.update({f"{name}.{f}": None for f in _field_names(c)})
    return keys


def _suggest_section(name: Any) -> str:
    sections = list(_sections())
    if isinstance(name, str):
        close = difflib.get_close_matches(name, sections, n=1)
        if close:
            return f"; did you mean {close[0]!r}?"
        owners = [k for k in _all_field_keys() if k.split(".", 1)[1] == name]
        if owners:
            return f"; did you mean {owners[0]!r}? (keys go under their section)"
    return f"; sections are: {', '.join(sections)}"


def _suggest_field(section: str, key: str, cls: type) -> str:
    fields = _field_names(cls)
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return f"; did you mean '{section}.{close[0]}'?"
    elsewhere = [k for k in _all_field_keys() if k.split(".", 1)[1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f"; {section} has: {', '.join(fields)}"
