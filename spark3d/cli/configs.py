"""Config files and config errors for people: a run's own ``config.yaml`` is a valid ``--config`` of every command
(run-only keys dropped in one place), overrides never silently lost to a later ``--config``, and jsonargparse's
errors read as one line with the real reason first."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError, Spark3dError

__all__ = ["RUN_ONLY_KEYS", "RECORDED_KEYS", "read_config_file", "prepare_config_args", "explain_parse_error",
           "name_link_source"]

# how a run was started, not what it is: taken from the command line only, never from a config file (a run's
# config.yaml records them; `overwrite: true` or `ckpt_path: …` carried into another command would delete a run
# or resume the wrong one)
RUN_ONLY_KEYS = {"ckpt_path": None, "overwrite": False}
# options of the training commands that a run's config.yaml records: dropped by a command that does not take them
# (register a new training option here, and every other command accepts configs that hold it)
RECORDED_KEYS = {"checkpoint_every_n_steps", "checkpoint_every_n_minutes", "nonfinite_skip_steps"}
_KINDS = {"PretrainModule": ("pretraining", "pretrain"), "SparKPretrain": ("pretraining", "pretrain"),
          "SegmentationModule": ("fine-tuning", "finetune")}


def read_config_file(path: str | Path, accepted: Iterable[str] | None = None, prog: str = "spark3d") -> dict[str, Any]:
    """A YAML config as a dict, with the keys of :data:`RUN_ONLY_KEYS` dropped (said in one line when one holds a
    value other than its default) and, when ``accepted`` is given, the recorded training options it lacks.
    ConfigError for a missing, unreadable or non-mapping file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; expected a YAML file (e.g. a run's config.yaml)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--config {path} is not readable YAML: {first}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path} holds a {type(content).__name__}; expected a mapping of options")
    return drop_run_keys(content, path, accepted, prog)


def drop_run_keys(content: dict[str, Any], path: str | Path, accepted: Iterable[str] | None, prog: str) -> dict[str, Any]:
    """``content`` without the run-only keys and, when ``accepted`` is given, the recorded options it lacks."""
    out = dict(content)
    for key, default in RUN_ONLY_KEYS.items():
        if key in out and out.pop(key) != default:
            print(f"{prog}: note: {path}: '{key}: {content[key]}' is not used (--{key} is taken from the command line "
                  "only)", file=sys.stderr)
    if accepted is not None:
        accepted = set(accepted)
        for key in RECORDED_KEYS - accepted:
            out.pop(key, None)
    return out


def _set_keys(content: Any, prefix: str = "") -> set[str]:
    """Every dotted key a config mapping sets (``model.init_args.lr``, and ``model.lr`` for class options)."""
    keys: set[str] = set()
    if isinstance(content, dict):
        for k, v in content.items():
            key = f"{prefix}{k}"
            keys.add(key)
            keys |= _set_keys(v, key + ".")
            if k == "init_args" and prefix:
                keys |= _set_keys(v, prefix)  # `--model.lr` is jsonargparse shorthand for model.init_args.lr
    return keys


def prepare_config_args(args: list[str], accepted: Iterable[str], prog: str) -> list[str]:
    """``args`` with each ``--config FILE`` read by :func:`read_config_file` (passed on as YAML text when keys
    were dropped) — ConfigError for an override placed before a ``--config`` that sets the same key."""
    out, seen = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a file")
                value, i = args[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            inline = not Path(value).exists() and (value.lstrip().startswith(("{", "[")) or "\n" in value or ": " in value)
            content = None if inline else read_config_file(value, accepted, prog)  # YAML text goes on as it is
            if content is not None:
                lost = [opt for opt in seen if opt.removeprefix("--") in _set_keys(content)]
                if lost:
                    raise ConfigError(f"{lost[0]} is given before --config {value}, which sets it too and would "
                                      f"override it: put --config first, then the overrides")
                raw = yaml.safe_load(Path(value).read_text()) or {}
                value = value if content == raw else yaml.safe_dump(content, sort_keys=False)
            out += ["--config", value]
            continue
        if arg.startswith("--"):
            seen.append(arg.split("=", 1)[0])
        out.append(arg)
        i += 1
    return out


# ---------------------------------------------------------------------------------------------- parse errors
def _chain(err: BaseException | None) -> list[BaseException]:
    found, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if not found or str(found[-1]) != str(err):
            found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _type_name(text: str) -> str:
    """``<class 'float'>`` → ``a float``; ``typing.Literal['a', 'b']`` → ``one of 'a', 'b'``."""
    text = text.strip()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    cls = re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>", text)
    name = cls.group(1) if cls else text
    return {"Sequence": "a list", "NoneType": "null", "str": "a string", "int": "an integer"}.get(name, f"a {name}")


def _options_of(class_path: str) -> list[str]:
    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ValueError, ImportError, AttributeError, TypeError):
        return []


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    best = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {best[0]}?" if best else ""


def explain_parse_error(err: BaseException, prog: str, options: Iterable[str] = ()) -> str | None:
    """The one line a person needs from a jsonargparse/LightningCLI error chain (``options``: the parser's option
    strings, for "did you mean"); None when the chain says nothing recognisable."""
    chain = _chain(err)
    keys, class_path = [], None
    for e in chain:
        text = str(e)
        key = re.match(r'Parser key "([^"]+)":', text)
        if key and (not keys or keys[-1] != key.group(1)):
            keys.append(key.group(1))
        problem = re.match(r"Problem with given class_path '([^']+)'", text)
        if problem:
            class_path = problem.group(1)
            keys.append("init_args")
        given = re.search(r"class_path='([^']+)'", text)
        if class_path is None and given:
            class_path = given.group(1)
    key = ".".join(keys)
    inner = str(chain[-1]).strip()
    first = inner.splitlines()[0] if inner else type(chain[-1]).__name__
    owner = class_path.rsplit(".", 1)[-1] if class_path else prog
    option = re.fullmatch(r"Option '([^']+)' is not accepted", first)
    if option:
        name = option.group(1)
        candidates = _options_of(class_path) if class_path else [o.removeprefix("--") for o in options]
        return f"{name} is not an option of {owner}{_did_you_mean(name, candidates)}"
    unknown = re.match(r"unrecognized arguments: (\S+)", first)
    if unknown:
        name = unknown.group(1).split("=", 1)[0]
        return f"{name} is not an option of {prog}{_did_you_mean(name, options)} (see `{prog} --help`)"
    subclass = re.match(r"Import path (\S+) does not correspond to a subclass of (\w+)", first)
    if subclass:
        given, base = subclass.group(1), subclass.group(2)
        want = _KINDS.get(base)
        have = _KINDS.get(given.rsplit(".", 1)[-1])
        line = f"{key or 'model'}.class_path is {given}, not a {base}"
        if want:
            line += f": {prog} takes a {want[0]} config"
        if have and have != want:
            line += f"; this is a {have[0]} config (use `spark3d {have[1]}`)"
        return line
    expected = re.match(r"Expected a (.+?)\. Got value: (.*)", first)
    if expected:
        union = str(chain[-2]) if len(chain) > 1 and "Union subtypes" in str(chain[-2]) else ""
        kinds = [_type_name(m) for m in re.findall(r"- Expected a (.+?)(?:\. Got value.*)?$", union, re.M)]
        kinds = kinds or [_type_name(expected.group(1))]
        return f"{key or 'a value'}: expected {' or '.join(dict.fromkeys(kinds))}, got {expected.group(2)!r}"
    if class_path and isinstance(chain[-1], (ImportError, AttributeError)):
        return f"{keys[0] if keys else 'model'}.class_path {class_path} cannot be imported: {first}"
    kwarg = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", first)
    if kwarg:
        return f"{kwarg.group(2)} is not an option of {kwarg.group(1)} (model.init_args.backbone_kwargs)"
    missing = re.match(r"File does not exist: '?([^']+)'?", first)
    if missing:
        return f"--{key or 'config'} {missing.group(1)}: no such file"
    if "Union subtypes" in first or re.match(r'Parser key "', first):
        return None
    where = f" ({key}{': ' + owner if class_path else ''})" if key else (f" (in {owner})" if class_path else "")
    return f"{first}{where}"


def name_link_source(err: Spark3dError, links: dict[str, str]) -> Spark3dError:
    """``err`` naming the key the user set (``data.init_args.roi_size``) where it names the model option linked to
    it (``input size``/``input_size``)."""
    message = str(err)
    for source, target in links.items():
        leaf = target.rsplit(".", 1)[-1]
        if source.rsplit(".", 1)[-1] == leaf:
            continue
        for form in (target, leaf, leaf.replace("_", " ")):
            if form in message:
                return type(err)(message.replace(form, f"{source} (the model's {leaf})", 1))
    return err
