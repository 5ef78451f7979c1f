"""`tokenmill sample`: a tiny prior + tiny tokenizer saved here, its lineage.json written by hand;
the command writes a PNG grid and codes of the right shape/range, and refuses a tokenizer that
does not fit (exit 2) or one whose weights differ from the lineage's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models import save_model
from tokenmill.models.prior import PriorConfig, TransformerPrior
from tokenmill.models.quantizers import QuantizerConfig
from tokenmill.models.serialization import WEIGHTS_FILE
from tokenmill.models.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig
from tokenmill.pipeline.prior.lineage import prior_lineage, read_prior_lineage, write_prior_lineage
from tokenmill.pipeline.prior.sampling import SampleOptions, sample_prior

SMALL = dict(in_channels=1, image_size=16, hidden=8, res_blocks=1, latent_dim=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_pair(tmp_path, tokenizer: torch.nn.Module, grid: list[list[int]], num_classes: int = 3):
    """Tokenizer and prior directories; the prior's lineage names the tokenizer and its sha256."""
    torch.manual_seed(0)
    tok_dir = save_model(tokenizer.eval(), tmp_path / "tokenizer")
    prior = TransformerPrior(PriorConfig(codebook_size=tokenizer.codebook_size, num_classes=num_classes, grid=grid,
                                         dim=16, depth=1, heads=2))
    prior_dir = save_model(prior, tmp_path / "prior")
    sha = hashlib.sha256((tok_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    store_lineage = {"model_uri": str(tok_dir), "weights_sha256": sha}
    write_prior_lineage(prior_dir, prior_lineage("/nowhere/store.zarr", store_lineage, prior.config.vocab(), grid))
    return tok_dir, prior_dir


def test_sample_writes_png_and_codes_and_refuses_a_mismatched_tokenizer(tmp_path, capsys):
    tokenizer = VQVAE(VQVAEConfig(downsample=4, quantizer=QuantizerConfig(codebook_size=32), **SMALL))
    tok_dir, prior_dir = _save_pair(tmp_path, tokenizer, [[4, 4]])
    assert read_prior_lineage(prior_dir)["vocab"]["null_class"] == 32 + 1 + 3
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    code = cli_main(["sample", "--prior", str(prior_dir), "--class", "0", "--class", "2", "--n", "3", "--cfg", "2",
                     "--top-k", "8", "--device", "cpu", "--out", str(out), "--json", str(summary)])
    assert code == 0
    codes, labels = np.load(out / "codes.npy"), np.load(out / "labels.npy")
    assert codes.shape == (6, 16) and codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < 32
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    # One row per class: 2 rows of 3 images of 16 px with 2 px padding.
    assert Image.open(out / "samples.png").size == (3 * 18 + 2, 2 * 18 + 2)
    result = json.loads(summary.read_text())
    assert result["samples"] == 6 and result["tokenizer"] == str(tok_dir) and result["classes"] == [0, 2]

    # A tokenizer with another codebook size (or token grid) does not fit the prior: exit 2, one line.
    other = save_model(VQVAE(VQVAEConfig(downsample=4, quantizer=QuantizerConfig(codebook_size=16), **SMALL)),
                       tmp_path / "other")
    capsys.readouterr()
    assert cli_main(["sample", "--prior", str(prior_dir), "--tokenizer", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this prior" in err and "Traceback" not in err
    # The lineage's tokenizer retrained in place (different weights): refused by sha256, exit 2.
    torch.manual_seed(1)
    save_model(VQVAE(tokenizer.config), tok_dir)
    assert cli_main(["sample", "--prior", str(prior_dir), "--out", str(out)]) == 2
    assert "weights sha256" in capsys.readouterr().err
    # ...and an explicit compatible tokenizer is accepted.
    assert cli_main(["sample", "--prior", str(prior_dir), "--tokenizer", str(tok_dir), "--n", "1",
                     "--out", str(out)]) == 0


def test_sample_two_level_tokenizer_unconditional(tmp_path):
    tokenizer = VQVAE2(VQVAE2Config(quantizer=QuantizerConfig(codebook_size=16), **SMALL))  # top 2x2, bottom 4x4
    _, prior_dir = _save_pair(tmp_path, tokenizer, [[2, 2], [4, 4]], num_classes=0)
    summary = sample_prior(str(prior_dir), tmp_path / "out", n=5, options=SampleOptions(top_p=0.9, seed=3),
                           device="cpu")
    codes = np.load(tmp_path / "out" / "codes.npy")
    assert codes.shape == (5, 20) and summary.classes is None and codes.max() < 16
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [-1] * 5
    again = sample_prior(str(prior_dir), tmp_path / "again", n=5, options=SampleOptions(top_p=0.9, seed=3),
                         device="cpu")
    assert np.array_equal(np.load(again.codes), codes)  # seeded: the same codes again
