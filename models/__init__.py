"""Pure single-device PyTorch models: the VAE family, the VQ family and the Transformer priors.

Importing `models` registers every model class for `build_model` / `load_model`.
"""

from tokenmill.models import (  # noqa: E402,F401  registers GaussianVAE, ConditionalVAE, HierarchicalVAE
    hvae,
    masked_prior,  # noqa: E402,F401  registers MaskGITPrior
    prior,  # noqa: E402,F401  registers TransformerPrior
    vae,
    var_prior,  # noqa: E402,F401  registers VARPrior
    vqgan,  # noqa: E402,F401  registers VQGAN
    vqvae,  # noqa: E402,F401  registers VQVAE, VQVAE2
)
from tokenmill.models.errors import UserError
from tokenmill.models.serialization import build_model, load_model, register_model, save_model

__all__ = ["UserError", "build_model", "load_model", "register_model", "save_model"]
