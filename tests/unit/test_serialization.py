"""Save/load round trips for every VAE-family class; incompatible weights give a UserError."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch

from tokenmill.models import build_model, load_model, save_model
from tokenmill.models.errors import UserError
from tokenmill.models.hvae import HierarchicalVAE, HVAEConfig
from tokenmill.models.vae import ConditionalVAE, CVAEConfig, GaussianVAE, VAEConfig

CASES = [
    GaussianVAE(VAEConfig(arch="conv", image_size=16, hidden=8, latent_dim=4)),
    GaussianVAE(VAEConfig(arch="mlp", image_size=16, hidden=16, latent_dim=4, likelihood="gaussian", learn_sigma=True)),
    ConditionalVAE(CVAEConfig(arch="mlp", image_size=16, hidden=16, latent_dim=4, likelihood="dlogistic", n_mix=2)),
    HierarchicalVAE(HVAEConfig(image_size=16, width=8, latent_channels=2, resolutions=(8, 4, 2))),
]


@pytest.mark.parametrize("model", CASES, ids=lambda m: f"{type(m).__name__}-{m.config.likelihood}")
def test_round_trip_gives_identical_outputs(model, tmp_path):
    with torch.no_grad():  # move every parameter away from its init (incl. zero-init priors, σ)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 9])
    torch.manual_seed(7)
    before = model(x, y)
    torch.manual_seed(7)
    after = loaded(x, y)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.recon, after.recon)
    torch.manual_seed(7)
    a = model.sample(3, y=y, temperature=0.5)
    torch.manual_seed(7)
    assert torch.equal(a, loaded.sample(3, y=y, temperature=0.5))


def test_weights_from_another_architecture_are_a_user_error(tmp_path):
    save_model(HierarchicalVAE(HVAEConfig(image_size=16, width=8, resolutions=(8, 4, 2))), tmp_path / "m")
    meta_path = tmp_path / "m" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["groups_per_resolution"] = 2  # the config now promises more groups than the weights hold
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match HierarchicalVAE"):
        load_model(tmp_path / "m")


def test_build_model_by_kind_and_configs_forbid_unknown_keys():
    assert isinstance(build_model({"kind": "hvae", "image_size": 16, "resolutions": [8, 4, 2]}), HierarchicalVAE)
    assert isinstance(build_model({"kind": "cvae", "arch": "mlp", "image_size": 8}), ConditionalVAE)
    for config in (VAEConfig, CVAEConfig, HVAEConfig):
        import dataclasses

        assert dataclasses.fields(config)[0].name == "kind"
        with pytest.raises(pydantic.ValidationError, match="latnt_dim"):
            pydantic.TypeAdapter(config).validate_python({"latnt_dim": 3})
    with pytest.raises(UserError, match="unknown keys"):
        build_model({"kind": "vae", "hiden": 3})
