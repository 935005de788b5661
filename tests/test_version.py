"""The version lives in one place: ``runner_spawn.__version__``; metadata and CHANGELOG follow it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import runner_spawn

ROOT = Path(__file__).resolve().parent.parent


def test_installed_metadata_reports_the_package_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", runner_spawn.__version__)
    assert metadata.version("runner-spawn") == runner_spawn.__version__


def test_pyproject_reads_the_version_from_the_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \[.*"version".*\]', project, re.M)
    assert not re.search(r"^version\s*=", project, re.M)
    assert 'version = { attr = "runner_spawn.__version__" }' in text


def test_changelog_starts_with_this_version() -> None:
    first = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert first is not None and first.group(1) == runner_spawn.__version__
