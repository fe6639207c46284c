"""Run from a source checkout: map ``refreekv.reference`` and ``refreekv.adapters`` to the
top-level ``reference/`` and ``adapters/`` folders, exactly as an install does (pyproject.toml's
package-dir). A finder for those two names only, added once; an installed package never needs it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


class CheckoutFinder:
    def __init__(self, package: str, root: Path):
        self.folders = {f"{package}.{name}": root / name for name in ("reference", "adapters")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install_finder(package: str, root: Path) -> None:
    if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(package, root))  # before an install's finders: this checkout wins
