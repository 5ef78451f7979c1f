"""Fine-tuning a tokenizer (`train.init_from` + `train.freeze`) in this process: a decoder-only
fine-tune under DDP keeps the codes byte-identical, so a store made before it still decodes with it;
its lineage says where it came from; wrong part names are refused. (The freezing rules per
model: models/freezing.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import CONFIGS
from helpers.engine import grey_shards, run_in_process
from torch.nn.parallel import DistributedDataParallel

from tokenmill.models.errors import UserError
from tokenmill.models.serialization import load_model, save_model
from tokenmill.pipeline.registry.model_ref import resolve_model
from tokenmill.pipeline.tokens.detokenize import StoreDecoder
from tokenmill.pipeline.tokens.local_tokenize import tokenize_in_process
from tokenmill.pipeline.tokens.store import TokenStore
from tokenmill.pipeline.training.config import load_train_config
from tokenmill.pipeline.training.context import LocalContext
from tokenmill.pipeline.training.loop import LoopSpec, run_rank
from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

CODE_PARTS = ("encoder.", "quantizer.")


def vq_task(shards: str, root: Path, *overrides: str) -> TokenizerTask:
    return TokenizerTask(load_train_config(CONFIGS / "debug_vqvae.yaml", [
        f"data.shards={shards}", f"run.root={root}", "train.batch_size=8", "tracking.log_images=false",
        "optim.ema_decay=0.9", *overrides]))


class DDPContext(LocalContext):
    """Rank 0 of a gloo world of 1, the model DDP-wrapped as Ray Train wraps it (find_unused_parameters
    off): a trained parameter without a gradient would make DDP's second step raise."""

    def prepare(self, module):
        return DistributedDataParallel(module.to(self.device))


def fine_tune_under_ddp(task: TokenizerTask, folder: Path) -> Path:
    task.prepare("")
    dist.init_process_group("gloo", store=dist.FileStore(str(folder / "dist-store"), 1), rank=0, world_size=1)
    try:
        context = DDPContext(folder / "checkpoints", task.inputs(in_process=True).datasets)
        run_rank(task, context, LoopSpec())
    finally:
        dist.destroy_process_group()
    return context.checkpoints()[-1]


def codes(store_url: str) -> np.ndarray:
    group = TokenStore(store_url).open_group("r")
    return np.asarray(group["codes"][:])


def test_a_decoder_only_fine_tune_keeps_the_codes_and_decodes_the_old_store(tmp_path):
    shards = grey_shards(tmp_path)
    base = run_in_process(vq_task(shards, tmp_path / "base", "train.steps=4", "train.val_every=4",
                                  "train.checkpoint_every=4"), tmp_path / "base").checkpoint() / "model"
    before = tokenize_in_process(resolve_model(str(base)), shards, str(tmp_path / "before.zarr"))

    task = vq_task(shards, tmp_path / "tuned", "train.steps=3", "train.val_every=3", "train.checkpoint_every=3",
                   "optim.lr=0.01", f"train.init_from={base}", "train.freeze=[encoder, codebook]")
    checkpoint = fine_tune_under_ddp(task, tmp_path)
    tuned = checkpoint / "model"

    # Codes: byte-identical; weights: the code parts (EMA export, buffers included) equal, the decoder moved.
    after = tokenize_in_process(resolve_model(str(tuned)), shards, str(tmp_path / "after.zarr"))
    assert codes(before).tobytes() == codes(after).tobytes() and codes(before).size > 0
    old, new = load_model(base).state_dict(), load_model(tuned).state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith(CODE_PARTS))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)["parts"]["model"]
    decoder_tensors = sum(1 for k, _ in load_model(tuned).named_parameters() if k.startswith("decoder."))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == decoder_tensors  # frozen ones are not optimised

    lineage = json.loads((tuned / "config.json").read_text())["extra"]["lineage"]
    base_sha = resolve_model(str(base)).weights_sha256
    assert lineage["init_from"] == str(base) and lineage["freeze"] == ["encoder", "quantizer"]
    assert lineage["init_weights_sha256"] == base_sha and lineage["same_codes_as"] == [base_sha]

    # The store made by the base model decodes with the fine-tuned decoder (and gives other images).
    rows = (0, 8)
    old_images = next(StoreDecoder(before).images(*rows))
    new_images = next(StoreDecoder(before, model_ref=str(tuned)).images(*rows))
    assert old_images.shape == new_images.shape and not torch.equal(old_images, new_images)

    # A model whose encoder changed after all is refused, whatever its lineage says.
    tampered = load_model(tuned)
    with torch.no_grad():
        next(tampered.encoder.parameters()).add_(0.1)
    save_model(tampered, tmp_path / "tampered", extra=json.loads((tuned / "config.json").read_text())["extra"])
    with pytest.raises(UserError, match="was made with"):
        StoreDecoder(before, model_ref=str(tmp_path / "tampered"))


def test_a_wrong_part_name_is_one_line_listing_the_valid_ones(tmp_path):
    task = vq_task(str(tmp_path / "no-shards"), tmp_path, "train.freeze=[encoder, decodr]")
    with pytest.raises(UserError) as caught:
        task.prepare("")  # before the shards are even looked at
    message = str(caught.value)
    assert "\n" not in message and "['decodr']" in message
    assert "valid: encoder, quantizer, decoder, codebook" in message


def test_freezing_every_part_is_refused_and_vqvae2_and_vqgan_freeze_their_whole_code_path():
    from tokenmill.models.freezing import code_parts_sha256, freeze
    from tokenmill.models.serialization import build_model

    with pytest.raises(UserError, match="freezes every parameter"):
        freeze(build_model({"kind": "vqvae", "quantizer": {"ema": False}}), ["encoder", "quantizer", "decoder"])
    model = build_model({"kind": "vqvae2", "image_size": 16, "hidden": 8, "latent_dim": 8})
    assert freeze(model, ["quantizer", "encoder"]) == ("encoder", "quantizer")
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"upsample_top", "decoder"}  # decoder_top and pre_bottom make the bottom codes
    sha = code_parts_sha256(model)
    with torch.no_grad():
        next(model.decoder_top.parameters()).add_(1.0)
    assert code_parts_sha256(model) != sha
    vqgan = build_model({"kind": "vqgan", "image_size": 16, "base_channels": 8, "channel_mult": [1, 2], "latent_dim": 4,
                         "z_channels": 8})  # quant_conv: 8 -> 4 channels, as LlamaGen's
    assert freeze(vqgan, ["encoder", "codebook"]) == ("encoder", "quant_conv", "quantizer")  # decoder-only: codes kept
    assert not vqgan.quant_conv.weight.requires_grad and vqgan.post_quant_conv.weight.requires_grad
