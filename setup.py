"""Packages and data files by discovery: `zayaserve` is this folder (pyproject's package-dir),
so every package folder below it ships as `zayaserve.<folder>`, with every data file in it.

setuptools' own `packages.find` cannot add the `zayaserve.` prefix to folders found under a
mapped root, so the list is computed here instead of kept by hand (a hand-kept list once
dropped a package from the wheel)."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Folders of the repository that are not part of the package.
NOT_SHIPPED = ["tests", "tests.*", "deploy", "deploy.*", "helm", "helm.*", "docs", "docs.*",
               "build", "build.*", "dist", "dist.*"]
# Files in package folders that are neither code nor data the package reads.
NOT_DATA = {".py", ".pyc", ".pyo", ".md"}


def _packages() -> list[str]:
    return ["zayaserve", *(f"zayaserve.{p}" for p in find_packages(str(ROOT),
                                                                   exclude=NOT_SHIPPED))]


def _data_files(package: str) -> list[str]:
    """Every file of one package folder (not its subpackages) that is data: protos, type
    stubs, scripts the package runs."""
    folder = ROOT.joinpath(*package.split(".")[1:])
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix not in NOT_DATA and not p.name.startswith("."))


packages = _packages()
package_data = {p: files for p in packages if (files := _data_files(p))}
# The root folder's files other than its modules are the repository's, not the package's.
package_data.pop("zayaserve", None)



class BuildPy(build_py):
    """Leaves this file out: it sits in the root folder, which is the `zayaserve` package."""

    def find_package_modules(self, package, package_dir):  # type: ignore[no-untyped-def]
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("zayaserve", "setup")]


# Build backends run this file as __main__; imported as `zayaserve.setup` (a module walk over
# an editable checkout) it must do nothing.
if __name__ == "__main__":
    setup(packages=packages, package_data=package_data, cmdclass={"build_py": BuildPy})
