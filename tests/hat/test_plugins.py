"""The toolkit's shape: shared modules import no model; models are found by name."""
import ast
import os

from tests.conftest import ROOT

SHARED = ["backbones", "checkpoint", "checks", "commandline", "defaults", "distributed", "evaluation", "loop",
          "plugins", "recording", "retrieval", "run_folders"]


def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):  # top-level and function-level imports alike
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_shared_modules_import_no_model():
    # (hat/__init__.py is the package's public face: it registers the built-in models)
    found = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "hat"))
                   if name.endswith(".py") and name != "__init__.py")
    assert set(SHARED) <= set(found)
    for name in found:
        imports = imported_modules(os.path.join(ROOT, "hat", f"{name}.py"))
        assert not [m for m in imports if m.startswith("hat.models")], name
    for name in ("run.py", "hat/loop.py"):
        assert not [m for m in imported_modules(os.path.join(ROOT, name)) if m.startswith("hat.models")], name


def test_the_shared_evaluation_and_the_runner_name_no_model_and_no_level():
    with open(os.path.join(ROOT, "hat", "evaluation.py")) as handle:
        assert "level" not in handle.read().lower()  # HAT's levels live in hat/models/hat/evaluation.py
    with open(os.path.join(ROOT, "run.py")) as handle:
        source = handle.read()
    assert not [name for name in ('"hat"', "'hat'", "multisea", "HAT", "Multi-SEA") if name in source]


def test_built_in_models_are_registered_with_what_the_toolkit_calls():
    import hat.models  # noqa: F401
    from hat.plugins import ModelPlugin, get_plugin, model_names

    assert {"hat", "multisea"} <= set(model_names())
    for name in ("hat", "multisea"):
        plugin = get_plugin(name)
        assert issubclass(plugin, ModelPlugin) and plugin.name == name and plugin.config is not None
        for method in ("build", "training_data", "loss", "optimizer", "scheduler", "evaluate"):
            assert getattr(plugin, method) is not getattr(ModelPlugin, method), (name, method)
        assert plugin.released_module and not plugin.is_released({"unrelated.weight": None})


def test_a_taken_name_or_a_missing_required_member_is_refused_in_one_line():
    import pytest

    from hat.plugins import ModelPlugin, get_plugin, register
    from tests.toy_model import ToyPlugin

    hat_plugin = get_plugin("hat")

    class Impostor(ToyPlugin):
        name = "hat"

    with pytest.raises(ValueError) as refused:
        register(Impostor)
    message = str(refused.value)
    assert "\n" not in message and "'hat'" in message
    assert f"{hat_plugin.__module__}.{hat_plugin.__qualname__}" in message and "Impostor" in message
    assert get_plugin("hat") is hat_plugin  # the registry is as it was
    assert register(hat_plugin) is hat_plugin  # the same class again is no second plug-in

    class Partial(ModelPlugin):  # evaluate and scheduler left out
        name = "partial"

        def build(self, pretrained):
            return None

        def training_data(self, split, tokenizer, transform):
            return []

        def loss(self, network, model, batch, epoch, gather=None):
            return {}

        def optimizer(self, model):
            return None

    with pytest.raises(ValueError, match=r"lacks the required member\(s\) evaluate, scheduler"):
        register(Partial)
    from hat.plugins import model_names

    assert "partial" not in model_names()


def test_optional_members_have_their_documented_defaults():
    from hat.plugins import ModelPlugin
    from tests.toy_model import ToyPlugin

    plugin = ToyPlugin({"checkpoint": None})
    assert (ToyPlugin.cuda_precision, ToyPlugin.pad_to, ToyPlugin.training_unit) == ("fp32", None, "captions")
    assert plugin.table_rows({"rsum": 1.0}) == [] and plugin.test_checkpoints() == []
    assert plugin.gallery_attention(None, None, None, None, "cpu") is None
    assert ToyPlugin.display_name() == "Toy"

    class Untitled(ToyPlugin):
        name, title = "untitled", ""

    assert Untitled.display_name() == "untitled" and ModelPlugin.title == ""
