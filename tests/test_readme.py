"""The README's configuration tables list exactly the keys the code accepts."""

import dataclasses
import re

import pytest

from config import ModelConfig, TrainConfig
from conftest import PROJECT_DIR


def documented_keys(heading):
    text = (PROJECT_DIR / "README.md").read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return [match.group(1) for match in re.finditer(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)]


@pytest.mark.parametrize("heading, config_class", [("model.json", ModelConfig), ("train.json", TrainConfig)])
def test_key_tables_match_the_config_classes(heading, config_class):
    assert documented_keys(heading) == [field.name for field in dataclasses.fields(config_class)]
