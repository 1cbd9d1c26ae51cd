"""The package data a wheel must carry: every C source folder of the package is listed in pyproject.toml's
package-data, so that an installed (non-editable) wheel can build its kernels instead of silently falling back to
the PyTorch references."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_csrc_folder_ships_in_the_wheel():
    # the section's lines `"package" = ["pattern", ...]` (tomllib is Python 3.11+, the package supports 3.10)
    text = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    data = {m[1]: re.findall(r'"([^"]+)"', m[2]) for m in re.finditer(r'^"([^"]+)"\s*=\s*\[(.*)\]', text, re.M)}
    src = ROOT / "src"
    for csrc in sorted(src.rglob("csrc")):
        package = ".".join(csrc.parent.relative_to(src).parts)
        patterns = data.get(package, [])
        for f in csrc.iterdir():
            if f.suffix in (".c", ".h"):
                assert any(f.match(p) or Path("csrc", f.name).match(p) for p in patterns), (
                    f"{f.relative_to(ROOT)} is not in pyproject.toml [tool.setuptools.package-data] {package!r}"
                )
