"""Bad checkpoints are refused before Ray starts, with a reason that names the file and what is wrong."""

import json
import os
import pickle
import re
import shutil
import time

import pytest

import instagan.train as T
from instagan import checkpoint
from instagan.config import Config
from jobs import serve as serve_job
from jobs import translate as translate_job

TINY = {"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32},
        "train": {"ins_max": 4, "ins_per": 2, "batch_size": 1}}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return checkpoint.save(T.TrainState.create(Config.from_dict(TINY)), tmp_path_factory.mktemp("ck") / "good")


def _torn(d):
    data = (d / "state.pt").read_bytes()
    (d / "state.pt").write_bytes(data[: len(data) // 2])


def _tampered(d):
    with open(d / "state.pt", "wb") as f:
        pickle.dump({"format_version": 1, "G_ab": Evil()}, f)


def _unknown_key(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["ngf_typo"] = 8
    (d / "config.json").write_text(json.dumps(cfg))


def _wider_config(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["ngf"] = 16
    (d / "config.json").write_text(json.dumps(cfg))


def _lever_config(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["mask_cond"] = True
    (d / "config.json").write_text(json.dumps(cfg))


CASES = [
    ("torn state.pt", _torn, r"state.pt cannot be read with weights_only=True"),
    ("tampered state.pt", _tampered, r"state.pt cannot be read with weights_only=True"),
    ("config.json missing", lambda d: (d / "config.json").unlink(), r"has no config.json"),
    ("config.json not JSON", lambda d: (d / "config.json").write_text("{"), r"config.json: Expecting"),
    ("unknown config key", _unknown_key, r"config.json: unknown config key\(s\) in 'model': ngf_typo"),
    ("ngf disagrees with the weights", _wider_config, r"G_ab weights in state.pt do not fit .*ngf 16.*size mismatch"),
    ("a lever the weights lack", _lever_config, r"G_ab weights in state.pt do not fit .*mask_cond True"),
]


@pytest.mark.parametrize("kind, spoil, reason", CASES, ids=[c[0] for c in CASES])
def test_validate_names_the_file_and_the_reason(good, tmp_path, kind, spoil, reason):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    spoil(bad)
    with pytest.raises((ValueError, FileNotFoundError), match=reason):
        checkpoint.validate(bad)


def test_a_good_checkpoint_validates(good):
    assert checkpoint.validate(good).model.ngf == 8


@pytest.mark.parametrize("kind, spoil, reason", CASES[:1] + CASES[5:6], ids=["torn", "ngf"])
def test_jobs_refuse_a_bad_checkpoint_with_exit_2_before_ray(good, tmp_path, capsys, kind, spoil, reason):
    import ray

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    spoil(bad)
    (tmp_path / "in").mkdir()
    t0 = time.perf_counter()
    assert translate_job.main(["--checkpoint", str(bad), "--input", str(tmp_path / "in"),
                               "--out", str(tmp_path / "out")]) == 2
    assert serve_job.main(["--checkpoint", str(bad)]) == 2
    assert time.perf_counter() - t0 < 10 and not ray.is_initialized()
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and len(re.findall(reason, err)) == 2, err


def test_translate_refuses_an_out_that_is_a_file_before_ray(good, tmp_path, capsys):
    import ray

    (tmp_path / "in").mkdir()
    (tmp_path / "out.txt").write_text("not a folder")
    assert translate_job.main(["--checkpoint", str(good), "--input", str(tmp_path / "in"),
                               "--out", str(tmp_path / "out.txt")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not ray.is_initialized()
    assert (tmp_path / "out.txt").read_text() == "not a folder"
