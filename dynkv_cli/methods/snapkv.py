"""SnapKV (arXiv 2404.14469): observation-window scores, every layer keeps ``B``."""

from .base import Method, ObservedSettings


class SnapKVMethod(Method):
    name = "snapkv"
    Settings = ObservedSettings
