"""Every method word the generic tests run: each registered method, and each wrapper on every method
that scores with attention. Built from the registry, so a method added there is tested here too."""

from dynkv_cli.methods import ALIASES, METHODS, WRAPPERS, parse_method


def method_matrix(full: bool = True) -> list[str]:
    out = []
    for base in METHODS:
        if base == "full" and not full:
            continue
        out.append(base)
        if parse_method(base).observation() != "none":
            out += [f"{base}+{w}" for w in WRAPPERS]
    return [*out, *ALIASES, "dynamickv+adakv+mix"]
