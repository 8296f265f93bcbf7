"""Task profiles: the YAML files in this package, the user's folder, or a file named with ``--profile``.

A profile says how a task runs: the prompt around the document, the method, budget and chunk size
with the method's own settings (``retention:``), generation settings, and (for questions) whether several questions share one
compressed document. Lookup of a name, first match wins:

    1. a path to a ``.yaml``/``.yml`` file (``--profile my.yaml``)
    2. ``<config dir>/profiles/NAME.yaml`` (the user's; ``DYNKV_CONFIG_DIR``, else
       ``$XDG_CONFIG_HOME/dynkv``, else ``~/.config/dynkv``)
    3. the profiles shipped with dynkv (this package: ``summarize``, ``qa``, ``rag``, ``code``, ``needle``)

A profile may start with ``extends: NAME`` and give only the keys it changes. Unknown or mistyped keys
are an error that names the valid ones.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import ClassVar

import yaml

from dynkv_cli.config import CompressionSettings, GenerationSettings
from dynkv_cli.errors import UsageError
from dynkv_cli.methods import setting_types
from dynkv_cli.prompt import TaskPrompt

TASKS = ("summarize", "qa", "rag")
QUESTION_MODES = ("shared", "separate")
SECTION_MODES = ("off", "auto", "on")


@dataclass
class Profile:
    """One task profile. ``instruction`` is the question a summary answers (the task's own question).

    In YAML the compression settings are top-level keys (``method``, ``budget``, ``chunk_size``,
    ``retention``); here they are one :class:`CompressionSettings`, validated when it is built.
    """

    name: str
    description: str = ""
    task: str = "qa"
    instruction: str | None = None
    questions: str = "shared"
    probe: str | None = None
    passage_header: str = "\n\n[{index}] Source: {source}\n"
    #: summaries of long documents: off (one pass), auto (divide-conquer-combine when the document is
    #: longer than the model's positions or SECTIONS_FACTOR sections), on (always divide)
    sections: str = "off"
    section_tokens: int | None = None  # tokens per section; None: min(4096, the model's positions / 4)
    combine_instruction: str | None = None  # the final pass's question over the section summaries
    #: selective reload (dynkv_cli/reload.py): a budget word (8%, 256) of low-level entries brought back
    #: per question; None: off. reload_level: the share of each block the low level keeps (1.0: all)
    reload: str | None = None
    reload_level: float = 0.25
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    prompt: TaskPrompt = field(default_factory=TaskPrompt)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    path: str | None = None  # where it was read from (not a YAML key)

    #: the YAML keys that make up ``compression``
    COMPRESSION_KEYS: ClassVar[tuple[str, ...]] = ("method", "budget", "chunk_size", "retention")

    @property
    def method(self) -> str:
        return self.compression.method

    @property
    def budget(self):
        """The :class:`~dynkv_cli.budget.Budget` (``str()`` gives its word)."""
        return self.compression.budget

    @property
    def chunk_size(self) -> int | None:
        return self.compression.chunk_size

    def with_overrides(
        self,
        *,
        method: str | None = None,
        budget: str | None = None,
        chunk_size: int | None = None,
        max_new_tokens: int | None = None,
        questions: str | None = None,
        sections: str | None = None,
        reload: str | None = None,
    ) -> Profile:
        """A copy with the flags that were given (None: keep the profile's value).

        A flag's own bad value is reported as the flag's error, not the profile's.
        """
        c = self.compression
        compression = CompressionSettings(
            method=method or c.method,
            budget=budget if budget is not None else c.budget,
            chunk_size=chunk_size if chunk_size is not None else c.chunk_size,
            retention=dict(c.retention),
        )
        if max_new_tokens is not None:
            GenerationSettings(max_new_tokens=max_new_tokens).validate()
        gen = replace(self.generation, stop=list(self.generation.stop))
        if max_new_tokens is not None:
            gen.max_new_tokens = max_new_tokens
        out = replace(self, compression=compression, generation=gen, prompt=replace(self.prompt))
        if questions is not None:
            out.questions = questions
        if sections is not None:
            if sections not in SECTION_MODES:
                raise UsageError(f"--sections {sections!r} is not one of {', '.join(SECTION_MODES)}")
            out.sections = sections
        if reload is not None:
            out.reload = None if reload in ("off", "none", "0") else reload
        return out.validate()

    def validate(self) -> Profile:
        where = f"profile {self.name!r}"
        if self.task not in TASKS:
            raise UsageError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.questions not in QUESTION_MODES:
            raise UsageError(f"{where}: questions {self.questions!r} is not one of {', '.join(QUESTION_MODES)}")
        if self.sections not in SECTION_MODES:
            raise UsageError(f"{where}: sections {self.sections!r} is not one of {', '.join(SECTION_MODES)}")
        if self.reload is not None:
            from dynkv_cli.budget import parse_budget

            b = parse_budget(self.reload)
            if b.kind not in ("percent", "tokens", "full"):
                raise UsageError(f"{where}: reload {self.reload!r} must be a share of the document (8%) or tokens (256)")
        if not 0.0 < self.reload_level <= 1.0:
            raise UsageError(f"{where}: reload_level must be in (0, 1] (got {self.reload_level})")
        if self.section_tokens is not None and self.section_tokens < 64:
            raise UsageError(f"{where}: section_tokens must be at least 64 (got {self.section_tokens})")
        if "{question}" not in self.prompt.after_document:
            raise UsageError(f"{where}: prompt.after_document must contain {{question}}")
        try:
            self.passage_header.format(index=1, source="x")
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"{where}: passage_header may only use {{index}} and {{source}} (problem: {e})") from None
        try:
            self.generation.validate()
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        return self

    def to_dict(self) -> dict:
        """The YAML mapping: compression settings as top-level keys, the retention as the method's own."""
        d = {}
        for f in fields(self):
            if f.name == "path":
                continue
            if f.name == "compression":
                d.update(self.compression.to_dict())
            else:
                v = getattr(self, f.name)
                d[f.name] = asdict(v) if hasattr(v, "__dataclass_fields__") else v
        return d

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks or edge spaces are written double-quoted ("\\n"), the rest plain."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = '"' if ("\n" in value or value != value.strip()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


# ---- where profiles live ------------------------------------------------------------------------


def config_dir() -> Path:
    """The user's dynkv folder: ``DYNKV_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/dynkv``, else ``~/.config/dynkv``."""
    if os.environ.get("DYNKV_CONFIG_DIR"):
        return Path(os.environ["DYNKV_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "dynkv"


def user_profile_dir() -> Path:
    return config_dir() / "profiles"


def _packaged() -> dict[str, str]:
    """Packaged profile name -> YAML text."""
    out = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    return out


def _user() -> dict[str, Path]:
    folder = user_profile_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in (".yaml", ".yml") and p.is_file()}


@dataclass
class ProfileInfo:
    name: str
    origin: str  # "builtin" | "user"
    path: str
    description: str
    task: str


def list_profiles() -> list[ProfileInfo]:
    """Every profile by name (a user profile hides a packaged one of the same name)."""
    found: dict[str, ProfileInfo] = {}
    for name in sorted(_packaged()):
        p = load_profile(name)
        found[name] = ProfileInfo(name, "builtin", f"dynkv_cli/profiles/{name}.yaml", p.description, p.task)
    for name, path in _user().items():
        try:
            p = load_profile(str(path))
            found[name] = ProfileInfo(name, "user", str(path), p.description, p.task)
        except UsageError as e:
            found[name] = ProfileInfo(name, "user", str(path), f"(broken: {e})", "?")
    return [found[k] for k in sorted(found)]


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name or name.startswith(".")


def _read_raw(name: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """The raw mapping of a profile (``extends`` resolved) and where it came from."""
    if name in seen:
        raise UsageError(f"profile {name!r} extends itself (through {' -> '.join(seen)})")
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"profile file {name} does not exist")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    elif name in _user():
        path = _user()[name]
        text, origin = path.read_text(encoding="utf-8"), str(path)
    elif name in _packaged():
        text, origin = _packaged()[name], f"builtin:{name}"
    else:
        names = sorted(set(_packaged()) | set(_user()))
        raise UsageError(f"unknown profile {name!r}; available: {', '.join(names)} (or give a path to a .yaml file)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = str(e).splitlines()
        raise UsageError(f"profile {origin} is not valid YAML: {' '.join(w.strip() for w in where)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"profile {origin} must be a mapping of keys to values (got {type(data).__name__})")
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise UsageError(f"profile {origin}: extends must be a profile name")
        parent, _ = _read_raw(base, (*seen, name))
        data = _merge(parent, data)
    return data, origin


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- typed construction ------------------------------------------------------------------------

_NESTED = {"prompt": TaskPrompt, "generation": GenerationSettings}


def _check_type(value, annotation, key: str, origin: str):
    """Check a YAML value against a dataclass field annotation (strings under postponed evaluation)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    if value is None:
        if "None" in parts:
            return None
        raise UsageError(f"profile {origin}: {key} must be given a value (it is empty)")
    for part in parts:
        if part == "bool" and isinstance(value, bool):
            return value
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if part == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. budget: 128
        if part == "list[str]" and isinstance(value, list) and all(isinstance(x, str) for x in value):
            return list(value)
        if part == "dict" and isinstance(value, dict):
            return dict(value)  # checked by the settings' own validate()
    words = {
        "int": "an integer",
        "float": "a number",
        "str": "text",
        "bool": "true or false",
        "list[str]": "a list of text",
        "dict": "a mapping",
    }
    want = " or ".join(words.get(p, p) for p in parts if p != "None")
    raise UsageError(f"profile {origin}: {key} must be {want} (got {value!r})")


def _typed(cls, data: dict, what: str, origin: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise UsageError(f"profile {origin}: {prefix.rstrip('.')} must be a mapping (got {data!r})")
    names = {f.name: f.type for f in fields(cls) if f.name not in ("path", "compression")}
    if cls is Profile:
        names.update(method="str", budget="str", chunk_size="int | None", retention="dict")
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        valid = sorted(names) + (["extends"] if cls is Profile else [])
        raise UsageError(
            f"profile {origin}: unknown {what} key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys: {', '.join(prefix + k for k in sorted(valid))}"
        )
    kwargs = {}
    for k, v in data.items():
        if k in _NESTED and cls is Profile:
            kwargs[k] = _typed(_NESTED[k], v, k, origin, prefix=f"{k}.")
        elif k == "retention" and cls is Profile:
            kwargs[k] = _retention(v, origin)
        else:
            kwargs[k] = _check_type(v, names[k], prefix + k, origin)
    if cls is not Profile:
        return cls(**kwargs)
    given = {k: kwargs.pop(k) for k in Profile.COMPRESSION_KEYS if k in kwargs}
    try:
        kwargs["compression"] = CompressionSettings(**given)
    except UsageError as e:
        raise UsageError(f"profile {kwargs.get('name', origin)!r}: {e}") from None
    return cls(**kwargs)


def _retention(data, origin: str) -> dict:
    """A profile's ``retention:`` mapping, every key known to some method and of that setting's type."""
    if not isinstance(data, dict):
        raise UsageError(f"profile {origin}: retention must be a mapping (got {data!r})")
    types = setting_types()
    unknown = sorted(str(k) for k in data if k not in types)
    if unknown:
        raise UsageError(
            f"profile {origin}: unknown retention key(s) {', '.join('retention.' + k for k in unknown)}; "
            f"valid keys: {', '.join('retention.' + k for k in sorted(types))}"
        )
    return {k: _check_type(v, types[k], f"retention.{k}", origin) for k, v in data.items()}


def profile_from_dict(data: dict, name: str, origin: str = "") -> Profile:
    """Build and validate a profile from a mapping (as read from YAML)."""
    data = dict(data)
    data.setdefault("name", name)
    p = _typed(Profile, data, "profile", origin or name)
    p.path = origin or None
    return p.validate()


def load_profile(name: str) -> Profile:
    """A profile by name or path. Raises :class:`UsageError` naming the valid keys or profiles."""
    data, origin = _read_raw(str(name))
    stem = Path(name).stem if _looks_like_path(str(name)) else str(name)
    return profile_from_dict(data, stem, origin)
