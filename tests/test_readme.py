"""The README's code is run as written, and its test command is what CI runs."""

import os
import re
import shutil
import subprocess
import sys

from conftest import CODE_FILES, REPO, TOKENIZER_FILES, tiny_model

PACKAGE_FILES = CODE_FILES + TOKENIZER_FILES + ["config.json", "fill_mask.py", "modules.json",
                                                "sentence_bert_config.json", "1_Pooling/config.json",
                                                "train/configs/mosaic-bert-base.json"]


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def model_folder(tmp_path):
    """This folder as a user has it. Where no weights are shipped, a small random model stands in."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in PACKAGE_FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, folder / f)
    weights = list(REPO.glob("*.safetensors")) + list(REPO.glob("*.safetensors.index.json"))
    for w in weights:
        shutil.copy(w, folder / w.name)
    if not weights:
        tiny_model(vocab_size=30528).save_pretrained(folder)
    return folder


def test_readme_python_blocks_run(tmp_path):
    folder = model_folder(tmp_path)
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=folder, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"


def test_readme_main_command_runs(tmp_path):
    folder = model_folder(tmp_path)
    command = readme_blocks("bash")[0].strip().split("&&")[-1].strip()
    assert command.startswith("python fill_mask.py")
    command = f'"{sys.executable}"' + command[len("python"):]
    result = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 5 and all(float(line.split()[0]) >= 0 for line in lines)


def test_ci_runs_the_readme_test_command():
    readme_command = readme_blocks("bash")[1].strip().split("&&")[-1].strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == readme_command
