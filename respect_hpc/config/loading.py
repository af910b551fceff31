"""Loading a round manifest: YAML in, a validated :class:`~respect_hpc.config.schema.Manifest` out.

Every problem is reported as ``FILE:LINE: field.path: what is wrong``. Relative paths are resolved
against the manifest's folder into absolute paths (a run directory's recorded manifest reads the same
from any folder).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from respect_hpc.config.schema import Manifest


class ManifestError(ValueError):
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
        return f"unknown {name} {value!r}: expected one of {choices}"
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                "list": "a list", "dict": "a mapping", "model": "a mapping", "path": "a path"}
    for prefix, what in expected.items():
        if kind.startswith(prefix + "_") and kind != "string_too_short":
            return f"expected {what}, got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"expected a value {sign} {bound}, got {value!r}"
    if kind == "too_short":
        return "expected at least one entry"
    if kind == "finite_number":
        return f"expected a finite number, got {value!r}"
    return error["msg"].removeprefix("Value error, ")


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


def _paths(manifest: Manifest) -> list[tuple[tuple, Path, str]]:
    """The paths a manifest names: (loc, path, "file" | "folder" | "any")."""
    found = [(("data", "interactions", i), p, "any") for i, p in enumerate(manifest.data.interactions)]
    for name, kind in (("seed_data", "any"), ("validation", "any"), ("images", "folder")):
        value = getattr(manifest.data, name)
        if value is not None:
            found.append((("data", name), value, kind))
    found.append((("model", "path"), manifest.model.path, "any"))
    if manifest.decoder.model is not None:
        found.append((("decoder", "model", "path"), manifest.decoder.model.path, "any"))
    for kind, path in manifest.decoder.labels.items():
        found.append((("decoder", "labels", kind), path, "file"))
    for name, path in manifest.data.deployed.items():
        found.append((("data", "deployed", name), path, "folder"))
    for i, variant in enumerate(manifest.variants):
        if variant.previous_adapter is not None:
            found.append((("variants", i, "previous_adapter"), variant.previous_adapter, "folder"))
    if manifest.simulation is not None:
        found.append((("simulation", "kilogram"), manifest.simulation.kilogram / "dense.json", "file"))
    return found


def _missing_previous(manifest: Manifest) -> list[tuple[tuple, str]]:
    """Variants that continue from the previous round's selected policy when the run directory holds none."""
    from respect_hpc.core.rundir import RunDir

    found = []
    for i, variant in enumerate(manifest.variants):
        if variant.continues and variant.previous_adapter is None and manifest.round > 0:
            folder = RunDir.of(manifest).previous_policy(manifest.round, variant.name)
            if not (folder / "adapter_config.json").is_file():
                found.append((("variants", i, "init"), f"continues from round {manifest.round - 1}'s selected policy, "
                              f"but '{folder}' holds no adapter: run that round, set previous_adapter, or init: base"))
    return found


def _join(base: Path, value: str) -> str:
    return os.path.normpath(base / value)


def _resolve(data: object, base: Path) -> object:
    """Resolve the relative paths of a raw manifest against its folder."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    sections = {"data": ("interactions", "seed_data", "validation", "images"), "model": ("path",)}
    for section, keys in sections.items():
        if isinstance(data.get(section), dict):
            data[section] = part = dict(data[section])
            for key in keys:
                value = part.get(key)
                if isinstance(value, str):
                    part[key] = _join(base, value)
                elif isinstance(value, list):
                    part[key] = [_join(base, v) if isinstance(v, str) else v for v in value]
    if isinstance(data.get("decoder"), dict) and isinstance(data["decoder"].get("model"), dict):
        data["decoder"] = {**data["decoder"], "model": _resolve({"model": data["decoder"]["model"]}, base)["model"]}
    if isinstance(data.get("data"), dict) and isinstance(data["data"].get("deployed"), dict):
        data["data"] = {**data["data"], "deployed": {k: _join(base, v) if isinstance(v, str) else v
                                                     for k, v in data["data"]["deployed"].items()}}
    if isinstance(data.get("decoder"), dict) and isinstance(data["decoder"].get("labels"), dict):
        data["decoder"] = {**data["decoder"], "labels": {k: _join(base, v) if isinstance(v, str) else v
                                                         for k, v in data["decoder"]["labels"].items()}}
    if isinstance(data.get("variants"), list):
        data["variants"] = [{**v, "previous_adapter": _join(base, v["previous_adapter"])}
                            if isinstance(v, dict) and isinstance(v.get("previous_adapter"), str) else v
                            for v in data["variants"]]
    if isinstance(data.get("simulation"), dict) and isinstance(data["simulation"].get("kilogram"), str):
        data["simulation"] = {**data["simulation"], "kilogram": _join(base, data["simulation"]["kilogram"])}
    if isinstance(data.get("workdir", "runs"), str):
        data["workdir"] = _join(base, data.get("workdir", "runs"))
    return data


def _duplicate_keys(node: yaml.Node | None, path: tuple = ()) -> list[tuple[tuple, int]]:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        found = []
        for key, value in node.value:
            if key.value in seen:
                found.append((path + (key.value,), key.start_mark.line + 1))
            seen.add(key.value)
            found += _duplicate_keys(value, path + (key.value,))
        return found
    if isinstance(node, yaml.SequenceNode):
        return [d for i, item in enumerate(node.value) for d in _duplicate_keys(item, path + (i,))]
    return []


def load_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest; raises :class:`ManifestError` listing every problem."""
    path = Path(path)
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
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ManifestError([f"{path}:{line}: (yaml): {getattr(exc, 'problem', None) or exc}"]) from None
    problems = [f"{path}:{line}: {_loc_text(loc)}: duplicate key" for loc, line in _duplicate_keys(root)]
    if not isinstance(raw, dict):
        raise ManifestError(problems + [f"{path}:1: (top level): expected a mapping of manifest sections"])
    manifest = None
    try:
        manifest = Manifest.model_validate(_resolve(raw, path.parent.absolute()))  # valid from any folder
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {_message(error, _fields_at(loc))}")
    if check_files and manifest is not None:
        for loc, target, kind in _paths(manifest):
            if not target.exists():
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: no such file or folder '{target}'")
            elif kind == "folder" and not target.is_dir():
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: expected a folder, got a file '{target}'")
            elif kind == "file" and not target.is_file():
                problems.append(f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: expected a file, got '{target}'")
    if check_files and manifest is not None and manifest.workdir.exists() and not manifest.workdir.is_dir():
        problems.append(f"{path}:{_line_of(root, ('workdir',))}: workdir: expected a folder, got a file "
                        f"'{manifest.workdir}'")
    if check_files and manifest is not None and not problems:  # where the run directory is must be settled first
        problems += [f"{path}:{_line_of(root, loc)}: {_loc_text(loc)}: {problem}"
                     for loc, problem in _missing_previous(manifest)]
    if problems or manifest is None:
        raise ManifestError(sorted(problems, key=lambda p: int(p[len(str(path)) + 1:].split(":", 1)[0])))
    return manifest


def manifest_json_schema() -> dict:
    return Manifest.model_json_schema()
