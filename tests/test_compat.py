"""transformers_compat: the supported release range is checked at import, with errors that name it."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # fresh interpreters

IMPORT_AS = """
import sys, warnings
import transformers
transformers.__version__ = sys.argv[1]  # what an installed release of that number reports
warnings.simplefilter("always")
sys.path.insert(0, sys.argv[2])
import {module}
"""


def import_under(release: str, module: str = "transformers_compat"):
    return subprocess.run([sys.executable, "-c", IMPORT_AS.format(module=module), release, ROOT],
                          capture_output=True, text=True, timeout=120)


# The config module is the first remote code every Auto class loads (the model, tokenizer and processor import
# transformers_compat too); importing transformers' generation code would re-read the real version.
@pytest.mark.parametrize("module", ["transformers_compat", "configuration_xcomposer"])
def test_an_older_release_is_an_import_error_naming_the_range_and_the_installed_release(module):
    done = import_under("4.40.2", module)
    assert done.returncode != 0
    assert ("ImportError: InternLM-XComposer's remote code supports transformers 4.45.0 to 5.24.0; "
            "transformers 4.40.2 is installed") in done.stderr


def test_a_newer_release_gives_one_line_of_warning_and_imports():
    done = import_under("5.31.0")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "tested with transformers" in line]
    assert len(warning) == 1 and "5.31.0 is newer and untested" in warning[0]


def test_releases_inside_the_range_import_silently():
    for release in ("4.45.2", "5.24.0", "5.24.3"):
        done = import_under(release)
        assert done.returncode == 0 and "untested" not in done.stderr, (release, done.stderr)
