"""Entra device filter rules: parsing, matching, and null attributes of unregistered devices."""

from __future__ import annotations

import pytest

from gateway.policy.device_filter import RuleSyntaxError, parse_rule

SURFACE = {"deviceOwnership": "Company", "model": "Surface Pro 9", "manufacturer": "Microsoft",
           "isCompliant": True, "operatingSystem": "Windows", "extensionAttribute1": "SharedDevice"}


@pytest.mark.parametrize(
    ("rule", "device", "matches"),
    [
        ('device.deviceOwnership -eq "Company" -and device.model -startsWith "Surface"', SURFACE, True),
        ('device.deviceOwnership -eq "Personal" -and device.model -startsWith "Surface"', SURFACE, False),
        ('device.deviceOwnership -eq "Personal" -or device.model -startsWith "Surface"', SURFACE, True),
        ('device.model -eq "surface pro 9"', SURFACE, True),
        ('device.model -endsWith "9"', SURFACE, True),
        ('device.model -contains "Pro"', SURFACE, True),
        ('device.model -notContains "Pro"', SURFACE, False),
        ('device.manufacturer -in ["Apple", "Microsoft"]', SURFACE, True),
        ('device.manufacturer -notIn ["Apple", "Microsoft"]', SURFACE, False),
        ("device.isCompliant -eq True", SURFACE, True),
        ("device.isCompliant -eq False", SURFACE, False),
        ('device.extensionAttribute1 -eq "SharedDevice"', SURFACE, True),
        ('(device.model -eq "x" -or device.model -startsWith "Surf") -and device.operatingSystem -eq "Windows"',
         SURFACE, True),
        ('device.trustType -eq "AzureAD"', SURFACE, False),
        ('device.trustType -ne "AzureAD"', SURFACE, True),
        ('DEVICE.MODEL -STARTSWITH "Surface"', SURFACE, True),
    ],
)
def test_rule_matches_registered_device(rule: str, device: dict[str, object], matches: bool) -> None:
    assert parse_rule(rule).matches(device) is matches  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        pytest.param('device.deviceOwnership -eq "Company"', False, id="-eq never matches null"),
        pytest.param('device.model -startsWith "Surface"', False, id="-startsWith never matches null"),
        pytest.param('device.manufacturer -in ["Apple"]', False, id="-in never matches null"),
        pytest.param('device.deviceOwnership -ne "Company"', True, id="-ne matches null"),
        pytest.param('device.model -notStartsWith "Surface"', True, id="-notStartsWith matches null"),
        pytest.param('device.manufacturer -notIn ["Apple"]', True, id="-notIn matches null"),
    ],
)
def test_unregistered_device_has_null_attributes(rule: str, matches: bool) -> None:
    assert parse_rule(rule).matches(None) is matches


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('device.colour -eq "red"', "'device.colour' is not a device attribute"),
        ('device.model -like "x"', "'-like' is not an operator"),
        ('device.model -eq', "expected a quoted value, True or False, found the end of the rule"),
        ('device.model -in "x"', "-in takes a [list]"),
        ('device.model -eq ["x"]', "-eq takes one value"),
        ('device.model -eq "x" -and', "expected 'device.<attribute>', found the end of the rule"),
        ('(device.model -eq "x"', "expected ')', found the end of the rule"),
        ('device.model -eq "x" device.model', "unexpected 'device.model' after a complete rule"),
        ('device.model -eq "x" ; drop', "cannot read the rule at character 22"),
    ],
)
def test_rule_syntax_errors_say_what_was_expected(rule: str, message: str) -> None:
    with pytest.raises(RuleSyntaxError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_rule(rule)
