"""SnapKV (arXiv 2404.14469): observation-window scores, every layer keeps ``B``."""

from .base import Method


class SnapKVMethod(Method):
    name = "snapkv"
