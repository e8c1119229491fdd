"""Style and Snakemake best-practice checks: snakemake --lint, snakefmt, ruff, schema."""

from __future__ import annotations

import subprocess

import yaml
from conftest import REPO, SNAKEMAKE, VENV_BIN


def _run(*cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)


def test_snakemake_lint_clean():
    result = _run(SNAKEMAKE, "--lint", "--configfile", str(REPO / "config" / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_clean():
    result = _run(str(VENV_BIN / "snakefmt"), "--check", "Snakefile", "rules/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean():
    check = _run(str(VENV_BIN / "ruff"), "check", ".")
    fmt = _run(str(VENV_BIN / "ruff"), "format", "--check", ".")
    assert check.returncode == 0, check.stdout
    assert fmt.returncode == 0, fmt.stdout


def test_every_config_key_has_a_description_and_a_default():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())

    def walk(node, path, need_default):
        for key, sub in node.get("properties", {}).items():
            sub = {**schema["$defs"].get(sub.get("$ref", "#/$defs/").split("/")[-1], {}), **sub}
            assert sub.get("description"), f"{path}{key} has no description"
            if need_default:
                assert "default" in sub, f"{path}{key} has no default"
            walk(sub, f"{path}{key}.", need_default and key not in ("overrides",))

    walk(schema, "", True)


def test_configuration_guide_is_generated_from_the_schema():
    """config/README.md (the workflow catalog's configuration page) says what the schema says."""
    from geofm import config

    assert (REPO / "config" / "README.md").read_text() == config.describe(), (
        "config/README.md is out of date; fix: .venv/bin/python -m geofm.config > config/README.md"
    )


def test_every_default_the_readme_states_is_the_schemas():
    """README phrases of the form `key` (default `value`) say what the schema's default is."""
    import re

    from geofm import config

    defaults = config.validate_schema({})
    stated = re.findall(r"`([a-z_][a-z0-9_.]*)` \(default `([^`]+)`", (REPO / "README.md").read_text())
    assert len(stated) >= 10, stated
    for key, value in stated:
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), f"README says {key} defaults to {value}; the schema says {node!r}"
