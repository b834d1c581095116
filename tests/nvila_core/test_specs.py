import pytest
from omegaconf import OmegaConf

from nvila.core.errors import NvilaError, SpecError
from nvila.core.specs import build, describe, field_docs, parse_inline, resolve, to_spec, validate_all


def test_values_are_coerced_to_the_config_types(registry):
    # jsonargparse passes dict items from the command line as strings
    _, config = resolve("compressor", {"name": "stc", "ratio": "3"}, registry)
    assert config.ratio == 3


def test_every_problem_of_a_spec_is_reported_at_once(registry):
    with pytest.raises(SpecError) as info:
        resolve("encoder", {"name": "siglip", "num_layrs": 2, "image_size": "big", "feature_layer": 1.5},
                registry)
    problems = info.value.problems
    assert len(problems) == 3
    assert any("'num_layrs'" in p and "Did you mean 'num_layers'" in p for p in problems)
    assert any("'image_size'" in p and "int" in p for p in problems)
    assert "nvila plugins --describe siglip" in str(info.value)


def test_checks_in_the_config_itself_are_reported_with_the_plugin(registry):
    with pytest.raises(SpecError, match=r"(?s)compressor 'stc'.*key 'ratio' = 0 is out of range.*valid range 1\.\."):
        resolve("compressor", {"name": "stc", "ratio": 0}, registry)


@pytest.mark.parametrize("key", ["_target_", "class_path"])
def test_specs_never_name_import_paths(registry, key):
    with pytest.raises(SpecError, match="never name import paths"):
        resolve("compressor", {"name": "stc", key: "os.system"}, registry)


def test_a_missing_name_lists_the_choices(registry):
    with pytest.raises(SpecError, match="'name' is missing; choose one of: .*identity, .*stc"):
        resolve("compressor", {"ratio": 2}, registry)


def test_a_bare_string_names_a_plugin_with_defaults(registry):
    compressor = build("compressor", "stc", registry, in_channels=4)
    assert compressor.k == 2


def test_validate_all_collects_problems_across_components(registry):
    with pytest.raises(NvilaError) as info:
        validate_all({"model.compressor": ("compressor", {"name": "stc", "ratoi": 2}),
                      "model.llm": ("llm", {"name": "qwen3"})}, registry)
    text = str(info.value)
    assert "model.compressor" in text and "Did you mean 'ratio'" in text
    assert "model.llm" in text and "Did you mean 'qwen2'" in text


def test_configs_round_trip_through_specs_and_yaml(registry):
    component, config = resolve("encoder", {"name": "siglip", "hidden_size": 48}, registry)
    spec = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(to_spec(component, config))))
    assert resolve("encoder", spec, registry)[1] == config


def test_field_docstrings_feed_describe(registry):
    component = registry.get("compressor", "stc")
    assert "Side k of the square block" in field_docs(component.config)["ratio"]
    text = describe(component)
    assert "ratio: int = 2" in text and "from nvila" in text


def test_a_spec_typed_on_the_command_line_is_a_name_or_safe_inline_yaml():
    assert parse_inline("deltaloss") == {"name": "deltaloss"}
    assert parse_inline(" {name: w4a16, method: rtn, group_size: 64} ") == {
        "name": "w4a16", "method": "rtn", "group_size": 64}
    for bad in ("{name: [", "{name: !!python/object/apply:os.system [echo]}"):
        with pytest.raises(SpecError, match="not valid YAML.*write it like"):
            parse_inline(bad)
