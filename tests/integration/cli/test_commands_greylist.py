"""`postwarden greylist` (show, pass, purge) against a real SQLite store in a temp dir."""

from __future__ import annotations

import json

from tests.integration.cli.conftest import Postwarden


def test_greylist_pass_show_and_purge(postwarden: Postwarden) -> None:
    marked = postwarden("greylist", "pass", "192.0.2.7", "Bounce-1234@Lists.Example", "bob@x.org")
    assert marked.exit_code == 0, marked.output
    assert "192.0.2.0/24 bounce-#@lists.example bob@x.org" in marked.stdout
    shown = json.loads(postwarden("greylist", "show", "--json").stdout)
    [triplet] = shown["triplets"]
    assert triplet["key"] == "192.0.2.0/24 bounce-#@lists.example bob@x.org"
    assert triplet["passes"] == 1
    assert "passed 1x" in postwarden("greylist", "show").stdout
    assert postwarden("greylist", "purge", "--expired").exit_code == 0
    assert len(json.loads(postwarden("greylist", "show", "--json").stdout)["triplets"]) == 1
    purged = postwarden("greylist", "purge", "--all")
    assert purged.exit_code == 0
    assert "1 triplets deleted" in purged.stdout
    assert json.loads(postwarden("greylist", "show", "--json").stdout)["triplets"] == []


def test_greylist_pass_refuses_a_bad_address(postwarden: Postwarden) -> None:
    result = postwarden("greylist", "pass", "not-an-ip", "a@b.org", "c@d.org")
    assert result.exit_code == 2
    assert "not an IP address" in result.stderr


def test_greylist_purge_takes_one_mode(postwarden: Postwarden) -> None:
    result = postwarden("greylist", "purge", "--all", "--expired")
    assert result.exit_code == 2
    assert "not both" in result.stderr
