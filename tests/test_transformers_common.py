"""transformers' own common model tests (ModelTesterMixin) on tiny XComposer2 (v2) and XComposer (v1) models.

The tests are not copied into this repository. When this module is collected (the mixin must exist when the
test classes are defined), the source distribution of the installed transformers release is fetched once
(`pip download --no-binary :all: --no-deps transformers==X`), its `tests/` tree is extracted into a cache
folder outside the checkout (XCOMPOSER_HF_TESTS_CACHE, else ~/.cache/xcomposer/hf-tests/transformers-X/) as
the package `hf_tests`, and `hf_tests.test_modeling_common` is imported. Without network, or without the
`parameterized` package those tests import, the module skips and says why.

The sdists ship only the top-level test files. The mixins test_modeling_common imports from sub-folders the
sdist lacks (GenerationTesterMixin; ExportTesterMixin on 5.24) become empty classes, so their tests do not run
here: tests/test_generation_outputs.py checks generate's outputs instead. What we tell the mixin, as
transformers' own testers do: the tester's tiny configs and inputs, the image inputs by name
(additional_model_inputs), and, while a test runs, our class names in transformers' auto tables (remote code
is absent from them). EXCLUDED lists the tests that need hardware or features this model does not have, and
ADAPTED_INPUTS the tests that run on other inputs; each names its reason (the README lists them too).
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from unittest import mock

import pytest
import torch
import transformers
from conftest import tiny_config
from packaging import version
from transformers.models.auto import modeling_auto

from configuration_xcomposer import AUTO_MAP, XComposerConfig
from modeling_xcomposer import XComposerForCausalLM, XComposerModel

pytestmark = pytest.mark.slow

PACKAGE = "hf_tests"


def _cache_root() -> str:
    if os.environ.get("XCOMPOSER_HF_TESTS_CACHE"):
        return os.environ["XCOMPOSER_HF_TESTS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xcomposer", "hf-tests")


def _download_sdist(release: str, folder: str) -> str:
    """The path of transformers-`release`.tar.gz, fetched from PyPI by pip; RuntimeError saying why not."""
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               "--timeout", "30", "--retries", "2", "-d", folder, f"transformers=={release}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download of transformers=={release} took over 600 s") from None
    archives = [name for name in os.listdir(folder) if name.startswith("transformers-") and name.endswith(".tar.gz")]
    if result.returncode or not archives:
        last_lines = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"pip download of the transformers=={release} sdist failed: {last_lines}")
    return os.path.join(folder, archives[0])


def _extract_tests(archive: str, package_dir: str) -> None:
    """The sdist's tests/ tree as regular files under `package_dir`, an __init__.py in every folder."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile():
                continue
            relative = os.path.join(*parts[2:])
            if ".." in parts or not relative.endswith(".py"):
                continue
            target = os.path.join(package_dir, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
    for folder, _, files in os.walk(package_dir):
        if "__init__.py" not in files:
            open(os.path.join(folder, "__init__.py"), "w").close()


def _add_missing_mixins(package_dir: str) -> list[str]:
    """Empty stand-ins for the mixins test_modeling_common imports from modules the sdist does not ship
    (tests/generation, tests/exporters); any other missing import is an error. Returns the stand-in names."""
    with open(os.path.join(package_dir, "test_modeling_common.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    stand_ins = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module):
            continue
        path = os.path.join(package_dir, *node.module.split(".")) + ".py"
        if os.path.exists(path):
            continue
        names = [alias.name for alias in node.names]
        if not all(name.endswith("TesterMixin") for name in names):
            raise RuntimeError(f"the sdist lacks .{node.module}, which test_modeling_common needs for {names}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for folder in (os.path.dirname(path),):
            open(os.path.join(folder, "__init__.py"), "a").close()
        with open(path, "w", encoding="utf-8") as f:
            f.write('"""Stand-in: this module is not in the transformers sdist; its tests do not run."""\n')
            for name in names:
                f.write(f"\n\nclass {name}:\n    pass\n")
        stand_ins += names
    return stand_ins


def common_tests_dir(release: str = transformers.__version__) -> str:
    """The cache folder holding the package `hf_tests` for `release`, fetched and extracted on first use.
    The folder is built beside its final place and renamed into it, so a failed or concurrent run never
    leaves a half-written tree."""
    root = os.path.join(_cache_root(), f"transformers-{release}")
    if os.path.exists(os.path.join(root, PACKAGE, "test_modeling_common.py")):
        return root
    os.makedirs(_cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".transformers-{release}-", dir=_cache_root())
    try:
        archive = _download_sdist(release, staging)
        package_dir = os.path.join(staging, "tree", PACKAGE)
        _extract_tests(archive, package_dir)
        if not os.path.exists(os.path.join(package_dir, "test_modeling_common.py")):
            raise RuntimeError(f"the transformers=={release} sdist has no tests/test_modeling_common.py")
        _add_missing_mixins(package_dir)
        try:
            os.rename(os.path.join(staging, "tree"), root)
        except OSError:  # another run got there first
            if not os.path.exists(os.path.join(root, PACKAGE, "test_modeling_common.py")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _import_common_tests():
    try:
        folder = common_tests_dir()
    except RuntimeError as error:
        pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)
    pytest.importorskip("parameterized", reason="transformers' common tests need `pip install parameterized`")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from hf_tests import test_modeling_common

    return test_modeling_common


common = _import_common_tests()


class XComposerModelTester:
    """Builds the tiny config (tests/conftest.py) and a batch of prompts: BOS, one image's `num_image_tokens`
    image ids, then text ids (3 and up), with one image per prompt (`with_images=False`: text only). The batch
    is 7, the size test_eager_matches_sdpa_inference runs at: it pads a smaller batch with prompts that hold no
    image ids, which the images would then outnumber."""

    def __init__(self, parent, version: int, batch_size: int = 7, text_length: int = 7, image_token_id=None,
                 with_images: bool = True):
        self.parent, self.version, self.image_token_id, self.with_images = parent, version, image_token_id, with_images
        self.batch_size, self.text_length = batch_size, text_length
        config = self.get_config()
        self.text_config = config.text_config.to_dict()
        self.vision_config = config.vision_config.to_dict()
        self.num_image_tokens = config.num_image_tokens if with_images else 0
        self.seq_length = 1 + self.num_image_tokens + text_length
        self.image_size = config.vision_config.image_size
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.num_attention_heads = config.text_config.num_attention_heads
        self.is_training = True

    def get_config(self):
        config = tiny_config(self.version)
        if self.image_token_id is not None:
            config.image_token_id = self.image_token_id
        return config

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        text = common.ids_tensor([self.batch_size, self.text_length], config.text_config.vocab_size - 3) + 3
        input_ids = torch.cat([torch.full((self.batch_size, 1), config.text_config.bos_token_id),
                               torch.full((self.batch_size, self.num_image_tokens), config.image_token_id),
                               text], dim=1).to(common.torch_device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self.with_images:
            inputs["pixel_values"] = common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return config, inputs


# name -> why transformers' common test does not apply; it is skipped with that reason. A name covers its
# parameterized variants (name_0_..., name_1_...).
EXCLUDED = {
    "test_generation_tester_mixin_inheritance":
        "GenerationTesterMixin is not in the transformers sdist (tests/generation is not shipped); "
        "tests/test_generation_outputs.py tests generate's outputs instead",
    # transformers 4.x only (5.0 removed head pruning and head masks from the library):
    "test_head_pruning": "head pruning is not implemented (no _prune_heads), as in transformers 5's own models",
    "test_head_pruning_integration": "head pruning is not implemented (see test_head_pruning)",
    "test_head_pruning_save_load_from_config_init": "head pruning is not implemented (see test_head_pruning)",
    "test_head_pruning_save_load_from_pretrained": "head pruning is not implemented (see test_head_pruning)",
    "test_headmasking": "head_mask is not an input, as in transformers 5's own models",
    "test_sdpa_can_dispatch_composite_models":
        "reads `_supports_sdpa` off the towers, which are plain nn.Modules reading their sub-config (only the top "
        "classes are PreTrainedModel); per-tower dispatch is checked by test_attn_implementation_composite_models "
        "and test_can_set_attention_dynamically_composite_model",
    "test_causal_lm_can_accept_kwargs":  # 4.51
        "builds the model with AutoModelForCausalLM.from_config without trust_remote_code, which remote code needs "
        "(the test then waits for an answer on stdin)",
}
# Older releases' versions of tests that pass on the newer ones (seen on 4.45 and 4.51; 4.57 has the newer tests).
if version.parse(transformers.__version__) < version.parse("4.57"):
    EXCLUDED.update({
        "test_tied_weights_keys":
            "forces tie_word_embeddings=True, which no XComposer uses (the LM head is its own matrix in every preset "
            "and checkpoint), and 4.45/4.51 then tie the head to the token table without a declared tied key",
    })
if version.parse(transformers.__version__) < version.parse("4.51"):
    EXCLUDED.update({
        "test_model_outputs_equivalence":
            "4.45's version compares outputs as tensors and tuples only and cannot take the DynamicCache the model "
            "returns on every release (4.45's own models still returned tuple caches)",
        "test_training_gradient_checkpointing":
            "4.45's version skips the base model with skipTest inside subTest; pytest 9 records that as a skipped "
            "subtest and carries on, asking the base model for a loss",
        "test_training_gradient_checkpointing_use_reentrant": "as test_training_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false": "as test_training_gradient_checkpointing",
    })

# name -> (tester arguments, why): tests that run as transformers wrote them, on inputs adapted to what they probe.
ADAPTED_INPUTS = {
    "test_resize_tokens_embeddings": (
        {"image_token_id": 0}, "it clamps input_ids into a shrunk vocabulary, which would turn the image id (outside "
        "the vocabulary by default) into a text id while the images stay: the image id is 0, inside the vocabulary, "
        "as in transformers' llava tester"),
    "test_resize_embeddings_untied": ({"image_token_id": 0}, "as test_resize_tokens_embeddings"),
    "test_inputs_embeds": (
        {"with_images": False}, "text-only prompts: images are spliced where input_ids hold image_token_id, which has "
        "no embedding row of its own, so pixel_values with inputs_embeds is a ValueError (splice "
        "get_image_features(...).pooler_output into inputs_embeds yourself)"),
    "test_inputs_embeds_matches_input_ids": ({"with_images": False}, "as test_inputs_embeds"),
    "test_inputs_embeds_matches_input_ids_with_generate": ({"with_images": False}, "as test_inputs_embeds"),  # 4.45
}


def _entry(table: dict, test_name: str):
    for name, value in table.items():
        if test_name == name or re.fullmatch(re.escape(name) + r"_\d+(_\w*)?", test_name):
            return value
    return None


# The common tests tell base models from causal LMs by looking class names up in transformers' auto tables, where
# remote-code classes are absent; while a test runs, ours are listed there as AUTO_MAP declares them.
_NAME_TABLES = {"AutoModel": "MODEL_MAPPING_NAMES", "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"}


class _XComposerCommonTests(common.ModelTesterMixin):
    all_model_classes = (XComposerModel, XComposerForCausalLM)
    _is_composite = True
    additional_model_inputs = ["pixel_values"]  # tests that pick inputs by name also pass the images
    # the test dates a model by the copyright line our files lack and would skip it as an old one
    test_can_init_all_missing_weights_before_2023 = True
    version = 2

    def setUp(self):
        reason = _entry(EXCLUDED, self._testMethodName)
        if reason:
            self.skipTest(f"excluded: {reason}")
        tester_args, _ = _entry(ADAPTED_INPUTS, self._testMethodName) or ({}, None)
        self.model_tester = XComposerModelTester(self, self.version, **tester_args)
        for auto_class, table in _NAME_TABLES.items():
            if hasattr(modeling_auto, table):
                patcher = mock.patch.dict(getattr(modeling_auto, table),
                                          {XComposerConfig.model_type: AUTO_MAP[auto_class].split(".")[-1]})
                patcher.start()
                self.addCleanup(patcher.stop)


class XComposer2CommonTest(_XComposerCommonTests, unittest.TestCase):
    version = 2


class XComposerV1CommonTest(_XComposerCommonTests, unittest.TestCase):
    version = 1
