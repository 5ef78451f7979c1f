"""tokenmill installed from its wheel (not editable) into a fresh virtual environment works inside a user's
project that has its own `models/` and `pipeline/` packages (issue 27 point 6): from that project's folder
a script imports the user's `models.errors` first, then reads a token store with `TokenDataset`, a latent
store with `LatentDataset` and decodes a row through the store's tokenizer (`StoreDecoder`, the model its
lineage names), each equal to what this checkout reads; `tokenmill --help` runs from the fresh environment.

Nothing is downloaded: this interpreter builds the wheel without build isolation (from a copy of the
sources, so the checkout gets no build/ or egg-info) and installs it with `pip --python` and --no-deps.
The dependencies are made visible by a .pth file that lists this interpreter's site-packages folders: a
folder named in a .pth joins sys.path, but the .pth files inside it (an editable install's finder, which
would map `tokenmill` onto a checkout) do not run. The test checks that the tokenmill imported is the
installed one, by its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import REPO
from helpers.engine import prior_store
from helpers.tokens import build_latent_store

SOURCES = ("setup.py", "pyproject.toml", "README.md", "models", "pipeline", "jobs", "benchmarks", "configs")
TIMEOUT_S = 180
# This interpreter's pip, offline: no index, no version check; --no-build-isolation builds with this
# interpreter's setuptools (the test extra's setuptools>=70.1 builds wheels without the `wheel` package).
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

# The user's script, run from their project's folder: their own packages are imported first, as they
# would be anywhere in their code, so a tokenmill module that imported `models.…` would get theirs.
USER_SCRIPT = """
import json, sys

import models.errors as mine
import pipeline as their_pipeline

import numpy as np
import tokenmill
import tokenmill.models.errors as ours
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.detokenize import StoreDecoder
from tokenmill.pipeline.tokens.latent_dataset import LatentDataset

codes_store, latent_store, decoded_npy = sys.argv[1:]
tokens = TokenDataset(codes_store, split=None)[0]["tokens"]
latent = LatentDataset(latent_store, split="val")[0]["latents_4x4"]
np.save(decoded_npy, next(StoreDecoder(codes_store).images(0, 1)).numpy())  # (1, C, H, W) in [0, 1]
print(json.dumps({"mine": mine.__file__, "owner": mine.OWNER, "their_pipeline": their_pipeline.__file__,
                  "tokenmill_path": list(tokenmill.__path__), "ours": ours.__file__,
                  "user_error": ours.UserError.__name__, "tokens": tokens.tolist(), "latent": latent.tolist()}))
"""


def _user_project(root: Path) -> Path:
    """A Transformer project's layout: its own `models` (with `errors`) and `pipeline` packages."""
    for package in ("models", "pipeline"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "models" / "errors.py").write_text('OWNER = "user"\n')
    (root / "use_tokenmill.py").write_text(USER_SCRIPT)
    return root


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert proc.returncode == 0, f"{argv[:4]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _install_fresh(root: Path) -> tuple[Path, Path]:
    """A fresh venv holding tokenmill's wheel (+ this interpreter's dependencies, visible through a
    .pth); returns (its bin folder, its site-packages)."""
    source = root / "source"
    source.mkdir(parents=True)
    for name in SOURCES:  # a copy: an in-tree build writes build/ and *.egg-info into the folder
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([*PIP, "wheel", "--no-index", "--no-deps", "--no-build-isolation", source, "-w", root / "wheel"])
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"])
    venv_python = root / "venv" / "bin" / "python"
    [wheel] = (root / "wheel").glob("tokenmill-*.whl")
    _run([*PIP, "--python", venv_python, "install", "--no-index", "--no-deps", wheel])
    site = Path(_run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # After the install: pip must not see this interpreter's (editable) tokenmill as already installed.
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (site / "tokenmill_test_deps.pth").write_text("\n".join(ours) + "\n")
    return venv_python.parent, site


def test_installed_tokenmill_works_inside_a_project_with_its_own_models_and_pipeline(tmp_path, one_thread):
    from tokenmill.pipeline.tokens.dataset import TokenDataset
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.latent_dataset import LatentDataset

    project = _user_project(tmp_path / "project")
    bin_dir, site = _install_fresh(tmp_path / "env")
    codes_store = prior_store(tmp_path / "data")  # 2x2 codes; its lineage names an untrained VQ-VAE beside it
    latent_store = str(tmp_path / "latents.zarr")
    build_latent_store(latent_store)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models on a shared machine: one torch thread is faster

    proc = _run([bin_dir / "python", "use_tokenmill.py", codes_store, latent_store, tmp_path / "decoded.npy"],
                cwd=project, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The installed tokenmill, not this checkout's (editable) one; the user's packages stay theirs.
    assert result["tokenmill_path"] == [str(site / "tokenmill")]
    assert result["ours"] == str(site / "tokenmill" / "models" / "errors.py") and result["user_error"] == "UserError"
    assert result["mine"] == str(project / "models" / "errors.py") and result["owner"] == "user"
    assert result["their_pipeline"] == str(project / "pipeline" / "__init__.py")
    # ...and it reads and decodes what this checkout reads and decodes.
    assert result["tokens"] == TokenDataset(codes_store, split=None)[0]["tokens"].tolist()
    assert result["latent"] == LatentDataset(latent_store, split="val")[0]["latents_4x4"].tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"),
                                  next(StoreDecoder(codes_store).images(0, 1)).numpy())

    help_text = _run([bin_dir / "tokenmill", "--help"], cwd=project, env=env).stdout
    assert "inspect" in help_text and "train-prior" in help_text
