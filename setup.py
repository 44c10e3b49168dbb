"""Packages for setuptools; everything else about the project is in pyproject.toml.

The recipes and configs stay at the top of the repository, where users read them, and ship
inside the wheel as ``lightning_noise/_packaged/recipes`` and ``lightning_noise/_packaged/
configs`` (``package_dir`` maps each folder in as a package of data files), so that an
installed ``lightning-noise`` finds them from any directory (``lightning_noise.recipes``).
An editable install (``pip install -e .``) reads them from the repository itself.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
#: Package name -> the top-level folder it is made of.
SHIPPED = {
    "lightning_noise._packaged.recipes": "recipes",
    "lightning_noise._packaged.configs": "configs",
}


def _shipped_packages() -> list[str]:
    """Every folder of the shipped trees as a package (configs/sweeps -> ...configs.sweeps)."""
    names = []
    for package, top in SHIPPED.items():
        folders = [HERE / top, *sorted(p for p in (HERE / top).rglob("*") if p.is_dir())]
        for folder in folders:
            if folder.name == "__pycache__":
                continue
            names.append(".".join([package, *folder.relative_to(HERE / top).parts]))
    return names


shipped = _shipped_packages()
setup(
    packages=[*find_packages(include=["lightning_noise", "lightning_noise.*"]), *shipped],
    package_dir=SHIPPED,
    package_data={name: ["*.yaml", "*.yml", "*.json"] for name in shipped},
)
