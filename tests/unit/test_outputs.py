"""The shared checks of issue 27 point 4, in-process: `check_output` (every output path, before any
work) and the argparse validators every numeric option uses. The bad-input table
(tests/system/test_bad_input.py) runs them through every command; here is what it cannot reach:
the permission check (root writes anywhere: a child process drops to an unprivileged user),
remote URLs, and the exact ranges."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pydantic
import pytest
from helpers import REPO

from tokenmill.jobs.cli import fraction, nonnegative_float, number_in, output_path, positive_int, probability
from tokenmill.models.errors import UserError
from tokenmill.pipeline.config import ConfigError
from tokenmill.pipeline.prior.config import load_prior_config
from tokenmill.pipeline.registry.config import load_retrain_config
from tokenmill.pipeline.runtime.outputs import OutputError, check_output, removed_if_refused
from tokenmill.pipeline.training.config import load_train_config

NOBODY = 65534


def test_parent_that_is_a_file_is_refused_naming_both(tmp_path):
    (tmp_path / "f").write_text("x")
    for folder in (True, False):
        with pytest.raises(OutputError, match=r"f/a/b: its parent .*/f is a file"):
            check_output(tmp_path / "f" / "a" / "b", folder=folder)


def test_file_where_a_folder_goes_and_folder_where_a_file_goes(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file; pass a folder"):
        check_output(tmp_path / "f")
    with pytest.raises(OutputError, match="is a folder; pass a file path"):
        check_output(tmp_path, folder=False)
    check_output(tmp_path / "f", folder=False)  # an existing file is overwritten: allowed
    check_output(tmp_path / "new" / "deeper")  # created with its parents: allowed


def test_a_non_empty_folder_is_refused_unless_it_holds_one_of_our_marks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output(out, marks=("manifest.json",))  # empty: ours to fill
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(OutputError, match=r"out is a non-empty folder \(notes.txt\).*none of manifest.json"):
        check_output(out, marks=("manifest.json",))
    check_output(out, marks=None)  # a scratch folder the command owns wholly
    (out / "run" / "model").mkdir(parents=True)
    check_output(out, marks=("manifest.json", "*/model"))  # a glob below it matches: ours


def _child_result(fn) -> str:
    """fn() run in a forked child that dropped to an unprivileged user: "ok" or the error text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(read)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            message = "ok"
        except BaseException as err:  # noqa: BLE001 - the parent asserts on whatever happened
            message = f"{type(err).__name__}: {err}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_a_folder_without_write_permission_is_refused():
    base = Path(tempfile.mkdtemp(prefix="tokenmill-outputs-"))  # /tmp: every user may reach it
    base.chmod(0o755)
    locked = base / "locked"
    (locked / "inside").mkdir(parents=True)
    (locked / "inside").chmod(0o555)
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write anywhere: check as an unprivileged user
            new = _child_result(lambda: check_output(locked / "new"))
            existing = _child_result(lambda: check_output(locked / "inside"))
            file = _child_result(lambda: check_output(locked / "out.json", folder=False))
        else:
            new, existing, file = (_catch(lambda p=p, f=f: check_output(p, folder=f))
                                   for p, f in ((locked / "new", True), (locked / "inside", True),
                                                (locked / "out.json", False)))
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)
    assert new.startswith("OutputError") and "no permission to create it in" in new and str(locked) in new, new
    assert existing.startswith("OutputError") and "no permission to write there" in existing, existing
    assert file.startswith("OutputError") and "no permission" in file, file


def test_a_path_the_user_cannot_even_reach_is_refused(tmp_path):
    closed = tmp_path / "closed"
    (closed / "hidden").mkdir(parents=True)
    closed.chmod(0o000)  # nobody but root may look inside (root: checked as an unprivileged user)
    try:
        check = lambda: check_output(closed / "hidden" / "out")  # noqa: E731
        message = _child_result(check) if os.geteuid() == 0 else _catch(check)
    finally:
        closed.chmod(0o755)
    assert message.startswith("OutputError") and "no permission to reach it" in message, message


def _catch(fn) -> str:
    try:
        fn()
    except OutputError as err:
        return f"OutputError: {err}"
    return "ok"


