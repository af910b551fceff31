"""Loading a round manifest: YAML in, a validated :class:`~respect_hpc.config.schema.Manifest` out.

Every problem is reported as ``FILE:LINE: field.path: what is wrong``. Relative paths are resolved
against the manifest's folder into absolute paths (a run directory's recorded manifest reads the same
from any folder). ``KEY=VALUE`` overrides from the command line (dotted paths, a variant addressed by its
name: ``variants.b-fft.objective=rl``; the value read as YAML, a relative path against the working folder)
go through the same schema, and a problem they cause names the override instead of a line.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from respect_hpc.config.schema import Manifest, PathKind
from respect_hpc.core.errors import RespectError
from respect_hpc.core.text import clip


class ManifestError(RespectError, ValueError):
    """A manifest with problems; ``problems`` holds one ``FILE:LINE: path: message`` line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _loc_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line_of(root: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the YAML node at ``loc``, or of its nearest existing parent."""
    node, line = root, 1 if root is None else root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _message(error: dict, model_fields: list[str]) -> str:
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), model_fields, n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required field missing"
    if kind == "literal_error":
        choices = ", ".join(s.strip("'") for s in ctx["expected"].replace(" or ", ", ").split(", "))
        name = next((p for p in reversed(error["loc"]) if isinstance(p, str)), "value")
        return f"unknown {name} {clip(value)}: expected one of {choices}"
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                "list": "a list", "dict": "a mapping", "model": "a mapping", "path": "a path"}
    for prefix, what in expected.items():
        if kind.startswith(prefix + "_") and kind != "string_too_short":
            return f"expected {what}, got {clip(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"expected a value {sign} {bound}, got {clip(value)}"
    if kind in ("too_long", "string_too_long"):
        return f"expected at most {ctx.get('max_length')} characters, got {len(value) if isinstance(value, str) else '?'}"
    if kind == "too_short":
        return "expected at least one entry"
    if kind == "finite_number":
        return f"expected a finite number, got {clip(value)}"
    message = error["msg"].removeprefix("Value error, ")
    return message if len(message) <= 400 else f"{message[:400]}..."


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model at ``loc`` (for did-you-mean suggestions)."""
    model: type[BaseModel] | None = Manifest
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        args = getattr(annotation, "__args__", ()) or (annotation,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def _unwrap(annotation) -> tuple[object, PathKind | None]:
    """An annotation without Annotated and Optional: (the type, its PathKind marker if any)."""
    kind = None
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *metadata = get_args(annotation)
            kind = next((m for m in metadata if isinstance(m, PathKind)), kind)
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, kind


def path_fields(value, model: type[BaseModel], loc: tuple = ()):
    """Every path field of ``value`` (a validated model, or its raw dict when ``value`` is a dict): yields
    (loc, path or raw value, PathKind), found by walking ``model``'s schema."""
    for name, field in model.model_fields.items():
        item = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
        if item is None:
            continue
        annotation, kind = _unwrap(field.annotation)  # pydantic keeps a field's own Annotated metadata apart
        kind = kind or next((m for m in field.metadata if isinstance(m, PathKind)), None)
        origin, args = get_origin(annotation), get_args(annotation)
        if kind is not None:
            yield loc + (name,), item, kind
        elif origin is list and args:
            inner, inner_kind = _unwrap(args[0])
            for i, element in enumerate(item if isinstance(item, list) else []):
                if inner_kind is not None:
                    yield loc + (name, i), element, inner_kind
                elif isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from path_fields(element, inner, loc + (name, i))
        elif origin is dict and len(args) == 2:
            _, inner_kind = _unwrap(args[1])
            if inner_kind is not None and isinstance(item, dict):
                yield from ((loc + (name, key), element, inner_kind) for key, element in item.items())
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from path_fields(item, annotation, loc + (name,))


def _path_problem(target: Path, kind: PathKind) -> str | None:
    """What is wrong with a path a manifest names, by the kind its field asks for, or None."""
    if kind.kind == "output":
        return f"expected a folder, got a file '{target}'" if target.exists() and not target.is_dir() else None
    if kind.inside is not None and target.is_dir():
        target, kind = target / kind.inside, PathKind("file")
    if not target.exists():
        return f"no such file or folder '{target / kind.inside if kind.inside else target}'"
    if kind.kind == "folder" and not target.is_dir():
        return f"expected a folder, got a file '{target}'"
    if kind.kind == "file" and not target.is_file():
        return f"expected a file, got '{target}'"
    return None


def _missing_previous(manifest: Manifest) -> list[tuple[tuple, str]]:
    """Variants that continue from the previous round's selected policy when the run directory holds none."""
    found = []
    for i, variant in enumerate(manifest.variants):
        if variant.continues and variant.previous_adapter is None and manifest.round > 0:
            folder = manifest.previous_adapter(variant)
            if not (folder / "adapter_config.json").is_file():
                found.append((("variants", i, "init"), f"continues from round {manifest.round - 1}'s selected policy, "
                              f"but '{folder}' holds no adapter: run that round, set previous_adapter, or init: base"))
    return found


def _join(base: Path, value: str) -> str:
    return os.path.normpath(base / value)


def _resolve(data: object, base: Path) -> object:
    """A raw manifest with every relative path resolved against its folder (``workdir`` defaults to runs/)."""
    if not isinstance(data, dict):
        return data
    data = {**data, "workdir": data.get("workdir", "runs")}
    for loc, value, _ in list(path_fields(data, Manifest)):
        if isinstance(value, str):
            _set(data, loc, _join(base, value))
    return data


def _set(data: dict, loc: tuple, value: str) -> None:
    """Set the value at ``loc`` in a raw manifest, copying each container on the way (the input stays as
    it was)."""
    node = data
    for part in loc[:-1]:
        child = node[part]
        node[part] = child = dict(child) if isinstance(child, dict) else list(child)
        node = child
    node[loc[-1]] = value


MAX_OVERRIDES = 64
MAX_OVERRIDE_CHARS = 4096
OVERRIDE_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class Override:
    """One ``KEY=VALUE`` as given, and where it lands in the manifest (variants by index)."""

    text: str
    loc: tuple


def _override_error(text: str, problem: str) -> ManifestError:
    return ManifestError([f"override {clip(text)}: {problem}"])


def _parse_override(text: str) -> tuple[list[str], object]:
    if len(text) > MAX_OVERRIDE_CHARS:
        raise _override_error(text, f"longer than {MAX_OVERRIDE_CHARS} characters")
    key, equals, value = text.partition("=")
    if not equals or not OVERRIDE_KEY.fullmatch(key):
        raise _override_error(text, "expected KEY=VALUE, KEY a dotted path of manifest fields (e.g. "
                                    "training.fft.epochs=3, variants.b-fft.objective=rl)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise _override_error(text, "the value is not YAML (quote it)") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: Sequence[str], cwd: Path | None = None) -> tuple[dict, list[Override]]:
    """``raw`` with each ``KEY=VALUE`` set (containers copied; the input stays as it was) and where each landed.
    A string landing on a path field is resolved against ``cwd`` where given."""
    if len(overrides) > MAX_OVERRIDES:
        raise ManifestError([f"{len(overrides)} overrides: expected at most {MAX_OVERRIDES}"])
    data, applied = dict(raw), []
    for text in overrides:
        parts, value = _parse_override(text)
        node, loc = data, []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                names = [v.get("name") for v in node if isinstance(v, dict)]
                if part.isdigit() and int(part) < len(node):
                    index = int(part)
                elif part in names:
                    index = names.index(part)
                else:
                    raise _override_error(text, f"{_loc_text(tuple(loc))}: no entry named {clip(part)} (named: "
                                                f"{', '.join(map(str, names)) or 'none'})")
                part = index
            elif not isinstance(node, dict):
                raise _override_error(text, f"{_loc_text(tuple(loc))}: holds a value, not fields")
            loc.append(part)
            if last:
                node[part] = value
            else:
                child = node[part] if (isinstance(node, list) or part in node) else None
                child = {} if child is None else (dict(child) if isinstance(child, dict) else
                                                  list(child) if isinstance(child, list) else child)
                node[part] = child
                node = child
        applied.append(Override(text, tuple(loc)))
    if cwd is not None:
        for loc, value, _ in list(path_fields(data, Manifest)):
            if isinstance(value, str) and any(loc[:len(o.loc)] == o.loc for o in applied):
                _set(data, loc, _join(cwd, value))
    return data, applied


def _override_of(loc: tuple, applied: list[Override]) -> Override | None:
    """The last override at or above ``loc``, or one below it (a section's own check); none for the top level."""
    if not loc:
        return None
    return next((o for o in reversed(applied) if loc[:len(o.loc)] == o.loc or o.loc[:len(loc)] == loc), None)


MAX_DEPTH = 32        # nesting levels of a manifest (its schema needs 5)
MAX_VALUES = 100_000  # values a manifest expands to, aliases followed (a few hundred in practice)


def _duplicate_keys(root: yaml.Node | None, path: Path) -> list[tuple[tuple, int]]:
    """(loc, line) of every key given twice in a mapping. Refuses a document nested deeper than MAX_DEPTH or
    expanding, aliases followed, to more than MAX_VALUES values (twelve lines of nested aliases can name
    billions): what is not bounded here would be walked again by validation."""
    found, budget = [], [MAX_VALUES]

    def walk(node: yaml.Node | None, loc: tuple) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ManifestError([f"{path}:{node.start_mark.line + 1}: (yaml): expands to more than {MAX_VALUES:,} "
                                 "values (aliases repeated inside each other); write the values out"])
        if len(loc) > MAX_DEPTH:
            raise ManifestError([f"{path}:{node.start_mark.line + 1}: {_loc_text(loc[:3])}...: nested deeper than "
                                 f"{MAX_DEPTH} levels"])
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key, value in node.value:
                if key.value in seen:
                    found.append((loc + (key.value,), key.start_mark.line + 1))
                seen.add(key.value)
                walk(value, loc + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    walk(root, ())
    return found


def _read_yaml(path: Path) -> tuple[yaml.Node | None, object, list[tuple[tuple, int]]]:
    """A YAML file's node tree (for line numbers) and its data; ManifestError naming the line otherwise. Only a
    regular file is read (a FIFO would block), and a file that is not YAML is never quoted (it may be a secret)."""
    if not path.is_file():
        raise ManifestError([f"{path}:1: (file): " + ("not a regular file" if path.exists() else
                                                     "no such file")])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([f"{path}:1: (file): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ManifestError([f"{path}:{line}: (file): not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                             f"offset {exc.start})"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ManifestError([f"{path}:{line}: (yaml): {getattr(exc, 'problem', None) or 'not valid YAML'}"]) from None
    except RecursionError:
        raise ManifestError([f"{path}:1: (yaml): nested deeper than {MAX_DEPTH} levels"]) from None
    duplicates = _duplicate_keys(root, path)  # bounds the document before anything expands it
    return root, yaml.safe_load(text), duplicates


def load_part(path: str | Path, kind, key: str | None = None):
    """A YAML file holding one part of a manifest (``kind``: a pydantic model or a type such as
    ``list[Variant]``; under ``key`` where given, e.g. a cluster profile's ``cluster``), validated and
    reported as :func:`load_manifest` reports (FILE:LINE: field: problem)."""
    path = Path(path)
    root, raw, duplicates = _read_yaml(path)
    problems = [f"{path}:{line}: {_loc_text(loc)}: duplicate key" for loc, line in duplicates]
    if key is not None:
        if not isinstance(raw, dict) or key not in raw:
            raise ManifestError(problems + [f"{path}:1: (top level): expected a mapping with a '{key}' section"])
        raw = raw[key]
    try:
        value = TypeAdapter(kind).validate_python(raw)
    except ValidationError as exc:
        prefix = (key,) if key else ()
        for error in exc.errors():
            loc = prefix + tuple(error["loc"])
            problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {_message(error, [])}")
        value = None
    if problems:
        raise ManifestError(problems)
    return value


def load_manifest(path: str | Path, *, check_files: bool = True, overrides: Sequence[str] = (),
                  checks: Callable[[Manifest], list[tuple[tuple, str]]] | None = None) -> Manifest:
    """Read and validate a manifest, ``overrides`` (``KEY=VALUE``) applied; raises :class:`ManifestError` listing
    every problem. With ``check_files``, ``checks`` (from a higher layer: what the named files hold, such as a
    model's family) adds its (field location, problem) pairs, each reported at its line."""
    path = Path(path)
    root, raw, duplicates = _read_yaml(path)
    problems = [f"{path}:{line}: {_loc_text(loc)}: duplicate key" for loc, line in duplicates]
    if not isinstance(raw, dict):
        raise ManifestError(problems + [f"{path}:1: (top level): expected a mapping of manifest sections"])
    data, applied = apply_overrides(_resolve(raw, path.parent.absolute()), overrides, Path.cwd())
    given = []  # problems an override causes: they name it, not a line of the file

    def where(loc: tuple) -> str | None:
        override = _override_of(loc, applied)
        return None if override is None else f"override {clip(override.text)}: {_loc_text(loc)}"

    manifest = None
    try:
        manifest = Manifest.model_validate(data)  # valid from any folder
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            message = _message(error, _fields_at(loc))
            if where(loc):
                given.append(f"{where(loc)}: {message}")
            else:
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {message}")
    if check_files and manifest is not None:
        for loc, target, kind in path_fields(manifest, Manifest):
            problem = _path_problem(target, kind)
            if problem and where(loc):
                given.append(f"{where(loc)}: {problem}")
            elif problem:
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {problem}")
        run_dir = manifest.run_dir.root.resolve()
        for loc, target, kind in path_fields(manifest, Manifest):
            if kind.kind != "output" and target.is_dir() and run_dir.is_relative_to(target.resolve()):
                problems.append(f"{path}:{_line_of(root, ('workdir',))}: workdir: the run directory '{run_dir}' is "
                                f"inside {_loc_text(loc)} '{target}': its outputs would be read back as inputs; "
                                "put workdir elsewhere")
    if check_files and manifest is not None and not problems:  # where the run directory is must be settled first
        for loc, problem in [*_missing_previous(manifest), *(checks(manifest) if checks else [])]:
            if where(loc):
                given.append(f"{where(loc)}: {problem}")
            else:
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {problem}")
    if given or problems or manifest is None:
        raise ManifestError(given + sorted(problems, key=lambda p: int(p[len(str(path)) + 1:].split(":", 1)[0])))
    return manifest


def manifest_json_schema() -> dict:
    return Manifest.model_json_schema()
