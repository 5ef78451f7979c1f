"""What a model is and where it came from (`tokenmill inspect MODEL`): its class and config, parameter
count, weights sha256, its origin (the MLflow registry version and run, or the folder / URL it was
read from) and, for a prior, its token layout and lineage.

MODEL is whatever the commands take: a model folder or URL, `runs:/…`, `models:/…`, `diffusers:PATH`
(a diffusers `save_pretrained` folder is recognised without the prefix too). The files come from the
one resolver (`pipeline.registry.model_ref`, `pipeline.tokens.diffusers_adapter`) and a tokenmill
model is built by its own loader; this module only reads what they return.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.models import converters
from tokenmill.models.errors import UserError
from tokenmill.pipeline.prior.lineage import LINEAGE_FILE, parse_prior_lineage
from tokenmill.pipeline.registry import tracking
from tokenmill.pipeline.registry.model_ref import ModelFiles, resolve_model
from tokenmill.pipeline.runtime.storage import filesystem, join
from tokenmill.pipeline.tokens import diffusers_adapter as diffusers

MLFLOW_PREFIXES = ("runs:/", "models:/")
PRIOR_KINDS = {"prior": "ar", "maskgit": "maskgit", "var": "var"}  # config kind -> prior family


def is_model_reference(ref: str) -> bool:
    """A reference that names no path to check first: MLflow URIs, `diffusers:` (hub ids too), `taming:`…"""
    return ref.startswith((*MLFLOW_PREFIXES, diffusers.PREFIX, *converters.PREFIXES))


def describe_model(ref: str, tracking_uri: str | None = None, storage_options: dict | None = None) -> dict[str, Any]:
    """{kind: "model" or "prior", class, model_kind, config, parameters, weights_sha256, origin, ...}."""
    if ref.startswith(diffusers.PREFIX) or _is_diffusers_folder(ref, storage_options):
        files = diffusers.resolve_diffusers(diffusers.PREFIX + ref.removeprefix(diffusers.PREFIX), storage_options)
        info = _diffusers_info(files)
    else:
        files = resolve_model(ref, tracking_uri, storage_options, extra_files=(LINEAGE_FILE,))
        info = _native_info(files)
    return {"kind": "prior" if "prior" in info else "model", "target": ref, **info,
            "weights_sha256": files.weights_sha256, "weights_bytes": len(files.weights),
            "origin": model_origin(ref, getattr(files, "version", None), tracking_uri)}


def _is_diffusers_folder(ref: str, storage_options: dict | None) -> bool:
    """A folder whose config.json names a diffusers class (`_class_name`); a tokenmill config has `class`."""
    if ref.startswith(MLFLOW_PREFIXES):
        return False
    fs, path = filesystem(ref, storage_options)
    try:
        return "_class_name" in json.loads(fs.cat_file(join(path, diffusers.CONFIG_FILE)))
    except (OSError, ValueError, TypeError):  # missing or unreadable: the tokenmill loader names the problem
        return False


def _native_info(files: ModelFiles) -> dict[str, Any]:
    """A tokenmill model, loaded (so its weights are known to fit its config) and counted."""
    from tokenmill.models.prior import PriorConfig
    from tokenmill.models.tokenizer import code_scales
    from tokenmill.pipeline.prior.sampling import level_shapes

    model, meta = files.load()
    info = {"class": meta["class"], "model_kind": meta["config"].get("kind"), "config": meta["config"],
            "extra": meta.get("extra", {}), "parameters": sum(p.numel() for p in model.parameters())}
    if getattr(model, "codebook_size", None) is not None:  # a code tokenizer: what its store rows hold
        info["tokens"] = {"codebook_size": model.codebook_size, "token_shape": [list(s) for s in level_shapes(model)]}
        if code_scales(model):
            info["tokens"]["scales"] = list(code_scales(model))
    if isinstance(getattr(model, "config", None), PriorConfig):
        lineage = files.extras.get(LINEAGE_FILE)
        info["prior"] = prior_info(model.config, parse_prior_lineage(lineage, files.uri) if lineage else None)
    return info


def prior_info(config, lineage: dict[str, Any] | None) -> dict[str, Any]:
    """A prior's family (ar / maskgit / var), token layout and lineage (every key it records)."""
    family = PRIOR_KINDS.get(config.kind, config.kind)
    info = {"kind": family, "vocab_size": config.vocab_size, "codebook_size": config.codebook_size,
            "num_classes": config.num_classes, "grid": config.grid, "seq_len": config.seq_len,
            "store": lineage and lineage["store_url"], "tokenizer": lineage and lineage["tokenizer_uri"],
            "lineage": lineage}
    if family == "var":  # its levels are square scales, coarse to fine
        info["scales"] = [h for h, _ in config.grid]
    return info


def _diffusers_info(files: diffusers.DiffusersFiles) -> dict[str, Any]:
    """A diffusers autoencoder. Counted from its safetensors file (its whole state dict is parameters)
    so that inspecting one needs no diffusers import."""
    from safetensors.torch import load as load_tensors

    config = json.loads(files.config)
    info = {"class": files.class_name, "model_kind": f"diffusers {files.class_name}",
            "config": {k: v for k, v in config.items() if not k.startswith("_")}, "extra": {},
            "parameters": sum(t.numel() for t in load_tensors(files.weights).values())}
    if files.class_name == "VQModel":
        info["tokens"] = {"codebook_size": config.get("num_vq_embeddings")}
    elif diffusers.KINDS[files.class_name].array == "latents":  # what a store of its latents is scaled by
        info["latents"] = {"channels": config.get("latent_channels"), "scaling_factor": config.get("scaling_factor"),
                           "shift_factor": config.get("shift_factor") if diffusers.KINDS[files.class_name].shift else None}
    return info


def model_origin(ref: str, version: str | None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Where the model came from: the registry version (tracking URI, name, version, its run, source
    and tags) of a `models:/` reference, the run of a `runs:/` one, else the folder or URL read."""
    if converters.is_converted(ref):  # the source files, with their sha256, are in extra.converted_from
        return {"location": ref}
    if not ref.startswith(MLFLOW_PREFIXES):
        location = ref.removeprefix(diffusers.PREFIX)
        local = "://" not in location or location.startswith("file://")
        return {"location": str(Path(location.removeprefix("file://")).resolve()) if local else location}
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = tracking.client(tracking_uri)
    try:
        if version:  # pinned by the resolver: an alias is already its version number
            name, number = version.rsplit("/", 1)
            found = client.get_model_version(name, number)
            origin = {"registry": {"tracking_uri": uri, "name": name, "version": number}, "run_id": found.run_id,
                      "source": found.source, "version_tags": dict(found.tags)}
        else:
            origin = {"tracking_uri": uri, "run_id": ref.removeprefix("runs:/").split("/")[0]}
        return {**origin, **_run_info(client, origin["run_id"])}
    except MlflowException as err:
        raise UserError(f"cannot read where {ref} came from in MLflow at {uri}: {str(err).splitlines()[0]}") from None


def _run_info(client, run_id: str | None) -> dict[str, Any]:
    """The training run's name, experiment and tokenmill tags (task, model kind, git commit, ...)."""
    if not run_id:
        return {}
    run = client.get_run(run_id)
    return {"run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "run_tags": {k: v for k, v in sorted(run.data.tags.items()) if k.startswith("tokenmill.")}}
