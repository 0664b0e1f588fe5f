import pytest

from avssl.config import dump_yaml, load_config, preset_names
from avssl.errors import ConfigError


def test_presets_load_and_differ():
    assert {"tiny", "paper"} <= set(preset_names())
    tiny, paper = load_config("tiny"), load_config("paper")
    assert tiny.preset == "tiny" and paper.preset == "paper"
    assert paper.model.audio_encoder.base_channels == 16
    assert paper.model.audio_encoder.code_dim == 256 and paper.model.identity_encoder.base_channels == 64
    assert tiny.model.audio_encoder.code_dim < paper.model.audio_encoder.code_dim


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["train.epochs=7", "objective.w_audio=0.25", "train.use_gpu=true", "evaluate.seeds=[1,2]"])
    assert cfg.train.epochs == 7 and cfg.objective.w_audio == 0.25
    assert cfg.train.use_gpu is True and cfg.evaluate.seeds == [1, 2]


def test_unknown_field_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"has no field 'epoch'; did you mean 'train.epochs'"):
        load_config("tiny", ["train.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.lrate: unknown field"):
        load_config(str(bad))


def test_invalid_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.placement_strategy=RANDOM"])
    assert "train.placement_strategy" in str(e.value) and "'PACK'" in str(e.value) and "'SPREAD'" in str(e.value)
    with pytest.raises(ConfigError, match=r"train.epochs: .*greater than or equal to 1"):
        load_config("tiny", ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"synth.split"):
        load_config("tiny", ["synth.split=[0.5,0.5,0.5]"])


def test_unknown_registry_names_fail_at_load():
    with pytest.raises(ConfigError, match=r"objective.name: unknown objective 'avv'; did you mean 'av'"):
        load_config("tiny", ["objective.name=avv"])
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[1\]: unknown downstream task 'emotions'"):
        load_config("tiny", ["evaluate.tasks=[word,emotions]"])


def test_extends_and_paths_are_absolute(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: paper\ntrain:\n  epochs: 3\ndata:\n  corpus: rel/corpus\n")
    cfg = load_config(str(f), base_dir=tmp_path)
    assert cfg.train.epochs == 3 and cfg.model.audio_encoder.code_dim == 256
    assert cfg.data.corpus == str(tmp_path / "rel/corpus")


def test_unknown_config_source_lists_presets():
    with pytest.raises(ConfigError, match="neither a file nor a preset; presets: .*tiny"):
        load_config("nope")


def test_dump_round_trips():
    import yaml

    cfg = load_config("tiny", ["seed=5"])
    again = yaml.safe_load(dump_yaml(cfg))
    assert again["seed"] == 5 and again["train"]["epochs"] == cfg.train.epochs


@pytest.mark.parametrize("argv, config, overrides", [
    (["study", "datasize", "--config", "quickstart", "study.methods=[a,b]"], "quickstart", ["study.methods=[a,b]"]),
    (["study", "datasize", "a.b=1", "--config", "quickstart", "c.d=2"], "quickstart", ["a.b=1", "c.d=2"]),
    (["pretrain", "train.epochs=1", "-c", "tiny"], "tiny", ["train.epochs=1"]),
])
def test_config_option_and_overrides_go_in_any_order(argv, config, overrides):
    from avssl.cli import build_parser, parse

    args = parse(build_parser(), argv)
    assert args.config == config and args.overrides == overrides


def test_unknown_options_are_still_refused(capsys):
    from avssl.cli import build_parser, parse

    with pytest.raises(SystemExit):
        parse(build_parser(), ["study", "datasize", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
