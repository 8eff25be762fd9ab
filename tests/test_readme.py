"""The documentation: its configuration tables list exactly the keys the code accepts, the README
stays short, and every relative link in the README and docs/ leads to a file and heading that exist."""

import dataclasses
import re

import pytest

from config import ModelConfig, TrainConfig
from conftest import PROJECT_DIR

README = PROJECT_DIR / "README.md"
DOCUMENTS = [README, *sorted((PROJECT_DIR / "docs").glob("*.md"))]
MAX_README_LINES = 260


def documented_keys(heading):
    text = (PROJECT_DIR / "docs" / "configuration.md").read_text()
    section = re.split(rf"^#+ {re.escape(heading)}\n", text, maxsplit=1, flags=re.MULTILINE)[1]
    section = section.split("\n#", 1)[0]
    return [match.group(1) for match in re.finditer(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)]


@pytest.mark.parametrize("heading, config_class", [("model.json", ModelConfig), ("train.json", TrainConfig)])
def test_key_tables_match_the_config_classes(heading, config_class):
    assert documented_keys(heading) == [field.name for field in dataclasses.fields(config_class)]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def prose(text):
    """The text outside fenced code blocks and inline code, where links and headings live."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path):
    """The anchors GitHub gives a file's headings: lower case, punctuation but - and _ dropped,
    spaces to hyphens, a repeated anchor numbered -1, -2, ..."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        numbered, count = anchor, 0
        while numbered in anchors:
            count += 1
            numbered = f"{anchor}-{count}"
        anchors.add(numbered)
    return anchors


def broken_links(document):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(document.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        name = linked.relative_to(PROJECT_DIR).as_posix() if linked.is_relative_to(PROJECT_DIR) else str(linked)
        if not linked.exists():
            broken.append(f"{target}: no file {name}")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {name}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(PROJECT_DIR).as_posix())
def test_relative_links_resolve(document):
    assert broken_links(document) == []
