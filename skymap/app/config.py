"""Configuration round-trip: skymap's frozen dataclasses to plain dicts and TOML, and back.

Every configuration object in skymap (sigma clips, estimators, interpolators, mesh
estimators, maskers, pipeline stages, ...) is a frozen dataclass. `to_dict` turns one
into a plain, JSON-ready dict that names its class under the ``"type"`` key as
``"module:QualName"``; `from_dict` rebuilds it. `dumps_toml` / `loads_toml` and
`save_toml` / `load_toml` do the same through TOML, for the command line.

Encoding rules
--------------
* A dataclass becomes ``{"type": "skymap.stats:SigmaClip", <field>: <value>, ...}`` with
  every ``init`` field, nested dataclasses encoded the same way.
* Tuples and lists become lists. On the way back a list filling a dataclass field
  becomes a tuple unless the field's annotation asks for a list (frozen configurations
  hold tuples, so that they stay hashable); lists inside plain dicts and lists stay
  lists.
* ``pathlib.Path`` becomes a string, and a string comes back as a ``Path`` where the
  field's annotation says so. numpy scalars become Python numbers.
* A dict stays a dict (string keys only). One that could be mistaken for an encoded
  object -- it has a ``"type"``, ``"__dict__"`` or ``"__none__"`` key -- is wrapped as
  ``{"__dict__": {...}}``.
* None stays None in the dict form (JSON's null). TOML has no null, so in TOML a field
  that is None by default is simply left out when it is None, and any other None is
  the table ``{ __none__ = true }`` (written by hand as ``key = { __none__ = true }``;
  `dumps_toml` writes it as a ``[key]`` section holding ``__none__ = true``), read
  back as None.
* Anything else (arrays, callables, foreign objects) raises TypeError naming the key:
  data never lives on configuration objects.

`from_dict` imports classes from the ``skymap`` package only (pass ``modules=`` to trust
other top-level packages, e.g. your own plug-ins): a configuration file can then never
make skymap import arbitrary code.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import tempfile
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "check_type",
    "dumps_toml",
    "field_docs",
    "from_dict",
    "load_toml",
    "loads_toml",
    "save_toml",
    "to_dict",
]

TYPE_KEY = "type"
_NONE_KEY = "__none__"
#: How a field's None is written in TOML.
NONE_TEXT = "none"
_DICT_KEY = "__dict__"
_RESERVED = (TYPE_KEY, _NONE_KEY, _DICT_KEY)
DEFAULT_MODULES = ("skymap",)


# ------------------------------------------------------------------------- to_dict


def to_dict(obj: Any) -> dict:
    """Return a plain dict describing the dataclass instance ``obj`` (JSON-ready).

    Examples
    --------
    >>> from skymap.stats.estimators import SigmaClip
    >>> to_dict(SigmaClip(sigma=2.5))
    {'type': 'skymap.stats:SigmaClip', 'sigma': 2.5, 'sigma_lower': None, \
'sigma_upper': None, 'maxiters': 10, 'cenfunc': 'median', 'stdfunc': 'std'}
    """
    if not _is_instance(obj):
        raise TypeError(
            f"to_dict needs a dataclass instance (a skymap configuration), got "
            f"{type(obj).__name__}"
        )
    return _encode(obj, "", toml=False)


def _is_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _class_name(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise TypeError(
            f"{cls.__qualname__} is defined inside a function and cannot be found again "
            "by from_dict; define it at module level"
        )
    # The shortest public path (``skymap.stats:SigmaClip``, not the defining module's):
    # saved files then survive a class moving between modules of its subpackage.
    module = cls.__module__
    parts = module.split(".")
    for n in range(1, len(parts)):
        parent = sys.modules.get(".".join(parts[:n]))
        if parent is not None and getattr(parent, cls.__qualname__, None) is cls:
            module = ".".join(parts[:n])
            break
    return f"{module}:{cls.__qualname__}"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, *, toml: bool) -> Any:
    """Encode ``value``; with ``toml=True`` None becomes ``{"__none__": True}`` and a
    dataclass field that is None by default is left out when it is None."""
    if value is None:
        # TOML has no null: a field's None is the string "none" (decoded by the field's
        # annotation); inside plain dicts and lists, where no annotation says so, a table
        return {_NONE_KEY: True} if toml else None
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    if _is_instance(value):
        out = {TYPE_KEY: _class_name(type(value))}
        for f in dataclasses.fields(value):
            if f.init and f.name == TYPE_KEY:
                raise TypeError(
                    f"{path or 'value'}: {type(value).__qualname__} has a field named "
                    f"{TYPE_KEY!r}, which the encoding reserves for the class name"
                )
            if not f.init:
                continue
            v = getattr(value, f.name)
            if toml and v is None and f.default is None:
                continue
            if toml and v is None:
                out[f.name] = NONE_TEXT
                continue
            out[f.name] = _encode(v, _join(path, f.name), toml=toml)
        return out
    if isinstance(value, (tuple, list)):
        return [_encode(v, _join(path, i), toml=toml) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{path or 'value'}: dict keys must be strings to be saved, got {k!r}"
                )
            out[k] = _encode(v, _join(path, k), toml=toml)
        if any(k in out for k in _RESERVED):
            return {_DICT_KEY: out}
        return out
    where = path or "value"
    raise TypeError(
        f"{where}: cannot save a {type(value).__name__} in a configuration (allowed: "
        "dataclasses, numbers, strings, booleans, None, paths, lists, tuples, dicts)"
    )


# ----------------------------------------------------------------------- from_dict


def from_dict(d: Mapping, *, modules: Iterable[str] = DEFAULT_MODULES) -> Any:
    """Rebuild the object that `to_dict` described.

    Parameters
    ----------
    d : Mapping
        A dict with a ``"type"`` key ``"module:QualName"`` and the class's fields.
    modules : iterable of str
        Top-level packages whose classes may be imported; only ``"skymap"`` by default.

    Raises
    ------
    ValueError
        For an untrusted or unknown class, an unknown or missing field, or a field value
        the class rejects; the message names the offending key (e.g. ``stages[1].nsigma``).

    Examples
    --------
    >>> from skymap.stats.estimators import SigmaClip
    >>> from_dict({"type": "skymap.stats:SigmaClip", "sigma": 2.5}) == SigmaClip(sigma=2.5)
    True
    """
    if not isinstance(d, Mapping) or TYPE_KEY not in d:
        raise ValueError(
            f"from_dict needs a dict with a {TYPE_KEY!r} key naming the class as "
            f"'module:QualName', got {_short(d)}"
        )
    return _decode(d, "", tuple(modules), None)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 80 else text[:77] + "..."


def _resolve(name: Any, path: str, modules: tuple[str, ...]) -> type:
    where = _join(path, TYPE_KEY)
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(f"{where} must be a string 'module:QualName', got {_short(name)}")
    module_name, qualname = name.split(":")
    top = module_name.split(".")[0]
    if top not in modules:
        allowed = ", ".join(repr(m) for m in modules)
        raise ValueError(
            f"{where}: refusing to import {name!r}: only classes from {allowed} may be "
            "loaded (pass modules=... to trust another package)"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: no such class {name!r} ({exc})") from None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"{where}: {name!r} is not a dataclass configuration")
    return obj


_NOT_A_FIELD = object()  # hint for values that are not (inside) a dataclass field


def _decode(value: Any, path: str, modules: tuple[str, ...], hint: Any) -> Any:
    """Decode ``value``; ``hint`` is the annotation of the dataclass field (or element)
    it fills, None when unknown, or ``_NOT_A_FIELD`` inside plain dicts and lists."""
    if isinstance(value, Mapping):
        if TYPE_KEY in value:
            return _decode_dataclass(value, path, modules)
        if set(value) == {_NONE_KEY} and value[_NONE_KEY] is True:
            return None
        inner = value[_DICT_KEY] if _DICT_KEY in value and len(value) == 1 else value
        return {k: _decode(v, _join(path, k), modules, _NOT_A_FIELD) for k, v in inner.items()}
    if isinstance(value, list):
        if hint is _NOT_A_FIELD:
            return [_decode(v, _join(path, i), modules, _NOT_A_FIELD) for i, v in enumerate(value)]
        items = [
            _decode(v, _join(path, i), modules, _element_hint(hint, i))
            for i, v in enumerate(value)
        ]
        return items if _wants(hint, list) and not _wants(hint, tuple) else tuple(items)
    if isinstance(value, str) and _wants(hint, Path) and not _wants(hint, str):
        return Path(value)
    return value


def _element_hint(hint: Any, i: int) -> Any:
    """Annotation of element ``i`` of a ``tuple[...]`` / ``list[...]`` field, else None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list and args:
        return args[0]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[i] if i < len(args) else None
    return None


