"""`magvit2:` checkpoints become tokenmill VQGANs equal to Open-MAGVIT2's own LFQ VQModel.

No installable Open-MAGVIT2 package is faithful, so the reference ran once, outside this repository:
`src/Open_MAGVIT2/models/lfqgan.py` (with improved_model.py's Encoder/Decoder and
lookup_free_quantize.py's LFQ) of github.com/TencentARC/SEED-Voken at commit b9a17ea, a tiny config
of its architecture (ch 32, ch_mult [1, 2], one block per level, z_channels 8, LFQ with 8 bits = 256
codes, 16x16 images; the released 256 L is ch 128, ch_mult [1, 1, 2, 2, 4], 4 blocks, 2^18 codes),
weights drawn from a seed, three random images. Its codes and float32 decodes are tests/data/magvit2/
(data, not its code; tiny_lfq.json names the exact calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.magvit2 import tiny_case, tiny_images, tiny_state, write_checkpoint, write_config

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.converters import convert
from tokenmill.models.converters.checkpoint import file_sha256
from tokenmill.models.serialization import load_model
from tokenmill.models.vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is faster on a loaded machine


def test_codes_and_decodes_equal_the_reference(tmp_path):
    _, expected = tiny_case()
    model = convert(f"magvit2:{write_checkpoint(tmp_path)}").model
    _, x = tiny_images()  # (3, 3, 16, 16) in [0, 1]
    codes = model.encode(x)  # (3, 8, 8)
    with torch.no_grad():
        decoded = model._predict(model.quantizer.indices_to_codes(codes)) * 2 - 1  # Open-MAGVIT2's [-1, 1] scale
    assert np.array_equal(codes.numpy(), expected["codes"]) and np.unique(expected["codes"]).size > 40
    assert (decoded - torch.from_numpy(expected["decodes"])).abs().max() < 1e-5
    assert torch.allclose(model.decode(codes), ((torch.from_numpy(expected["decodes"]) + 1) / 2).clamp(0, 1),
                          atol=1e-5)


def test_magvit2_prefix_tokenizes_and_converts_once(tmp_path):
    """The tokenize path's encoder on `magvit2:CKPT,YAML` gives the reference's codes; the lineage names
    the checkpoint's and the YAML's sha256; `tokenmill convert` writes the same model folder."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage

    _, expected = tiny_case()
    location = write_checkpoint(tmp_path)
    ckpt, config = location.split(",")
    files = resolve_model(f"magvit2:{location}")
    encoder = TokenEncoder(files, latents=False)
    rows = encoder.encode(tiny_images()[0], np.zeros(3, dtype=np.int64))
    assert np.array_equal(rows["codes"], expected["codes"])
    origin = tokenizer_lineage(files, encoder, ExtractionOptions.build())["converted_from"]
    assert origin["kind"] == "magvit2" and origin["weights"] == "model"
    assert origin["checkpoint_sha256"] == file_sha256(ckpt) and origin["config_sha256"] == [file_sha256(config)]

    assert cli_main(["convert", f"magvit2:{location}", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == files.weights
    model = load_model(tmp_path / "model")
    assert model.config.blocks == "magvit2" and model.config.quantizer.bits == 8
    assert torch.equal(model.encoder[0].weight, tiny_state()["encoder.conv_in.weight"])


def test_ema_weights_are_used_when_the_config_says_use_ema(tmp_path):
    """LitEma keeps each parameter under its dot-less name; with use_ema they are the model's weights."""
    _, expected = tiny_case()
    state = tiny_state()
    ema = {"model_ema." + k.replace(".", ""): v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    noisy = {k: v + 0.5 if k.startswith(("encoder.", "decoder.")) else v for k, v in state.items()}
    location = write_checkpoint(tmp_path, {**noisy, **ema, "model_ema.decay": torch.tensor(0.999)})
    write_config(tmp_path / "tiny.yaml", lambda c: c["model"]["init_args"].update(use_ema=True))
    converted = convert(f"magvit2:{location}")
    assert converted.source["weights"] == "ema"
    assert np.array_equal(converted.model.encode(tiny_images()[1]).numpy(), expected["codes"])


def test_the_pretrain_models_config_converts_the_same(tmp_path):
    """lfqgan_pretrain.VQModel (the Pretrain_256 checkpoints) builds the same Encoder, Decoder and LFQ;
    `magvit2:CKPT` alone reads the one YAML beside it."""
    _, expected = tiny_case()
    ckpt = write_checkpoint(tmp_path).split(",")[0]
    pretrain = "src.Open_MAGVIT2.models.lfqgan_pretrain.VQModel"
    write_config(tmp_path / "tiny.yaml", lambda c: c["model"].update(class_path=pretrain))
    assert np.array_equal(convert(f"magvit2:{ckpt}").model.encode(tiny_images()[1]).numpy(), expected["codes"])


def test_default_vqgan_keys_are_unchanged_by_the_magvit2_option():
    """`blocks` defaults to taming's: a model saved before keeps every key (biases included)."""
    keys = VQGAN(VQGANConfig(base_channels=32, channel_mult=(1, 2), res_blocks=1)).state_dict().keys()
    assert "encoder.1.block.2.bias" in keys and not any("gamma" in k for k in keys)


def _ibq(config):
    config["model"]["class_path"] = "src.IBQ.models.ibqgan.IBQ"


def _yaml_edit(edit):
    def damage(folder):
        write_config(folder / "tiny.yaml", edit)
    return damage


def _state_edit(change):
    def damage(folder):
        state = tiny_state()
        change(state)
        write_checkpoint(folder, state)
    return damage


REFUSALS = {  # case -> (damage the folder's tiny.ckpt / tiny.yaml, the error's words)
    "missing checkpoint": (lambda folder: (folder / "tiny.ckpt").unlink(), "does not exist"),
    "missing YAML": (lambda folder: (folder / "tiny.yaml").unlink(), "does not exist"),
    "corrupt checkpoint": (lambda folder: (folder / "tiny.ckpt").write_bytes(b"junk"), "is not a readable PyTorch"),
    "corrupt YAML": (lambda folder: (folder / "tiny.yaml").write_text("model: [unclosed"), "is not valid YAML"),
    "a taming checkpoint": (lambda folder: torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(2)}},
                                                      folder / "tiny.ckpt"), "is not an Open-MAGVIT2 checkpoint"),
    "IBQ": (_yaml_edit(_ibq), "IBQ's IndexPropagationQuantize picks the code of largest dot product"),
    "another model": (_yaml_edit(lambda c: c["model"].update(class_path="taming.models.vqgan.VQModel")),
                      "magvit2: converts src.Open_MAGVIT2.models.lfqgan.VQModel and"),
    "LFQ with a projection": (_yaml_edit(lambda c: c["model"]["init_args"].update(embed_dim=6)),
                              "magvit2: converts LFQ without projections"),
    "a YAML of other widths": (_yaml_edit(lambda c: c["model"]["init_args"]["ddconfig"].update(ch=64)),
                               "encoder.conv_in.weight is (32, 3, 3, 3) in the checkpoint, but (64, 3, 3, 3)"),
    "a YAML with more blocks": (_yaml_edit(lambda c: c["model"]["init_args"]["ddconfig"].update(num_res_blocks=2)),
                                "the checkpoint lacks weights of the model its config describes"),
    "an extra weight": (_state_edit(lambda s: s.update({"encoder.mid_block.0.conv1.bias": torch.zeros(64)})),
                        "has weights the model its config describes lacks (1: encoder.mid_block.0.conv1.bias)"),
    "use_ema without EMA weights": (_yaml_edit(lambda c: c["model"]["init_args"].update(use_ema=True)),
                                    "lacks EMA weights"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_checkpoint_or_yaml_is_one_line_and_exit_2(tmp_path, capsys, case):
    damage, expected = REFUSALS[case]
    location = write_checkpoint(tmp_path)
    damage(tmp_path)
    capsys.readouterr()
    assert cli_main(["convert", f"magvit2:{location}", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_store_made_with_a_magvit2_ref_decodes_to_the_reference_decodes(tmp_path):
    """The store's lineage names `magvit2:…`; decode converts it again (sha-checked) and gives Open-MAGVIT2's images."""
    from helpers.tokens import decoded_through_lineage

    _, expected = tiny_case()
    decoded = decoded_through_lineage(f"magvit2:{write_checkpoint(tmp_path)}", tiny_images()[0], str(tmp_path / "store.zarr"))
    assert torch.allclose(decoded, ((torch.from_numpy(expected["decodes"]) + 1) / 2).clamp(0, 1), atol=1e-5)


def test_converted_model_fine_tunes_through_the_adaptive_norms(tmp_path):
    """A training forward gives a finite loss (L1 + β·commitment + entropy penalty) and gradients reach
    the encoder's first conv and the decoder's adaptive GroupNorms (conditioned on the codes)."""
    from tokenmill.models.vqgan import AdaptiveGroupNorm

    model = convert(f"magvit2:{write_checkpoint(tmp_path)}").model.train()
    loss = model(tiny_images()[1][:2]).loss
    loss.backward()
    adaptive = next(m for m in model.decoder if isinstance(m, AdaptiveGroupNorm))
    assert torch.isfinite(loss) and model.encoder[0].weight.grad.abs().sum() > 0
    assert adaptive.gamma.weight.grad.abs().sum() > 0 and adaptive.beta.weight.grad.abs().sum() > 0
