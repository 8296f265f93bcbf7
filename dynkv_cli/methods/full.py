"""full: no compression. The reference for every accuracy figure."""

from .base import Method


class FullMethod(Method):
    name = "full"
    compresses = False
    uses_attention = False
