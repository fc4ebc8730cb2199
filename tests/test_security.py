"""What the Hub runs with trust_remote_code, and the scripts we ship, load no pickles, eval nothing, touch no network
at import; weights are safetensors only."""

import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import CODE_FILES, REPO, tiny_model

PACKAGE = sorted(REPO.glob("*.py"))  # the remote-code package and fill_mask.py
SCRIPTS = sorted(p for d in ("scripts", "train", "convert", "bench") for p in (REPO / d).rglob("*.py"))
SCANNED = PACKAGE + SCRIPTS
NETWORK_MODULES = {"socket", "requests", "urllib", "http", "httpx", "aiohttp", "huggingface_hub", "ftplib", "smtplib"}
# Calls that may download when they run.
FETCHING_CALLS = {"from_pretrained", "load_dataset", "hf_hub_download", "snapshot_download", "urlopen", "pipeline"}
# torch.load without weights_only=True, allowed only behind an explicit opt-in, with the reason.
UNSAFE_LOAD_ALLOWED = {
    ("convert/convert_checkpoint.py", "_torch_load"): "weights_only=False only with --unsafe-pickle (off by default), "
    "for full Composer checkpoints the user trusts; weights_only=True is tried first",
}


def rel(path):
    return path.relative_to(REPO).as_posix()


def parse(path):
    return ast.parse(path.read_text(), filename=str(path))


def calls(tree):
    """(call node, dotted name of the callee, enclosing function name) for every call in the tree."""
    out = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                out.append((child, ast.unparse(child.func), function))
            visit(child, inner)

    visit(tree, None)
    return out


def test_files_are_found():
    names = {rel(p) for p in SCANNED}
    assert set(CODE_FILES) <= names
    assert "scripts/export_onnx.py" in names


@pytest.mark.parametrize("path", SCANNED, ids=rel)
def test_no_pickle_loading(path):
    for call, name, function in calls(parse(path)):
        where = f"{rel(path)}:{call.lineno} {ast.unparse(call)}"
        keywords = {k.arg: k.value for k in call.keywords}
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            assert safe or (rel(path), function) in UNSAFE_LOAD_ALLOWED, f"{where}: torch.load needs weights_only=True"
        parts = name.split(".")
        pickle_module = parts[0] in {"pickle", "_pickle", "cPickle", "dill"}
        unpickles = pickle_module and parts[-1] in {"load", "loads", "Unpickler"}
        assert not unpickles, f"{where}: unpickling"
        assert name not in {"joblib.load", "pd.read_pickle", "pandas.read_pickle"}, f"{where}: unpickling"
        if name in {"np.load", "numpy.load"}:
            allow = keywords.get("allow_pickle")
            assert allow is None or (isinstance(allow, ast.Constant) and not allow.value), f"{where}: allow_pickle"


def test_unsafe_pickle_opt_in_is_off_by_default():
    import importlib.util

    path = REPO / "convert" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_for_security_test", path)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    args = converter.build_parser().parse_args(["--input", "in", "--output", "out"])
    assert args.unsafe_pickle is False
    assert converter.build_parser().parse_args(["--input", "in", "--output", "out", "--unsafe-pickle"]).unsafe_pickle
    assert "weights_only=True" in path.read_text()


@pytest.mark.parametrize("path", SCANNED, ids=rel)
def test_no_eval_or_exec(path):
    for call, name, _ in calls(parse(path)):
        assert name not in {"eval", "exec", "compile"}, f"{rel(path)}:{call.lineno} {name}()"
        if name in {"__import__", "importlib.import_module"}:  # only of a name written in the code
            where = f"{rel(path)}:{call.lineno} {ast.unparse(call)}"
            assert call.args and isinstance(call.args[0], ast.Constant), where


@pytest.mark.parametrize("path", PACKAGE, ids=rel)
def test_package_imports_no_network_module(path):
    for node in ast.walk(parse(path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            assert name.split(".")[0] not in NETWORK_MODULES, f"{rel(path)}:{node.lineno} imports {name}"


@pytest.mark.parametrize("path", SCANNED, ids=rel)
def test_nothing_is_fetched_at_import(path):
    """Module-level code (outside functions, classes and the `__main__` block) calls nothing that downloads."""
    tree = parse(path)
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
            continue
        if isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test):
            continue
        for call, name, function in calls(ast.Module(body=[statement], type_ignores=[])):
            if function is None:
                fetches = name.split(".")[-1] in FETCHING_CALLS or name.split(".")[0] in NETWORK_MODULES
                assert not fetches, f"{rel(path)}:{call.lineno} {name}() at import"


BLOCK_NETWORK = """
import socket
attempts = []
def refuse(self, address, *args, **kwargs):
    attempts.append(address)
    raise OSError("network access refused by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)
"""


def test_loading_and_running_the_package_opens_no_connection(tmp_path):
    """Through the remote-code path, with sockets refusing: import, load, forward. No connection is attempted."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(REPO / f, folder / f)
    tiny_model(vocab_size=30528).save_pretrained(folder)
    script = BLOCK_NETWORK + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        model = AutoModelForMaskedLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = model(**tok(["no network [MASK]."], return_tensors="pt"))
        assert torch.isfinite(out.logits).all()
        assert not attempts, attempts
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".joblib", ".npy", ".npz")


def tracked_files():
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: tracked files cannot be listed")
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_no_pickled_weights_are_tracked():
    pickled = [f for f in tracked_files() if f.lower().endswith(WEIGHT_SUFFIXES)]
    assert not pickled, f"tracked pickle-format files: {pickled}; ship weights as safetensors"

