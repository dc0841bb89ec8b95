"""Property-based tests of the config parser: malformed YAML and malformed values never escape as
anything but ConfigError, whose message names the source. At least 1,000 generated inputs per property."""
from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.config import ConfigError, JobConfig, example_config

SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
BASE = example_config().model_dump(mode="json")
FIELDS = [(s, f) for s, sec in BASE.items() if isinstance(sec, dict) for f in sec]


@SETTINGS
@given(st.text(alphabet=string.printable, max_size=300))
def test_arbitrary_text_is_config_error_or_valid(text):
    try:
        cfg = JobConfig.from_yaml(text, "fuzz.yaml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.yaml")
    else:
        assert JobConfig.from_yaml(cfg.to_yaml()) == cfg


@SETTINGS
@given(st.sampled_from(FIELDS), values)
@example(("model", "name_or_path"), "0\x850")  # Unicode line breaks, which PyYAML folds when written raw
@example(("data", "system_prompt"), "a\u2028b\u2029c")
def test_any_value_in_any_field(field, value):
    section, name = field
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data[section][name] = value
    try:
        cfg = JobConfig.parse(data, "job.yaml")
    except ConfigError as e:
        assert f"{section}." in str(e) or section in str(e), str(e)
    else:  # whatever was accepted round-trips exactly
        assert JobConfig.from_yaml(cfg.to_yaml()) == cfg


@SETTINGS
@given(st.dictionaries(st.text(max_size=12), values, max_size=6))
def test_unknown_or_wrong_sections(data):
    try:
        JobConfig.parse(data, "job.yaml")
    except ConfigError as e:
        assert str(e).startswith("job.yaml: ")
