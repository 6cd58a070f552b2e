"""One source of truth for config keys: docs/config.md and `rf2 --help` are generated from
rf2/core/config.py, and the YAML files in conf/ do not restate its defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from rf2.cli import config_docs
from rf2.cli.main import main
from rf2.core.config import RunConfig
from rf2.core.typed import to_dict

REGENERATE = "run `python -m rf2.cli.config_docs --write` and commit the result"
# Keys a group file keeps even at their default: they say which option the file is.
DISCRIMINATORS = {"name", "mode", "profile", "backend", "_target_"}


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def test_docs_config_md_and_the_help_template_are_up_to_date() -> None:
    assert config_docs.DOCS.read_text(encoding="utf-8") == config_docs.render_markdown(), \
        f"docs/config.md is out of date: {REGENERATE}"
    assert config_docs.HELP.read_text(encoding="utf-8") == config_docs.help_yaml(), \
        f"conf/hydra/help/rf2.yaml is out of date: {REGENERATE}"


def test_every_key_is_documented_with_type_default_and_description() -> None:
    keys = {k.key: k for k in config_docs.all_keys()}
    scalar_leaves = {key for key, _ in _leaves(to_dict(RunConfig())) if key != "fault_injection"}
    # every leaf of the schema's defaults is a documented key (mappings count as one key)
    assert {k for k in scalar_leaves if k.split(".")[0] != "fault_injection"} <= set(keys)
    undocumented = sorted(k for k, doc in keys.items() if not doc.description)
    assert not undocumented, (f"add a comment above these fields in rf2/core/config.py, "
                              f"then {REGENERATE}: {undocumented}")
    beam = keys["model.index.beam"]
    assert (beam.type, beam.default) == ("int", 16) and "beam search" in beam.description
    assert "an integer >= 1" in beam.allowed
    assert keys["strategy.server_optimizer"].type == "one of 'none', 'adagrad', 'adam', 'yogi', 'momentum'"
    assert keys["fault_injection[].kind"].default == "raise"
    text = config_docs.DOCS.read_text(encoding="utf-8")
    assert "| `model.index.ttt` | bool | `false` |" in text
    assert "- `two_tower`: Two-tower retrieval model" in text  # the group's options


def test_group_files_state_only_what_differs_from_the_schema() -> None:
    defaults = to_dict(RunConfig())
    restated, unknown = [], []
    for path in sorted((REPO / "conf").glob("*/*.yaml")):
        group = path.parent.name
        if group in ("experiment", "arm", "hydra"):
            continue  # experiments and arms compose groups on purpose; hydra/ is Hydra's
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, value in _leaves(data):
            node: Any = defaults[group]
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            top = key.split(".")[0]
            if node is KeyError and not isinstance(defaults[group].get(top), dict):
                unknown.append(f"{path.relative_to(REPO)}: {key}")
            elif node == value and key not in DISCRIMINATORS:
                restated.append(f"{path.relative_to(REPO)}: {key}: {value!r}")
    assert not unknown, f"keys the schema does not have: {unknown}"
    assert not restated, ("these repeat rf2/core/config.py's default (delete them, or change "
                          f"the default there): {restated}")


def test_config_yaml_holds_only_the_defaults_list_and_hydra_settings() -> None:
    data = yaml.safe_load((REPO / "conf" / "config.yaml").read_text(encoding="utf-8"))
    assert set(data) == {"defaults", "hydra"}, "run values belong in rf2/core/config.py"
    assert {"override hydra/help": "rf2"} in data["defaults"]


def test_help_narrows_to_a_prefix(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["rf2", "--help", "model.index"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "model.index.beam" in out and "model.index.ttt_lr" in out
    assert "model.dim" not in out and "seed" not in out
    monkeypatch.setattr(sys, "argv", ["rf2", "--help", "strategy"])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    assert "strategy= options" in out and "fedprox" in out and "strategy.proximal_mu" in out
    monkeypatch.setattr(sys, "argv", ["rf2", "--help", "modle"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "'modle'" in err[0] and "model.index" in err[0]


@pytest.mark.slow  # starts the rf2 command
def test_rf2_help_lists_groups_and_described_keys(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rf2", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "model: fcf, hier_index, two_tower" in out  # Hydra's $APP_CONFIG_GROUPS
    assert "model.index.anneal_steps" in out and "Steps from min_alpha to max_alpha" in out
    assert "rf2 --help PREFIX" in out and "Powered by Hydra" not in out
    assert not list(tmp_path.iterdir())  # help creates no run folder