def test_remote_urls_are_checked_through_fsspec():
    fs, base = fsspec.filesystem("memory"), f"bi-{uuid.uuid4().hex}"  # one memory filesystem per process
    fs.pipe(f"/{base}/file", b"x")
    fs.pipe(f"/{base}/foreign/a.bin", b"x")
    fs.pipe(f"/{base}/store/zarr.json", b"{}")
    with pytest.raises(OutputError, match=f"memory://{base}/file is a file"):
        check_output(f"memory://{base}/file")
    with pytest.raises(OutputError, match=r"non-empty folder \(a.bin\)"):
        check_output(f"memory://{base}/foreign", marks=("zarr.json",))
    with pytest.raises(OutputError, match="is a folder; pass a file URL"):
        check_output(f"memory://{base}/store", folder=False)
    check_output(f"memory://{base}/store", marks=("zarr.json",))
    check_output(f"memory://{base}/new", marks=("zarr.json",))


def test_output_path_turns_a_refusal_into_argparse_s_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        output_path()(str(tmp_path / "f"))
    assert output_path(convert=str)(str(tmp_path / "new")) == str(tmp_path / "new")


@pytest.mark.parametrize("parse, text, message", [
    (probability, "0", "must be in (0, 1], got 0"),
    (probability, "1.5", "must be in (0, 1], got 1.5"),
    (fraction, "1", "must be in [0, 1), got 1"),
    (nonnegative_float, "-0.5", "must be >= 0, got -0.5"),
    (positive_int, "0", "must be >= 1, got 0"),
    (positive_int, "2.5", "expected an integer, got '2.5'"),
    (number_in(int, 1, 100), "101", "must be in [1, 100], got 101"),
    (nonnegative_float, "inf", "expected a finite number, got inf"),
    (probability, "nan", "expected a finite number, got nan"),
])
def test_numeric_validators_name_the_range_and_the_value(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == message


def test_numeric_validators_accept_their_ends():
    assert probability("1") == 1.0 and fraction("0") == 0.0 and nonnegative_float("0") == 0.0
    assert number_in(int, 1, 100)("100") == 100 and math.isclose(probability("1e-9"), 1e-9)


def test_removed_if_refused_leaves_nothing_behind_a_refusal(tmp_path):
    run = tmp_path / "runs" / "name"
    with pytest.raises(UserError):
        with removed_if_refused(run):
            assert run.is_dir()
            raise UserError("refused")
    assert not (tmp_path / "runs").exists()  # every folder it made is gone
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError):
        with removed_if_refused(tmp_path / "kept" / "run") as made:
            (made / "mlflow.db").write_text("")  # a file: no longer ours to remove
            raise UserError("refused")
    assert (tmp_path / "kept" / "run" / "mlflow.db").exists()
    with removed_if_refused(tmp_path / "ok") as made:
        pass
    assert made.is_dir()


PRESETS = [("configs/debug_vae.yaml", load_train_config), ("configs/hvae_mnist.yaml", load_train_config),
           ("configs/debug_vqgan.yaml", load_train_config), ("configs/vqvae2_mnist.yaml", load_train_config),
           ("configs/debug_maskgit.yaml", load_prior_config), ("configs/debug_retrain_vqvae.yaml", load_retrain_config)]


def _numeric_keys(node: Any, path: str = "") -> list[str]:
    """Dotted keys of every int/float leaf of a validated config (sections, dataclasses, models)."""
    if isinstance(node, pydantic.BaseModel):
        children = {name: getattr(node, name) for name in type(node).model_fields}
    elif dataclasses.is_dataclass(node):
        children = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    else:
        return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []
    return [key for name, child in children.items() for key in _numeric_keys(child, f"{path}{name}.")]


@pytest.mark.parametrize("preset, load", PRESETS, ids=[Path(p).stem for p, _ in PRESETS])
def test_every_numeric_config_key_has_a_range(preset, load):
    """A huge negative value is outside every numeric field's range (seeds too: numpy's are
    non-negative): with every numeric key of the preset set to one, the one refusal lists every key.
    A new field without a bound (models.ranges, pydantic.Field) fails here."""
    keys = {key.rstrip(".") for key in _numeric_keys(load(REPO / preset))}
    with pytest.raises(ConfigError) as refused:
        load(REPO / preset, [f"{key}=-{10**18}" for key in sorted(keys)])
    named = {line.strip().split(": ")[0] for line in str(refused.value).splitlines()[1:]}
    assert len(keys) > 20 and keys - named == set(), keys - named
