"""Public names of a package imported from their modules on first access (PEP 562 module `__getattr__`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, attribute_modules: Mapping[str, str]) -> tuple[Callable[[str], object], Callable]:
    """The `__getattr__` and `__dir__` of `package` for names that live in `attribute_modules[name]`.

    A name's module is imported when the name is first read, and the value is then cached in the package, so importing
    the package costs nothing and a missing optional extra is reported by the module that needs it.
    """
    names = sorted(attribute_modules)

    def __getattr__(name: str) -> object:
        module_name = attribute_modules.get(name)
        if module_name is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(module_name), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
