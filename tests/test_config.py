from pathlib import Path

import pytest

from lift3d.config import ConfigError, Schedule, build_run_config, dump_config, load_config

QUICKSTART = "configs/quickstart.yaml"


def test_quickstart_preset_loads_with_overrides():
    config = load_config(QUICKSTART, ["trainer.steps=7", "guidance.guidance_scale=2", "trainer.cameras.width=32"])
    assert config.trainer.steps == 7
    assert config.guidance.guidance_scale == 2.0
    assert config.trainer.cameras.width == 32
    assert config.name == "quickstart"


def test_schedule_from_number_and_mapping():
    config = load_config(QUICKSTART, ["guidance.timesteps.max_step_percent={start: 0.98, end: 0.5, start_step: 10, kind: step}"])
    schedule = config.guidance.timesteps.max_step_percent
    assert isinstance(schedule, Schedule) and schedule(9) == 0.98 and schedule(10) == 0.5
    assert load_config(QUICKSTART, ["guidance.timesteps.min_step_percent=0.1"]).guidance.timesteps.min_step_percent(0) == 0.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.stepz=3", "unknown key 'trainer.stepz' (did you mean 'steps'?)"),
        ("trainer.steps=many", "trainer.steps: expected an integer"),
        ("guidance.type=nope", "unknown guidance type 'nope'; choose one of: "),
        ("guidance.weighting=bogus", "choose one of sds, uniform, fantasia3d"),
        ("teacher.resolutionn=3", "unknown key 'teacher.resolutionn'"),
        ("representation.sh_degree=7", "sh_degree must be 0..3"),
        ("bogus=1", "unknown key 'bogus'"),
        ("trainer.cameras.elevation_range_deg=[1, 2, 3]", "expected 2 values"),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_type_lists_choices():
    with pytest.raises(ConfigError, match="sds"):
        load_config(QUICKSTART, ["guidance.type=nope"])


def test_missing_prompt_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "c.yaml").write_text("representation: {type: gaussians}\nteacher: {type: analytic}\nguidance: {type: sds}\n")
    with pytest.raises(ConfigError, match="'prompt' must be a non-empty string"):
        load_config(tmp_path / "c.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(QUICKSTART, ["trainer.steps=5", "guidance.timesteps.max_step_percent={start: 0.9, end: 0.5, end_step: 4, kind: linear}"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


def test_float_overrides_accept_exponent_spellings_yaml_reads_as_strings():
    # PyYAML (YAML 1.1) reads "1e-5" as a string; a float field must still take it.
    config = load_config(QUICKSTART, ["guidance.type=vsd", "guidance.student_lr=1e-5"])
    assert config.guidance.student_lr == 1e-5
    with pytest.raises(ConfigError, match="student_lr: expected a number, got 'fast'"):
        load_config(QUICKSTART, ["guidance.type=vsd", "guidance.student_lr=fast"])


PRESETS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_and_validates(preset):
    from lift3d.amortized.train import is_amortized, load_amortized_config
    from lift3d.pipeline import is_pipeline, load_pipeline

    if is_amortized(PRESETS / preset):  # `lift3d amortized` presets: a corpus instead of a prompt
        config = load_amortized_config(PRESETS / preset)
        assert config.trainer.steps > 0 and config.corpus
        return
    if is_pipeline(PRESETS / preset):  # every stage validates
        configs = [build_run_config(stage.data) for stage in load_pipeline(PRESETS / preset).stages]
    else:
        configs = [load_config(PRESETS / preset)]
    for config in configs:
        assert config.trainer.steps > 0 and config.prompt


def test_overrides_reach_list_entries_by_index_or_name():
    hybrid = "configs/quickstart-4d.yaml"
    config = load_config(hybrid, ["guidance.entries.1.weight=0.3", "guidance.entries.image.teacher.marginal_times=8",
                                  "guidance.entries.-1.guidance.guidance_scale=2"])
    image, clip = config.guidance.entries
    assert clip.weight == 0.3 and image.teacher.marginal_times == 8 and clip.guidance.guidance_scale == 2.0
    assert image.weight == 1.0  # untouched entries stay as the preset has them
    with pytest.raises(ConfigError, match=r"'2' is not an entry of that list; use an index 0\.\.1 or one of the names image, clip"):
        load_config(hybrid, ["guidance.entries.2.weight=1"])
    with pytest.raises(ConfigError, match="'video' is not an entry"):
        load_config(hybrid, ["guidance.entries.video.weight=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'guidance.entries\[1\]\.weigth' \(did you mean 'weight'\?\)"):
        load_config(hybrid, ["guidance.entries.clip.weigth=1"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config(QUICKSTART, ["trainer.steps.x=1"])
