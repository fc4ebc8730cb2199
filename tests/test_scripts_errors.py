"""Command-line scripts outside train/ and convert/: bad arguments end with a clear message, not a crash inside."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fill_mask  # noqa: E402


@pytest.mark.parametrize("top_k, message", [
    ("40000", "--top-k must be between 1 and the vocabulary size 30522 of .*, got 40000"),
    ("30523", "--top-k must be between 1 and the vocabulary size 30522 of .*, got 30523"),
    ("0", "--top-k must be at least 1, got 0"),
])
def test_fill_mask_top_k_out_of_range(capsys, top_k, message):
    import re

    with pytest.raises(SystemExit) as exit_info:
        fill_mask.main(["--top-k", top_k, "The cat sat on the [MASK]."])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_fill_mask_top_k_at_the_vocabulary_size_works(capsys):
    assert fill_mask.main(["--top-k", "30522", "The cat sat on the [MASK]."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 30522
