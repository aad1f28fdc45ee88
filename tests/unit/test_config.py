import pytest

from jcl_k8s.config import ConfigError, load_config

REQUIRED = ["data.url=/data", "output_url=/out"]


def test_presets_and_overrides_merge_with_types():
    config = load_config("pretrain", "small", overrides=[*REQUIRED, "epochs=3", "tau=0.1"])
    assert config.epochs == 3 and config.tau == 0.1
    assert config.model.arch == "resnet18" and config.data.image_size == 32
    paper = load_config("pretrain", "imagenet", overrides=REQUIRED)
    assert (paper.k_crops, paper.queue_size, paper.jcl_lambda, paper.tau) == (5, 65536, 2.0, 0.2)
    assert paper.model.arch == "resnet50" and paper.data.image_size == 224


def test_yaml_files_merge_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("epochs: 7\nmodel:\n  arch: resnet34\n")
    second.write_text("epochs: 9\n")
    config = load_config("pretrain", "small", [str(first), str(second)], REQUIRED)
    assert config.epochs == 9 and config.model.arch == "resnet34"


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=many", "epochs"),
        ("no_such_key=1", "unknown setting no_such_key"),
        ("model.depth=3", "unknown setting model.depth"),
        ("k_crops=1", "k_crops must be at least 2"),
        ("jcl=false", "set k_crops=2"),
        ("batch_size", "key=value"),
        ("data=3", "setting data is a group of settings"),
        ("data.image_size=0", "data.image_size must be at least 8"),
    ],
)
def test_bad_overrides_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("pretrain", "small", overrides=[*REQUIRED, override])


def test_missing_required_setting_is_named():
    with pytest.raises(ConfigError, match="output_url is required"):
        load_config("pretrain", "small", overrides=["data.url=/data"])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("pretrain", "tiny", overrides=REQUIRED)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("pretrain", "small", [str(tmp_path / "nope.yaml")], REQUIRED)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nmodel: [\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML at line"):
        load_config("pretrain", "small", [str(bad)], REQUIRED)
