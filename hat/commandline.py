"""What a command line asks of the runner, read as Sacred reads it.

``with`` updates are parsed by Sacred's own parser (`sacred.arg_parser.get_config_updates`:
``key=value`` literals, dotted keys, named configs); `selected` gives the model and
dataset they choose (the registry's defaults first), `unknown_key` names a key that the
chosen model does not have, `with_recorded_model` adds ``model=M`` for a project
checkpoint of model M before Sacred builds the configuration (a model's keys exist only
when it is selected), and `recorded_updates` / `recorded_notes` take the configuration
recorded in project checkpoints (test_only, the gallery, an ensemble, fine-tuning).
"""
from __future__ import annotations

import difflib
import os

from sacred.arg_parser import get_config_updates

from hat import checks
from hat.checkpoint import CheckpointError, recorded_config
from hat.defaults import default_config, default_selectors
from hat.plugins import model_names


def parsed_updates(updates) -> tuple[dict, list[str]]:
    """(config updates, named configs) of a command line's ``with`` words, as Sacred parses them."""
    return get_config_updates(list(updates or []))


def selected(config_updates: dict, named_configs: list[str], named: dict) -> dict:
    """{"model", "dataset"} that the updates choose: the registry's defaults, then the named
    configs in order (``named``: name -> the values it sets), then ``key=value`` (which
    Sacred applies last)."""
    choice = default_selectors()
    for values in [named.get(name, {}) for name in named_configs] + [config_updates]:
        choice.update({key: value for key, value in values.items() if key in choice and isinstance(value, str)})
    return choice


def unknown_key(updates, named: dict) -> str | None:
    """A one-line message for the first ``with`` key that the selected model's
    configuration does not have (None: every key is known)."""
    config_updates, named_configs = parsed_updates(updates)
    choice = selected(config_updates, named_configs, named)
    if choice["model"] not in model_names():
        return None  # validate_config names the valid models
    known = set(default_config(choice["model"], choice["dataset"]))
    for key in config_updates:
        if key in known:
            continue
        owners = [name for name in model_names() if name != choice["model"] and key in default_config(name)]
        if owners:
            return f"{key} is a key of model={owners[0]}, not of model={choice['model']}; leave it out"
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown config key {key}; {hint}(python run.py print_config lists the keys)"
    return None


def with_recorded_model(argv: list[str], named: dict) -> list[str]:
    """``argv`` with ``model=M`` added when it names a project checkpoint of model M
    (checkpoint=, or the first of ensemble=) and selects no model itself: a checkpoint of
    another model than the default needs no named config to select it."""
    if "with" not in argv:
        return argv
    config_updates, named_configs = parsed_updates(argv[argv.index("with") + 1:])
    if "model" in config_updates or any("model" in named.get(name, {}) for name in named_configs):
        return argv
    ensemble = config_updates.get("ensemble")
    for path in (config_updates.get("checkpoint"), ensemble[0] if isinstance(ensemble, list) and ensemble else None):
        if isinstance(path, str) and os.path.isfile(path):
            try:
                recorded = recorded_config(path) or {}
            except CheckpointError:
                return argv  # the configuration hook says what is wrong with it
            model = recorded.get("model")
            if model in model_names() and model != default_selectors()["model"]:
                return [*argv, f"model={model}"]
    return argv


def _recorded_members(config) -> list[tuple[str, dict]]:
    """(path, recorded configuration) of the run's project checkpoints (ensemble= or
    checkpoint=); released files record nothing."""
    paths = [str(p) for p in (config.get("ensemble") or [config["checkpoint"]]) if p and os.path.isfile(str(p))]
    if not paths or config["model"] not in model_names():
        return []
    members = [(path, recorded_config(path)) for path in paths]
    return [(path, recorded) for path, recorded in members if recorded]


def changed_keys(config) -> set:
    """The keys of ``config`` that differ from the defaults of its model and dataset (what
    named configs and updates changed), and ``model`` when it is not the default one."""
    defaults = default_config(config["model"], config["dataset"], demo_recipe=config["demo_recipe"])
    changed = {key for key, value in config.items() if key not in defaults or defaults[key] != value}
    return changed | ({"model"} if config["model"] != default_selectors()["model"] else set())


def recorded_updates(config, given: set | None = None) -> tuple[dict, list[str]]:
    """A run of project checkpoints: the configuration they record, for the keys not
    ``given`` (default: the keys that differ from the defaults), and the notes of given
    scoring keys (`hat.checks.checkpoint_config_updates`); an ensemble's members share one
    architecture. ({}, []) for released files or no checkpoint."""
    members = _recorded_members(config)
    if not members:
        return {}, []
    checks.check_one_architecture(config["model"], members)
    given = changed_keys(config) if given is None else given
    return checks.checkpoint_config_updates(config, members[0][1], given, path=members[0][0],
                                            fine_tune=not config["test_only"])


def recorded_notes(config, meta_info: dict) -> list[str]:
    """The notes (and refusals) of the keys a started run's command line gave
    (``meta_info["config_updates"]``: what Sacred parsed) against its checkpoints' recorded
    configuration; a given key equal to its default counts too."""
    given = changed_keys(config) | set(meta_info.get("config_updates") or {})
    return recorded_updates(config, given)[1]
