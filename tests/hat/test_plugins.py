"""The toolkit's shape: shared modules import no model; models are found by name."""
import ast
import os

from tests.conftest import ROOT

SHARED = ["backbones", "checkpoint", "checks", "defaults", "distributed", "evaluation", "loop", "plugins",
          "retrieval", "run_folders"]


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
