"""Config: dict round trip, unknown keys and bad values are errors naming the key."""

import json

import pytest

from instagan.config import Config


def test_round_trip_through_json():
    cfg = Config.from_dict({"model": {"ngf": 16}, "train": {"lr_d": 2e-4, "ins_per": 1}})
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.model.ngf == 16 and again.model.ndf == 64


def test_defaults_are_the_papers():
    cfg = Config()
    assert (cfg.loss.lambda_cyc, cfg.loss.lambda_idt, cfg.loss.lambda_ctx) == (10, 10, 10)
    assert (cfg.train.lr_g, cfg.train.lr_d, cfg.train.beta1, cfg.train.beta2) == (2e-4, 1e-4, 0.5, 0.999)
    assert (cfg.train.ins_max, cfg.train.ins_per, cfg.train.pool_size) == (4, 2, 50)


@pytest.mark.parametrize("values, match", [
    ({"modle": {}}, "unknown config section.*modle"),
    ({"train": {"lr": 1e-3}}, r"unknown config key\(s\) in 'train': lr"),
    ({"train": {"ins_per": "two"}}, "train.ins_per' expects int"),
    ({"train": {"ins_per": 1.5}}, "train.ins_per' expects int"),
    ({"data": {"flip": "maybe"}}, "data.flip' expects bool"),
    ({"data": {"size": 30}}, "multiple of 4"),
    ({"train": {"ins_per": 0}}, "must be >= 1"),
    ({"model": 3}, "must be a mapping"),
    # numeric ranges: the key and the bound in the message
    ({"model": {"ngf": 0}}, r"'model.ngf' must be >= 1, got 0"),
    ({"model": {"n_blocks": -1}}, r"'model.n_blocks' must be >= 0, got -1"),
    ({"train": {"pool_size": -1}}, r"'train.pool_size' must be >= 0"),
    ({"train": {"epochs": -5}}, r"'train.epochs' must be >= 0"),
    ({"train": {"lr_g": float("nan")}}, r"'train.lr_g' must be a finite number"),
    ({"train": {"lr_d": 0}}, r"'train.lr_d' must be > 0"),
    ({"train": {"beta2": 1.0}}, r"'train.beta2' must be < 1"),
    ({"loss": {"lambda_ctx": -1}}, r"'loss.lambda_ctx' must be >= 0"),
    ({"loss": {"lambda_seg": "inf"}}, r"'loss.lambda_seg' must be a finite number"),
    ({"run": {"cpus_per_worker": float("nan")}}, r"'run.cpus_per_worker' must be a finite number"),
    ({"run": {"name": ".."}}, r"run.name must be a folder name inside the storage path"),
])
def test_bad_config_is_a_clear_error(values, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict(values)


def test_replace_by_dotted_key():
    cfg = Config().replace(**{"train.ins_per": "3", "data.flip": "false"})
    assert cfg.train.ins_per == 3 and cfg.data.flip is False
    with pytest.raises(ValueError, match="unknown config key"):
        Config().replace(**{"nope": 1})


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  ngf: 16\n train: [\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML(.|\n)*{path}\", line 3"):
        Config.from_file(path)
