"""Compression methods, one small file each, and how a profile names them.

A method word is a base method plus optional wrappers joined by ``+``: ``dynamickv``, ``snapkv+mix``,
``dynamickv+adakv``. ``adakv`` alone is ``snapkv+adakv``. Each part owns its settings dataclass; a
profile's ``retention:`` mapping gives values by name (see :func:`parse_method`).

Adding a method: one file defining a :class:`~dynkv_cli.methods.base.Method` subclass (and its
``Settings`` dataclass), plus one line in :data:`METHODS` below (``docs/methods.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from ..errors import UsageError
from .adakv import HeadAdaptive
from .base import Method, NoSettings, Wrapper
from .dynamickv import DynamicKVMethod
from .full import FullMethod
from .h2o import H2OMethod
from .knorm import KNormMethod
from .mixkv import Mix
from .pyramidkv import PyramidKVMethod
from .snapkv import SnapKVMethod
from .streamingllm import StreamingLLMMethod

#: base methods by name
METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        FullMethod,
        DynamicKVMethod,
        SnapKVMethod,
        PyramidKVMethod,
        StreamingLLMMethod,
        H2OMethod,
        KNormMethod,
    )
}
#: wrappers by name (``base+wrapper``)
WRAPPERS: dict[str, type[Wrapper]] = {w.name: w for w in (Mix, HeadAdaptive)}
#: a word that stands for a longer one
ALIASES = {"adakv": "snapkv+adakv"}


def _settings_names(cls) -> list[str]:
    return [] if cls.Settings is NoSettings else [f.name for f in fields(cls.Settings)]


def setting_types() -> dict[str, str]:
    """Every setting some method or wrapper has, with its type annotation (a name outside it is a typo)."""
    out: dict[str, str] = {}
    for cls in (*METHODS.values(), *WRAPPERS.values()):
        if cls.Settings is not NoSettings:
            for f in fields(cls.Settings):
                out.setdefault(f.name, f.type if isinstance(f.type, str) else f.type.__name__)
    return out


def setting_names() -> set[str]:
    """Every setting name some method or wrapper has."""
    return set(setting_types())


@dataclass
class MethodSpec:
    """A method as a profile names it: the base, its wrappers in order, and each part's settings."""

    base: str
    wrappers: tuple[str, ...] = ()
    settings: list = field(default_factory=list)  # one settings object per part: base first

    @property
    def name(self) -> str:
        return "+".join((self.base, *self.wrappers))

    @property
    def parts(self) -> list[type[Method]]:
        return [METHODS[self.base], *(WRAPPERS[w] for w in self.wrappers)]

    @property
    def keeps_all(self) -> bool:
        return METHODS[self.base].keeps_all

    def create(self, budget: int, num_layers: int, num_kv_heads: int) -> Method:
        """The method object for one document (``budget``: ``B`` tokens per layer per KV head)."""
        method = METHODS[self.base](self.settings[0], budget, num_layers, num_kv_heads)
        for w, s in zip(self.wrappers, self.settings[1:]):
            method = WRAPPERS[w](method, s)
        return method

    def retention(self) -> dict:
        """Every part's settings in one flat mapping (what a profile's ``retention:`` holds)."""
        out: dict = {}
        for s in self.settings:
            out.update(asdict(s))
        return out

    def observation(self) -> str:
        return self.create(1, 1, 1).observation

    def __str__(self) -> str:
        return self.name


def parse_method(word: str, retention: Mapping | None = None) -> MethodSpec:
    """Read a method word and its settings.

    ``retention`` gives settings by name. A name that belongs to none of this method's parts but to
    another method is ignored (a profile written for ``dynamickv`` still runs ``--method snapkv``); a
    name no method has is an error naming the valid ones.
    """
    text = str(word).strip().lower()
    head, _, rest = text.partition("+")
    text = ALIASES.get(head, head) + ("+" + rest if rest else "")
    base, *wrappers = [p.strip() for p in text.split("+")]
    if base not in METHODS:
        hint = f"; wrappers ({', '.join(WRAPPERS)}) follow a method, e.g. snapkv+{base}" if base in WRAPPERS else ""
        raise UsageError(f"unknown method {word!r}; choose one of {', '.join(sorted([*METHODS, *ALIASES]))}{hint}")
    for w in wrappers:
        if w not in WRAPPERS:
            raise UsageError(f"unknown method part {w!r} in {word!r}; a method may add {', '.join(WRAPPERS)}")
    if len(set(wrappers)) != len(wrappers):
        raise UsageError(f"method {word!r} names a part twice")
    given = dict(retention or {})
    known = setting_names()
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise UsageError(f"unknown retention key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    parts = [METHODS[base], *(WRAPPERS[w] for w in wrappers)]
    settings = []
    for cls in parts:
        names = _settings_names(cls)
        s = cls.Settings(**{k: given[k] for k in names if k in given})
        try:
            settings.append(s.validate())
        except UsageError as e:
            raise UsageError(f"{cls.name}: {e}") from None
    spec = MethodSpec(base, tuple(wrappers), settings)
    for w in wrappers:
        if WRAPPERS[w].needs_attention and METHODS[base](settings[0]).observation == "none":
            raise UsageError(f"{w} needs a method that scores with attention; {base} does not (try snapkv+{w})")
    return spec


def describe_methods() -> list[dict]:
    """Every method and wrapper with its settings and their defaults (``dynkv methods``)."""
    out = []
    for kind, table in (("method", METHODS), ("wrapper", WRAPPERS)):
        for name, cls in table.items():
            defaults = {} if cls.Settings is NoSettings else asdict(cls.Settings())
            doc = (sys.modules[cls.__module__].__doc__ or "").strip()
            out.append({"name": name, "kind": kind, "settings": defaults, "summary": doc.splitlines()[0].replace("``", "") if doc else ""})
    return out


__all__ = ["ALIASES", "METHODS", "WRAPPERS", "Method", "MethodSpec", "Wrapper", "describe_methods", "parse_method"]
