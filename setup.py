"""Maps the repository's top-level folders onto one installed namespace: `models/` is `tokenmill.models`,
`pipeline/` is `tokenmill.pipeline`, and so on, and ships the presets in `configs/` as `tokenmill/configs`
(code finds them beside its own folders, in a clone and in an install alike). The rest is in pyproject.toml."""
from setuptools import find_packages, setup

FOLDERS = ["models", "pipeline", "jobs", "benchmarks"]

packages = [f"tokenmill.{folder}" for folder in FOLDERS + ["configs"]]
packages += [f"tokenmill.{folder}.{sub}" for folder in FOLDERS for sub in find_packages(folder)]
setup(
    packages=packages,
    package_dir={f"tokenmill.{folder}": folder for folder in FOLDERS + ["configs"]},
    package_data={"tokenmill.configs": ["*.yaml"]},
)
