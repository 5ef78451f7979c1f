"""The README's runnable blocks are found and cover the path they promise, so a README edit cannot
drop a step from the walkthrough test unnoticed (the blocks run in tests/system/test_readme.py and
tests/system/test_demo_cli.py)."""

from __future__ import annotations

import re

import pytest
from helpers.readme import README, readme_blocks

WALKTHROUGH = ["shard", "inspect", "train", "eval", "tokenize", "train-prior", "sample", "decode", "export"]
RUNNABLE = ["walkthrough", "demo-follow-up", "finetune-walkthrough"]


def commands(blocks: list[str]) -> list[str]:
    """The `tokenmill` subcommands of the blocks' lines, in order."""
    return re.findall(r"^tokenmill ([\w-]+)", "\n".join(blocks), re.M)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_marker_is_followed_by_a_bash_block(name):
    markers = re.findall(rf"^<!-- {name} -->$", README.read_text(), re.M)
    assert 0 < len(readme_blocks(name)) == len(markers)


def test_the_walkthrough_runs_every_step_from_images_to_samples():
    blocks = readme_blocks("walkthrough")
    assert commands(blocks) == WALKTHROUGH
    assert "my-images" in blocks[0]  # the images are made in the README itself


def test_the_finetune_walkthrough_evaluates_the_published_model_before_and_after_a_decoder_only_train():
    blocks = readme_blocks("finetune-walkthrough")
    assert commands(blocks) == ["shard", "convert", "eval", "train", "eval"]
    text = "\n".join(blocks)
    assert "llamagen:vq_ds16_c2i.pt" in text and '"freeze": ["encoder", "quantizer"]' in text
    assert text.count("--experiment vq16-my-photos") == 2 and '"experiment": "vq16-my-photos"' in text


def test_the_demo_follow_ups_decode_sample_and_train_on_the_demo_without_a_tracking_flag():
    blocks = readme_blocks("demo-follow-up")
    assert {"decode", "sample", "train-prior"} <= set(commands(blocks))
    assert "data.store=$demo/tokens.zarr" in "\n".join(blocks)


@pytest.mark.parametrize("name", RUNNABLE)
def test_runnable_blocks_need_no_clone_and_no_tracking_flag(name):
    text = "\n".join(readme_blocks(name))
    assert "configs/" not in text  # presets by name: the blocks run in a folder that is not the repository
    assert "--tracking-uri" not in text and "MLFLOW_TRACKING_URI" not in text


def test_the_block_pattern_skips_unmarked_blocks():
    text = "<!-- walkthrough -->\n```bash\ntokenmill shard a b\n```\n\n```bash\ntokenmill train x\n```\n"
    assert readme_blocks("walkthrough", text) == ["tokenmill shard a b\n"]
