"""No code path of the package, its scripts or its Space unpickles a file: unpickling runs code stored in the file.

Scanned with `ast`: `torch.load` must pass `weights_only=True`; `pickle`/`dill`/`cloudpickle`/`joblib` loading,
`numpy.load(allow_pickle=True)` and Accelerate's pickle-based checkpointing (`load_state`, `register_for_checkpointing`)
are not used at all. A deliberate, documented opt-in is listed in ALLOWED with its reason.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("gfss_hf", "scripts", "spaces")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}
PICKLE_FUNCTIONS = {"load", "loads", "Unpickler"}
# (file, function) -> why the call is acceptable.
ALLOWED = {
    ("gfss_hf/conversion.py", "read_checkpoint"): "torch.load(weights_only=False) only when the caller passes "
    "allow_unsafe_pickle=True (--allow_unsafe_pickle), after the weights_only=True attempt failed, with a warning",
}


def _python_files():
    for folder in SCANNED:
        yield from sorted((REPO / folder).rglob("*.py"))


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword_is_true(call, name):
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_calls(path):
    """(line, function, what) of each unsafe loading call in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    imported = {}  # local name -> module.function, for `from pickle import loads`

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES | {"torch"}:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            name = imported.get(name, name)
            head, _, last = name.rpartition(".")
            if name in ("torch.load", "torch.serialization.load") and not _keyword_is_true(node, "weights_only"):
                found.append((node.lineno, function, f"{name} without weights_only=True"))
            elif head.split(".")[0] in PICKLE_MODULES and last in PICKLE_FUNCTIONS:
                found.append((node.lineno, function, name))
            elif last == "load" and head in ("np", "numpy") and _keyword_is_true(node, "allow_pickle"):
                found.append((node.lineno, function, f"{name}(allow_pickle=True)"))
            elif last in ("load_state", "register_for_checkpointing", "load_custom_state"):
                found.append((node.lineno, function, f"{name} (Accelerate checkpoints pickles)"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_the_scanner_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, numpy as np\nfrom pickle import loads as l\n"
        "def f(p):\n    torch.load(p)\n    torch.load(p, weights_only=False)\n    pickle.load(open(p, 'rb'))\n"
        "    l(b'')\n    np.load(p, allow_pickle=True)\n    accelerator.load_state(p)\n"
        "    torch.load(p, weights_only=True)\n    np.load(p)\n"
    )
    assert [line for line, _, _ in unsafe_calls(bad)] == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("path", list(_python_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loading(path):
    relative = str(path.relative_to(REPO))
    unsafe = [(line, fn, what) for line, fn, what in unsafe_calls(path) if (relative, fn) not in ALLOWED]
    assert not unsafe, f"{relative}: unsafe loading (can run code from a file): {unsafe}"


def test_every_allowed_entry_is_still_needed():
    used = {(rel, fn) for rel, fn in ALLOWED if any(f == fn for _, f, _ in unsafe_calls(REPO / rel))}
    assert used == set(ALLOWED), f"remove stale ALLOWED entries: {set(ALLOWED) - used}"
