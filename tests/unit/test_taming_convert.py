"""`taming:` checkpoints become tokenmill VQGANs equal to taming-transformers' own model.

The reference is taming's Encoder, Decoder and VectorQuantizer (the installed package, `make setup`
installs it --no-deps) assembled as `VQModel.encode/decode` do (tests/helpers/taming.py: its
`taming.models.vqgan` needs pytorch_lightning, which is not needed here). Weights are random, in a
tiny config of the published architecture, saved as taming ships them (a log folder).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import yaml
from helpers.taming import TINY_PARAMS, random_reference, write_taming_log
from helpers.tokens import write_encoded_store

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.converters import convert
from tokenmill.models.converters.checkpoint import file_sha256
from tokenmill.models.serialization import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is faster on a loaded machine


def _images(seed: int = 1) -> torch.Tensor:
    """(4, 3, 16, 16) in [0, 1] on a 1/256 grid: 2x - 1 is exact, so both models see the same input."""
    return torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) / 256


def test_codes_decodes_and_loss_equal_the_reference(tmp_path):
    reference = random_reference()
    model = convert(f"taming:{write_taming_log(tmp_path / 'log', reference)}").model
    x = _images()
    with torch.no_grad():
        quant, ref_loss, ref_codes = reference.encode(2 * x - 1)
        ref_decoded = reference.decode(quant)  # (4, 3, 16, 16) in taming's [-1, 1] scale
        q = model.quantizer(model._latents(x))
        decoded = model._predict(model.quantizer.indices_to_codes(q.indices)) * 2 - 1
    assert torch.equal(model.encode(x), ref_codes) and ref_codes.unique().numel() > 8
    assert (decoded - ref_decoded).abs().max() < 1e-5
    assert torch.allclose(model.decode(ref_codes), ((ref_decoded + 1) / 2).clamp(0, 1), atol=1e-5)
    assert torch.allclose(q.loss, ref_loss, rtol=1e-5)  # taming's legacy β: 0.25 on the codebook term


def test_converted_model_fine_tunes_without_resetting_its_codebook(tmp_path):
    """A training forward leaves the learned codebook alone (no k-means init, no dead-code restarts,
    no EMA); the optimiser moves it by its gradient, as taming's training does."""
    model = convert(f"taming:{write_taming_log(tmp_path / 'log', random_reference())}").model.train()
    codebook = model.quantizer.embed.detach().clone()
    model(_images()[:2]).loss.backward()
    assert torch.equal(model.quantizer.embed, codebook)
    assert model.quantizer.embed.grad.abs().sum() > 0 and model.encoder[0].weight.grad.abs().sum() > 0


def test_taming_prefix_tokenizes_decodes_and_converts_to_the_same_model(tmp_path):
    """The tokenize path's encoder on `taming:CKPT` (YAML in ../configs/) gives the reference's codes; the
    lineage names the source checkpoint's sha256; `tokenmill convert` writes the same weights, and
    `train.init_from` loads them."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage
    from tokenmill.pipeline.training.loop import load_initial_weights

    reference = random_reference(seed=2)
    ckpt = write_taming_log(tmp_path / "log", reference) / "checkpoints" / "last.ckpt"
    files = resolve_model(f"taming:{ckpt}")
    encoder = TokenEncoder(files, latents=False)
    images = (_images(3) * 256).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (4, 16, 16, 3) uint8
    rows = encoder.encode(images, np.zeros(4, dtype=np.int64))
    with torch.no_grad():
        _, _, ref_codes = reference.encode(2 * (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255) - 1)
    assert np.array_equal(rows["codes"], ref_codes.numpy())
    lineage = tokenizer_lineage(files, encoder, ExtractionOptions.build())
    assert lineage["converted_from"]["kind"] == "taming"
    assert lineage["converted_from"]["checkpoint_sha256"] == file_sha256(ckpt)

    assert cli_main(["convert", f"taming:{ckpt}", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == files.weights  # what decode sha-checks
    fresh = type(encoder.model)(encoder.model.config)
    load_initial_weights(fresh, str(tmp_path / "model"), None)
    assert torch.equal(fresh.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), ref_codes)
    assert torch.equal(load_model(tmp_path / "model").quantizer.embed, reference.quantize.embedding.weight)


def test_a_store_made_with_a_taming_ref_decodes_through_its_lineage(tmp_path):
    """The store's lineage names `taming:…` and its sha256s; decode converts it again to the same weights."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage

    reference = random_reference(seed=4)
    ref = f"taming:{write_taming_log(tmp_path / 'log', reference)}"
    files = resolve_model(ref)
    encoder = TokenEncoder(files, latents=False)
    images = (_images(5) * 256).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (4, 16, 16, 3) uint8
    rows = encoder.encode(images, np.zeros(4, dtype=np.int64))
    url = str(tmp_path / "store.zarr")
    write_encoded_store(url, encoder, tokenizer_lineage(files, encoder, ExtractionOptions.build()), rows)

    decoded = next(StoreDecoder(url).images(0, 4))  # (4, 3, 16, 16): the lineage's model, sha-checked
    codes = torch.from_numpy(rows["codes"]).long().reshape(-1)  # (4 * 8 * 8,)
    with torch.no_grad():
        expected = reference.decode(reference.quantize.get_codebook_entry(codes, (4, 8, 8, 8)))
    assert torch.allclose(decoded, ((expected + 1) / 2).clamp(0, 1), atol=1e-5)