def _decode_dataclass(d: Mapping, path: str, modules: tuple[str, ...]) -> Any:
    cls = _resolve(d[TYPE_KEY], path, modules)
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    kwargs = {}
    for key, raw in d.items():
        if key == TYPE_KEY:
            continue
        if key not in init_fields:
            allowed = ", ".join(init_fields) or "(none)"
            raise ValueError(
                f"{_join(path, key)}: unknown field {key!r} for {cls.__qualname__}; "
                f"its fields are {allowed}"
            )
        hint = hints.get(key)
        if raw == NONE_TEXT and _accepts(None, hint) is not False and not _wants(hint, str):
            kwargs[key] = None
            continue
        kwargs[key] = _decode(raw, _join(path, key), modules, hints.get(key))
        check_type(kwargs[key], hints.get(key), _join(path, key))
    missing = [
        name
        for name, f in init_fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(
            f"{path or cls.__qualname__}: missing required field(s) "
            f"{', '.join(repr(m) for m in missing)} for {cls.__qualname__}"
        )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        where = path or cls.__qualname__
        raise type(exc)(f"{where}: {exc}") from exc


_SCALARS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def _accepts(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``: True, False, or None when the
    annotation says nothing checkable (a protocol, a class, Any)."""
    if hint is None or hint is Any:
        return None
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [_accepts(value, h) for h in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        )
    if hint is str:
        return isinstance(value, str)
    return None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None (leave the key out)"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (tuple, list) or hint in (tuple, list):
        return "a list"
    return _SCALARS.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(value: Any, hint: Any, key: str) -> None:
    """Raise ValueError naming ``key`` and the expected type when ``value`` does not fit
    the annotation ``hint`` (``max_iter = true`` or ``sigma = "3"`` are refused, not
    coerced). Annotations that say nothing checkable pass.

    Examples
    --------
    >>> check_type("3", float, "sigma")
    Traceback (most recent call last):
    ...
    ValueError: sigma: expected a number, got the string '3'
    """
    if _accepts(value, hint) is False:
        got = "the string" if isinstance(value, str) else f"the {type(value).__name__}"
        raise ValueError(f"{key}: expected {_describe(hint)}, got {got} {_short(value)}")


def _type_hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations only lose the list/Path coercion
        return {}


def _wants(hint: Any, kind: type) -> bool:
    """Whether the annotation ``hint`` mentions ``kind`` (list, tuple, Path, str)."""
    if hint is None:
        return False
    if hint is kind:
        return True
    origin = typing.get_origin(hint)
    if origin is kind:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_wants(h, kind) for h in typing.get_args(hint))
    return False


# ----------------------------------------------------------------------------- TOML


def dumps_toml(obj: Any, *, comments: bool = True) -> str:
    """Return the TOML text of the configuration ``obj``.

    With ``comments`` (the default) every key has a comment above it: what it does (from
    the class's documentation), its unit where the documentation gives one, and its
    default. A field that is None is left out when None is its default, and written as
    ``"none"`` otherwise (read back as None).

    Examples
    --------
    >>> from skymap.stats.estimators import SigmaClip
    >>> text = dumps_toml(SigmaClip(sigma=2.5, maxiters=None))
    >>> 'maxiters = "none"' in text, "Default: 3.0." in text
    (True, True)
    >>> loads_toml(text) == SigmaClip(sigma=2.5, maxiters=None)
    True
    """
    if not _is_instance(obj):
        raise TypeError(
            f"dumps_toml needs a dataclass instance (a skymap configuration), got "
            f"{type(obj).__name__}"
        )
    data = _encode(obj, "", toml=True)
    if not comments:
        return tomli_w.dumps(data)
    lines: list[str] = [
        "# skymap configuration: edit the values and pass the file to",
        "# `skymap run IN.fits --config FILE`. Every table names the class it configures",
        '# in its "type" key; a key left out takes its default.',
        "",
    ]
    _emit(obj, data, "", lines)
    return "\n".join(lines).rstrip() + "\n"


def _table_path(path: str) -> str:
    return ".".join(_key_text(part) for part in path.split("."))


def _is_table(v: Any) -> bool:
    return isinstance(v, Mapping) and TYPE_KEY in v


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_table(x) for x in v)


def _emit(obj: Any, data: Mapping, path: str, lines: list[str]) -> None:
    docs = field_docs(type(obj))
    defaults = {
        f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING
    }
    for key, value in data.items():
        if _is_table(value) or _is_table_list(value):
            continue
        if key == TYPE_KEY:
            lines.append(f"# the class this table configures: {type(obj).__qualname__}")
        else:
            lines.extend(_comment(docs.get(key), defaults.get(key, dataclasses.MISSING)))
        lines.append(f"{_key_text(key)} = {_value_text(value)}")
    for key, value in data.items():
        sub_path = _join(path, key)
        if _is_table(value):
            lines.append("")
            lines.extend(_comment(docs.get(key), dataclasses.MISSING))
            lines.append(f"[{_table_path(sub_path)}]")
            _emit(getattr(obj, key), value, sub_path, lines)
        elif _is_table_list(value):
            for i, (item, sub) in enumerate(zip(getattr(obj, key), value, strict=True)):
                lines.append("")
                lines.extend(_comment(docs.get(key), dataclasses.MISSING, f" ({i + 1})"))
                lines.append(f"[[{_table_path(sub_path)}]]")
                _emit(item, sub, sub_path, lines)


_UNIT = re.compile(
    r"\bin (pixels|px|arcsec|degrees|seconds|bytes)\b|\bin (units of [\w -]+?)(?=[,.;)]|$)"
)


def _key_text(key: str) -> str:
    return tomli_w.dumps({key: 0}).rpartition(" = ")[0]


def _value_text(value: Any) -> str:
    """A TOML value on one line (lists and tables inline)."""
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key_text(k)} = {_value_text(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return tomli_w.dumps({"x": value}).removeprefix("x = ").strip()


def _comment(doc: str | None, default: Any, suffix: str = "") -> list[str]:
    """Comment lines for one key: its documentation, unit and default."""
    text = (doc or "(undocumented)") + suffix
    unit = _UNIT.search(doc or "")
    if unit and unit.group(0) not in text:
        text += f" Unit: {unit.group(1) or unit.group(2)}."
    if default is not dataclasses.MISSING:
        shown = "none" if default is None else _value_text(_encode(default, "", toml=True))
        text += f" Default: {shown}."
    return ["# " + line for line in textwrap.wrap(text, 86)]


def field_docs(cls: type) -> dict[str, str]:
    """The first sentences of each field's entry in the class's numpydoc ``Parameters``
    (or ``Attributes``) section, by field name."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    section = None
    current: list[str] = []
    names: list[str] = []

    def flush():
        if names and current:
            text = " ".join(" ".join(current).split())
            sentences = re.split(r"(?<=\.)\s", text)
            short = sentences[0]
            for extra in sentences[1:]:
                if len(short) + len(extra) > 220:
                    break
                short += " " + extra
            for n in names:
                out.setdefault(n, short)

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt.strip() and set(nxt.strip()) == {"-"} and line.strip():
            flush()
            names, current = [], []
            section = line.strip()
            continue
        if section not in ("Parameters", "Attributes") or set(line.strip()) == {"-"}:
            continue
        if line and not line[0].isspace():
            flush()
            current = []
            head, _, kind = line.partition(" : ")
            names = [n.strip() for n in head.split(",") if n.strip().isidentifier()]
            if kind.strip():
                current = []
        elif line.strip():
            current.append(line.strip())
    flush()
    return out


def loads_toml(text: str, *, modules: Iterable[str] = DEFAULT_MODULES) -> Any:
    """Rebuild a configuration from TOML text written by `dumps_toml` (or by hand)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML: {exc}") from exc
    return from_dict(data, modules=modules)


def save_toml(obj: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as TOML to ``path`` atomically and return the path.

    The text goes to a temporary file in the same directory, which then replaces
    ``path`` in one step, so a reader never sees a half-written file. An existing file
    is kept unless ``overwrite=True``.
    """
    path = Path(path)
    text = dumps_toml(obj).encode("utf-8")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600; a configuration is written like every other output
        os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read_umask() -> int:
    # read once at import (os.umask can only be read by setting it)
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _link_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, atomically where the
    file system allows hard links (so a file created meanwhile is never clobbered)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it"
        ) from None
    except OSError:
        # no hard links here (some network or FAT file systems): best effort
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it"
            ) from None
        os.replace(tmp, path)


def load_toml(path: str | os.PathLike, *, modules: Iterable[str] = DEFAULT_MODULES) -> Any:
    """Read a configuration written by `save_toml`."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    return from_dict(data, modules=modules)
