"""The README's ```py blocks: snippets for optional tools (peft, optimum) that the requirements do not install.

test_readme.py runs every ```python block everywhere; these run only where their imports resolve and skip with the
reason otherwise, so an environment that has the tool checks the snippet as written.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from test_readme import model_folder

from conftest import REPO

BLOCKS = re.findall(r"```py\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def top_level_imports(block):
    return sorted({m.split(".")[0] for m in re.findall(r"^(?:from|import) ([\w.]+)", block, flags=re.MULTILINE)})


def test_readme_has_the_tool_snippets():
    assert {"peft", "optimum"} <= {name for block in BLOCKS for name in top_level_imports(block)}


@pytest.mark.parametrize("block", BLOCKS, ids=[" ".join(top_level_imports(b)) for b in BLOCKS])
def test_readme_tool_block_runs(block, tmp_path):
    missing = [name for name in top_level_imports(block) if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (optional, not in the requirements)")
    if "optimum" in top_level_imports(block) and importlib.util.find_spec("optimum.exporters.onnx") is None:
        pytest.skip("needs optimum-onnx, which installs only with transformers<4.58")
    folder = model_folder(tmp_path)
    result = subprocess.run([sys.executable, "-c", block], cwd=folder, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