def _lightning_checkpoint(tmp_path, monkeypatch) -> None:
    """Rewrite last.ckpt as Lightning 1.x saves it: callback states keyed by the callback's class."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    module.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    path = tmp_path / "log" / "checkpoints" / "last.ckpt"
    with monkeypatch.context() as patch:  # importable while saving only
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            patch.setitem(sys.modules, name, types.ModuleType(name))
        patch.setitem(sys.modules, module.__name__, module)
        state = torch.load(path, weights_only=True)
        torch.save({**state, "callbacks": {module.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, path)


def test_lightning_callback_classes_load_without_pytorch_lightning(tmp_path, monkeypatch):
    reference = random_reference()
    write_taming_log(tmp_path / "log", reference)
    _lightning_checkpoint(tmp_path, monkeypatch)
    assert "pytorch_lightning" not in sys.modules
    model = convert(f"taming:{tmp_path / 'log'}").model
    assert torch.equal(model.encode(_images()), reference.encode(2 * _images() - 1)[2])


def _edit_yaml(log, change) -> None:
    path = next((log / "configs").glob("*.yaml"))
    config = yaml.safe_load(path.read_text())
    change(config["model"])
    path.write_text(yaml.safe_dump(config))


def _add_weight(log, key: str) -> None:
    path = log / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"][key] = torch.zeros(1)
    torch.save(checkpoint, path)


REFUSALS = {
    "missing YAML": (lambda log: [p.unlink() for p in (log / "configs").glob("*.yaml")], "no YAML config found"),
    "YAML of other widths": (lambda log: _edit_yaml(log, lambda m: m["params"]["ddconfig"].update(ch=64)),
                             "encoder.conv_in.weight is (32, 3, 3, 3) in the checkpoint, but (64, 3, 3, 3)"),
    "YAML with more blocks": (lambda log: _edit_yaml(log, lambda m: m["params"]["ddconfig"].update(num_res_blocks=2)),
                              "the checkpoint lacks weights of the model its config describes (52: decoder.up.0"),
    "another taming model": (lambda log: _edit_yaml(log, lambda m: m.update(target="taming.models.vqgan.GumbelVQ")),
                             "converts taming.models.vqgan.VQModel"),
    "weights the YAML lacks": (lambda log: _add_weight(log, "encoder.down.0.block.1.conv1.weight"),
                               "has weights the model its config describes lacks (1: encoder.down.0.block.1"),
    "corrupt checkpoint": (lambda log: (log / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint"),
                           "is not a readable PyTorch checkpoint"),
    "another architecture": (lambda log: torch.save({"model": {"tok_embeddings.weight": torch.zeros(2)}},
                                                    log / "checkpoints" / "last.ckpt"),
                             "is not a taming VQGAN checkpoint"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_checkpoint_or_config_is_one_line_and_exit_2(tmp_path, capsys, case):
    log = write_taming_log(tmp_path / "log", random_reference(), TINY_PARAMS)
    damage, expected = REFUSALS[case]
    damage(log)
    capsys.readouterr()
    assert cli_main(["convert", f"taming:{log}", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
