"""fastsd.settings: every variable read in one place, by one rule per kind, against its documentation."""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from fastsd.errors import ConfigurationError
from fastsd.settings import VARIABLES, Settings
from fastsd_testing.helpers import PROJECT_ROOT


def documented() -> dict[str, tuple[str, str]]:
    """docs/settings.md's table: variable -> (default, allowed)."""
    rows = {}
    for line in (PROJECT_ROOT / "docs" / "settings.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_the_documented_table_is_the_settings():
    assert list(documented()) == [variable.name for variable in VARIABLES]
    for variable in VARIABLES:
        assert documented()[variable.name] == (variable.default, variable.allowed), variable.name
    assert {variable.field for variable in VARIABLES} == {field.name for field in fields(Settings)}


def test_an_unset_environment_gives_the_documented_defaults():
    assert Settings.from_environment({}) == Settings()
    for variable in VARIABLES:
        shown = documented()[variable.name][0].strip("`")
        value = getattr(Settings(), variable.field)
        if shown in ("unset", "none"):
            assert value in (None, ()), variable.name
        elif shown in ("on", "off"):
            assert value is (shown == "on") or (variable.name == "FASTSD_COMPILE" and value is None), variable.name
        elif re.fullmatch(r"[\d.]+", shown):
            assert value == float(shown) or (value is None and variable.name.startswith("FASTSD_REALTIME")), (
                variable.name
            )


@pytest.mark.parametrize("written", ["1", "on", "ON", " On ", "true", "TRUE", "yes", "Yes"])
def test_every_switch_reads_on_alike(written):
    environment = {"FASTSD_GRAPHS": written, "FASTSD_SAFETY_CHECKER": written, "FASTSD_NO_PGET": written}
    settings = Settings.from_environment(environment)
    assert settings.graphs and settings.safety_checker and settings.no_pget


@pytest.mark.parametrize("written", ["0", "off", "OFF", "false", "no", "No"])
def test_every_switch_reads_off_alike(written):
    settings = Settings.from_environment({"FASTSD_GRAPHS": written, "FASTSD_SAFETY_CHECKER": written})
    assert not settings.graphs and not settings.safety_checker


@pytest.mark.parametrize(
    ("environment", "sentence"),
    [
        ({"FASTSD_COMPILE": "sometimes"}, "FASTSD_COMPILE='sometimes' is not allowed; write off (the default), on, "),
        ({"FASTSD_GRAPHS": "always"}, "FASTSD_GRAPHS='always' is not allowed; write on or off"),
        ({"FASTSD_SAFETY_CHECKER": "maybe"}, "FASTSD_SAFETY_CHECKER='maybe' is not allowed"),
        (
            {"FASTSD_DTYPE": "float8"},
            "FASTSD_DTYPE='float8' is not allowed; choose one of: float32, float16, bfloat16.",
        ),
        ({"FASTSD_LORAS_LOADED": "0"}, "FASTSD_LORAS_LOADED must be a whole number from 1 to 64, got '0'."),
        ({"FASTSD_LORA_MAX_MB": "lots"}, "FASTSD_LORA_MAX_MB must be a number of at least 0.001, got 'lots'."),
        ({"FASTSD_METRICS_PORT": "99999"}, "FASTSD_METRICS_PORT must be a whole number from 1 to 65535"),
        ({"FASTSD_REALTIME_IDLE_TIMEOUT": "-1"}, "FASTSD_REALTIME_IDLE_TIMEOUT must be a number of at least"),
    ],
)
def test_a_value_not_allowed_is_one_sentence_naming_the_variable(environment, sentence):
    with pytest.raises(ConfigurationError) as error:
        Settings.from_environment(environment)
    assert str(error.value).startswith(sentence) and str(error.value).endswith(".")


def test_compile_takes_a_switch_regional_or_a_mode():
    assert Settings.from_environment({"FASTSD_COMPILE": "1"}).compile == "best"
    assert Settings.from_environment({"FASTSD_COMPILE": "Regional"}).compile == "regional"
    assert Settings.from_environment({"FASTSD_COMPILE": "reduce-overhead"}).compile == "reduce-overhead"
    assert Settings.from_environment({"FASTSD_COMPILE": "off"}).compile is None


def test_a_scripts_option_wins_over_the_environment():
    settings = Settings.from_environment({"FASTSD_VARIANT": "sdxl-turbo"}, variant="sd15-lcm")
    assert settings.variant == "sd15-lcm"


def environment_readers(folder: Path) -> list[str]:
    """Every place under folder that reads or writes os.environ (or getenv)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    return found


def test_only_the_settings_module_reads_the_environment():
    readers = environment_readers(PROJECT_ROOT / "fastsd")
    assert readers and all(reader.startswith("fastsd/settings.py:") for reader in readers), readers
    assert environment_readers(PROJECT_ROOT / "scripts") == []  # scripts take options, and fastsd.settings
