"""The layout's import rules, checked in fresh interpreters (an import in this process would be cached)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A Transformer training job that reads tokens needs only torch, zarr and numpy.
TOKEN_READERS = ["tokenmill.pipeline.tokens.dataset", "tokenmill.pipeline.tokens.store", "tokenmill.pipeline.tokens.layout", "tokenmill.pipeline.prior.data"]
HEAVY = ["ray", "mlflow", "webdataset"]


@pytest.mark.parametrize("module", TOKEN_READERS)
def test_token_readers_import_neither_ray_nor_mlflow_nor_webdataset(module):
    probe = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} pulled in {out}"


def test_models_import_nothing_of_the_pipeline():
    probe = "import sys, models; print(','.join(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'jobs', 'ray')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_latent_dataset_imports_neither_ray_nor_mlflow_nor_webdataset():
    probe = ("import sys, pipeline.tokens.latent_dataset; "
             "print(','.join(m for m in ('ray', 'mlflow', 'webdataset') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == ""
