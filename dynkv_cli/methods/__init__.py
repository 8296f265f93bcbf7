"""Compression methods, one small file each, behind :class:`~dynkv_cli.methods.base.Method`."""

from __future__ import annotations

from .adakv import AdaKVMethod
from .base import Method
from .dynamickv import DynamicKVMethod
from .full import FullMethod
from .h2o import H2OMethod
from .pyramidkv import PyramidKVMethod
from .snapkv import SnapKVMethod
from .streamingllm import StreamingLLMMethod

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        FullMethod,
        DynamicKVMethod,
        SnapKVMethod,
        PyramidKVMethod,
        StreamingLLMMethod,
        H2OMethod,
        AdaKVMethod,
    )
}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method (a new file defines a subclass and registers it)."""
    METHODS[cls.name] = cls
    return cls


__all__ = ["METHODS", "Method", "register_method"]
