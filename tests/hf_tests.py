"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`), fetched for the installed version.

They are not vendored: the first use downloads the transformers sdist of exactly the installed version with pip
(`pip download --no-deps --no-binary :all: transformers==X`), extracts the two files we run, and caches them
under `.cache/transformers-tests/X/` (git-ignored). Later runs reuse the cache.

The sdist ships the top-level `tests/*.py` files but not the sub-packages they import, and no other package on
the registry ships them. Three stand-ins fill the gap, each no more than the importing code needs:

- `generation/test_utils.py`: `GenerationTesterMixin`, an empty class. The common tests only check whether a
  test class inherits it; our models are encoders and do not generate, so they must not inherit it.
- `exporters/test_export.py` (transformers >= 5): `ExportTesterMixin`, an empty class, so transformers' export
  tests do not run here. Export is covered by tests/test_onnx.py (ONNX with dynamic axes, run in onnxruntime).
- `utils/test_configuration_utils.py`: `config_common_kwargs`, non-default values for the base config's own
  arguments, which `ConfigTester.check_config_arguments_init` passes to our config and reads back.

`load()` returns the two modules, or skips the calling test module when pip cannot download the sdist (no network)
outside CI. Under CI (the `CI` environment variable set) a failed download is an error, and so, everywhere, is an
sdist without the files.
"""

import contextlib
import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest
import transformers

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "transformers-tests"
PACKAGE = "hf_common_tests"
FILES = ["tests/test_modeling_common.py", "tests/test_configuration_common.py"]

GENERATION_STANDIN = '''"""Stand-in: the sdist lacks tests/generation/.

Only inheritance is checked; encoders must not inherit it.
"""


class GenerationTesterMixin:
    pass
'''

EXPORT_STANDIN = '''"""Stand-in: the sdist lacks tests/exporters/.

Export is covered by tests/test_onnx.py of the package.
"""


class ExportTesterMixin:
    pass
'''

CONFIG_KWARGS_STANDIN = '''"""Stand-in: the sdist lacks tests/utils/.

Non-default values of the base config's own arguments.
"""

from transformers import PretrainedConfig

_CANDIDATES = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "is_decoder": True,
    "add_cross_attention": True,
    "cross_attention_hidden_size": 128,
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "finetuning_task": "translation",
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "tokenizer_class": "BertTokenizerFast",
    "prefix": "prefix",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"translation": "some_params"},
    "problem_type": "regression",
}

_base = PretrainedConfig()
# Only the arguments this version's base config still has; "dtype" is read back through `config.dtype`.
config_common_kwargs = {k: v for k, v in _CANDIDATES.items() if k == "dtype" or hasattr(_base, k)}
'''


class FetchImpossible(RuntimeError):
    """pip could not download the sdist (no network, no index)."""


def version():
    return transformers.__version__


def _fetch(dest: Path):
    """Download the sdist of the installed version and lay out the importable package under `dest`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            "--dest", tmp, f"transformers=={version()}",
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as error:
            raise FetchImpossible(f"`{' '.join(command[2:])}` timed out") from error
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise FetchImpossible(f"`{' '.join(command[2:])}` failed:\n{(result.stderr or result.stdout)[-2000:]}")
        staging = Path(tmp) / "staging" / PACKAGE
        staging.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
            missing = [f for f in FILES if f not in members]
            if missing:
                raise RuntimeError(f"The transformers {version()} sdist has no {missing}.")
            for f in FILES:
                (staging / Path(f).name).write_bytes(tar.extractfile(members[f]).read())
        (staging / "__init__.py").write_text("")
        for sub, name, text in (
            ("generation", "test_utils.py", GENERATION_STANDIN),
            ("exporters", "test_export.py", EXPORT_STANDIN),
            ("utils", "test_configuration_utils.py", CONFIG_KWARGS_STANDIN),
        ):
            (staging / sub).mkdir()
            (staging / sub / "__init__.py").write_text("")
            (staging / sub / name).write_text(text)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(dest))


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock across processes (pytest-xdist workers collect in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def package_dir() -> Path:
    """The cached package for the installed version, fetched on first use."""
    root = CACHE / version()
    dest = root / PACKAGE
    with _locked(CACHE / f"{version()}.lock"):
        if not (dest / "__init__.py").exists():
            shutil.rmtree(dest, ignore_errors=True)
            _fetch(dest)
    return root


def load():
    """(test_modeling_common, test_configuration_common) of the installed transformers version."""
    try:
        root = package_dir()
    except FetchImpossible as error:  # anything else (e.g. the sdist lacks the files) fails the run
        if os.environ.get("CI"):
            raise
        pytest.skip(
            f"transformers' common tests could not be downloaded (no network?): {error}", allow_module_level=True
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        # Their markers (flash_attn_test, torch_compile_test, ...) are registered by transformers' own conftest.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration
