"""A regular (non-editable) install ships every subpackage: pyproject's explicit package list must
name each folder of the library that holds an `__init__.py`, or `pip install .` silently drops it
(an editable install, what `make test` uses, would not notice)."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_setuptools():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    missing = sorted(on_disk - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    data_only = ("tinymoe.corpus", "tinymoe.presets.published")  # folders of data files, listed to ship them
    assert not sorted(p for p in listed if p not in on_disk and not p.startswith(data_only)), listed
