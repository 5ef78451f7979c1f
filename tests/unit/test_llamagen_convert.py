"""`llamagen:` checkpoints become tokenmill VQGANs equal to LlamaGen's own VQModel.

No installable LlamaGen package is faithful, so the reference ran once, outside this repository:
`tokenizer/tokenizer_image/vq_model.py` of github.com/FoundationVision/LlamaGen at commit ce98ec4
(the file last changed in 0b3a62b), a tiny config of its architecture (ch 32, ch_mult [1, 2], two
blocks per level, z_channels 16, 64 l2-normalised codes of dim 4, 16x16 images; VQ-16 is ch 128,
ch_mult [1, 1, 2, 2, 4], 16384 codes of dim 8), weights drawn from a seed, three random images. Its
codes, decodes (float32) and training loss are tests/data/llamagen/ (data, not LlamaGen's code;
tiny_vq.json names the exact calls, tests/helpers/llamagen.py rebuilds the checkpoint as
vq_train.py saves it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.llamagen import tiny_case, tiny_images, tiny_state, write_checkpoint

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.converters import convert
from tokenmill.models.converters.checkpoint import file_sha256
from tokenmill.models.serialization import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is faster on a loaded machine


def test_codes_decodes_and_loss_equal_the_reference(tmp_path):
    _, expected = tiny_case()
    model = convert(f"llamagen:{write_checkpoint(tmp_path / 'vq.pt')}").model
    _, x = tiny_images()  # (3, 3, 16, 16) in [0, 1]
    with torch.no_grad():
        q = model.quantizer(model._latents(x))
        decoded = model._predict(model.quantizer.indices_to_codes(q.indices)) * 2 - 1  # LlamaGen's [-1, 1] scale
    codes = model.encode(x)  # (3, 8, 8)
    assert np.array_equal(codes.numpy(), expected["codes"]) and np.unique(expected["codes"]).size > 40
    assert (decoded - torch.from_numpy(expected["decodes"])).abs().max() < 1e-5
    assert torch.allclose(model.decode(codes), ((torch.from_numpy(expected["decodes"]) + 1) / 2).clamp(0, 1),
                          atol=1e-5)
    assert torch.allclose(q.loss, torch.from_numpy(expected["loss"]), rtol=1e-5)  # vq + 0.25 · commitment


def test_llamagen_prefix_tokenizes_and_converts_once(tmp_path):
    """The tokenize path's encoder on `llamagen:CKPT` gives the reference's codes; the lineage names
    the checkpoint's sha256; `tokenmill convert` writes the same model folder, which loads alone."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage

    _, expected = tiny_case()
    ckpt = write_checkpoint(tmp_path / "vq.pt")
    files = resolve_model(f"llamagen:{ckpt}")
    encoder = TokenEncoder(files, latents=False)
    images, _ = tiny_images()  # (3, 16, 16, 3) uint8
    rows = encoder.encode(images, np.zeros(3, dtype=np.int64))
    assert np.array_equal(rows["codes"], expected["codes"])
    lineage = tokenizer_lineage(files, encoder, ExtractionOptions.build())
    assert lineage["converted_from"]["kind"] == "llamagen"
    assert lineage["converted_from"]["checkpoint_sha256"] == file_sha256(ckpt)

    assert cli_main(["convert", f"llamagen:{ckpt}", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == files.weights  # what decode sha-checks
    model = load_model(tmp_path / "model")
    assert model.config.image_size == 16  # from the checkpoint's args
    assert torch.equal(model.quantizer.embed, tiny_state()["quantize.embedding.weight"])


def test_a_store_made_with_a_llamagen_ref_decodes_to_the_reference_decodes(tmp_path):
    """The store's lineage names `llamagen:…`; decode converts it again (sha-checked) and gives LlamaGen's images."""
    from helpers.tokens import decoded_through_lineage

    _, expected = tiny_case()
    decoded = decoded_through_lineage(f"llamagen:{write_checkpoint(tmp_path / 'vq.pt')}", tiny_images()[0], str(tmp_path / "store.zarr"))
    assert torch.allclose(decoded, ((torch.from_numpy(expected["decodes"]) + 1) / 2).clamp(0, 1), atol=1e-5)


def test_ema_weights_win_and_the_image_size_defaults_to_256_or_is_given(tmp_path):
    """As LlamaGen's vq_demo.py: `ema` before `model`. Without vq_train.py's args (the released
    checkpoints) the image size is 256 unless `,IMAGE_SIZE` says otherwise."""
    _, expected = tiny_case()
    state = tiny_state()
    other = {key: value + 0.5 for key, value in state.items()}
    ckpt = write_checkpoint(tmp_path / "vq.pt", other, args=False, ema=state)
    converted = convert(f"llamagen:{ckpt}")
    _, x = tiny_images()
    assert converted.source["weights"] == "ema" and converted.model.config.image_size == 256
    assert np.array_equal(converted.model.encode(x).numpy(), expected["codes"])
    assert convert(f"llamagen:{ckpt},32").model.config.image_size == 32


def test_converted_model_fine_tunes_without_resetting_its_codebook(tmp_path):
    """A training forward leaves the learned codebook alone (no k-means init, no dead-code restarts,
    no EMA); the optimiser moves it by its gradient, as LlamaGen's training does."""
    model = convert(f"llamagen:{write_checkpoint(tmp_path / 'vq.pt')}").model.train()
    codebook = model.quantizer.embed.detach().clone()
    model(tiny_images()[1][:2]).loss.backward()
    assert torch.equal(model.quantizer.embed, codebook)
    assert model.quantizer.embed.grad.abs().sum() > 0 and model.encoder[0].weight.grad.abs().sum() > 0


def _edited(change):
    """A checkpoint whose `model` state dict `change` edits in place."""
    def damage(path):
        state = tiny_state()
        change(state)
        write_checkpoint(path, state)
    return damage


def _taming_checkpoint(path):
    torch.save({"state_dict": {"encoder.down.0.block.0.conv1.weight": torch.zeros(2),
                               "quantize.embedding.weight": torch.zeros(2)}}, path)


REFUSALS = {  # case -> (damage the checkpoint, the reference's suffix, the error's words)
    "missing checkpoint": (lambda path: path.unlink(), "", "does not exist"),
    "corrupt checkpoint": (lambda path: path.write_bytes(b"not a checkpoint"), "", "is not a readable PyTorch"),
    "a LlamaGen GPT": (lambda path: torch.save({"model": {"tok_embeddings.weight": torch.zeros(2)}}, path), "",
                       "is not a LlamaGen VQ checkpoint"),
    "a taming checkpoint": (_taming_checkpoint, "", "is not a LlamaGen VQ checkpoint"),
    "decoder of other widths": (_edited(lambda s: s.update({"decoder.conv_blocks.1.res.0.conv1.weight":
                                                            torch.zeros(64, 64, 3, 3)})), "",
                                "the encoder's level widths [32, 64] and the decoder's [64, 64] differ"),
    "a weight of another shape": (_edited(lambda s: s.update({"post_quant_conv.weight": torch.zeros(16, 8, 1, 1)})),
                                  "", "post_quant_conv.weight is (16, 8, 1, 1) in the checkpoint, but (16, 4, 1, 1)"),
    "a missing attention": (_edited(lambda s: s.pop("encoder.conv_blocks.1.attn.1.k.weight")), "",
                            "the checkpoint lacks weights of the model its config describes (1: encoder.conv_blocks.1"),
    "batch norms": (_edited(lambda s: s.update({"encoder.norm_out.running_mean": torch.zeros(64)})), "",
                    "has weights the model its config describes lacks (1: encoder.norm_out.running_mean)"),
    "an image size off the grid": (lambda path: None, ",15", "image_size 15 is not a multiple of the downsample"),
    "an image size that is no number": (lambda path: None, ",big", "'big' is not an image size"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, case):
    damage, suffix, expected = REFUSALS[case]
    ckpt = write_checkpoint(tmp_path / "vq.pt")
    damage(ckpt)
    capsys.readouterr()
    assert cli_main(["convert", f"llamagen:{ckpt}{suffix}", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
