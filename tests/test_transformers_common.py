"""transformers' own `ModelTesterMixin` and `ConfigTester` against every class we ship, on CPU.

The two test files come from the sdist of the installed transformers version (tests/hf_tests.py fetches and
caches them); nothing of them is vendored here. The model classes are the remote-code classes, loaded the way
`trust_remote_code=True` loads them. Tests that cannot apply to this architecture are skipped below, each with
its reason; everything else runs as transformers runs it for its own models.
"""

import contextlib
import unittest
from pathlib import Path

import transformers
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import hf_tests
from conftest import REPO

test_modeling_common, test_configuration_common = hf_tests.load()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
ids_tensor = test_modeling_common.ids_tensor
random_attention_mask = test_modeling_common.random_attention_mask

TRANSFORMERS_V4 = int(transformers.__version__.split(".")[0]) < 5
HEADS = {
    "BertModel": "AutoModel",
    "BertForMaskedLM": "AutoModelForMaskedLM",
    "BertForSequenceClassification": "AutoModelForSequenceClassification",
    "BertForTokenClassification": "AutoModelForTokenClassification",
    "BertForQuestionAnswering": "AutoModelForQuestionAnswering",
    "BertForMultipleChoice": "AutoModelForMultipleChoice",
}
# The classes as `trust_remote_code=True` loads them from this folder.
MODEL_CLASSES = tuple(get_class_from_dynamic_module(f"modeling_bert.{name}", str(REPO)) for name in HEADS)
CONFIG_CLASS = type(AutoConfig.from_pretrained(str(REPO), trust_remote_code=True))


@contextlib.contextmanager
def registered_with_auto_classes():
    """Our classes registered with the Auto classes for the duration, as a library model is.

    Some common tests load through `AutoModel*.from_pretrained(folder)` without `trust_remote_code`, as they do for
    the library's models. Registration is what a user does to get the same (`AutoModel.register`); it is undone
    afterwards, so other tests in the process still see a remote-code model that needs `trust_remote_code`.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    CONFIG_MAPPING.register(CONFIG_CLASS.model_type, CONFIG_CLASS, exist_ok=True)
    autos = [getattr(transformers, auto) for auto in HEADS.values()]
    for auto, model_class in zip(autos, MODEL_CLASSES):
        auto.register(CONFIG_CLASS, model_class, exist_ok=True)
    try:
        yield
    finally:
        CONFIG_MAPPING._extra_content.pop(CONFIG_CLASS.model_type, None)
        for auto in autos:
            auto._model_mapping._extra_content.pop(CONFIG_CLASS, None)


class MosaicBertModelTester:
    """A tiny MosaicBERT (2 layers, hidden 32) and ragged inputs, as transformers' BERT tester builds them."""

    def __init__(
        self,
        parent,
        batch_size=5,
        seq_length=7,
        is_training=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        type_vocab_size=16,
        initializer_range=0.02,
        num_labels=3,
        num_choices=4,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.num_choices = num_choices

    def get_config(self):
        return CONFIG_CLASS(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range,
            num_labels=self.num_labels,
            attention_backend="torch",
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Random holes in the mask (first token always kept): the unpadding must handle any mask, not only right
        # padding.
        input_mask = random_attention_mask([self.batch_size, self.seq_length])
        token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        return self.get_config(), input_ids, token_type_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": input_mask}


# What is skipped, all by transformers' own checks, and why none of it can apply here:
# - "test requires accelerator / multiple accelerators / CUDA / MPS / Flash Attention / the kernels library /
#   deepspeed": model parallelism, CPU/disk offload to a GPU, multi-GPU, flash-attn and kernel-hub variants. The
#   suite runs on a CPU (our own GPU tests are tests/test_flash_attn.py and tests/test_model_gpu.py).
# - "does not support SDPA", "does not support setting its attention dynamically", "does not support sliding window
#   mask", "not a composite model": transformers' attention interface (attn_implementation = eager / sdpa /
#   flash / flex). MosaicBERT has one attention of its own, ALiBi over unpadded tokens, with the backend chosen by
#   config.attention_backend; it does not dispatch through that interface.
# - "does not have position embeddings", "does not have RoPE": ALiBi carries position.
# - "Do not take a cache as input", no generation, MoE, multimodal, TP plan, encoder-decoder or causal-LM heads:
#   an encoder has none of these.
# - "_keep_in_fp32_modules ... defined": no module needs to stay in fp32.
# - "test is slow": transformers' @slow tests (RUN_SLOW), skipped as in transformers' own CI by default.
# - "No conversion found": transformers' key renaming for legacy checkpoints of its own models; our checkpoints
#   keep the upstream keys, so there is no mapping to test.
# - transformers 4.57 only: torchscript tests (@unittest.skip there for every model), torch.fx (only for the
#   library's listed model types), test_can_init_all_missing_weights (only for models it dates from 2023 on).
# Everything else runs. Only head pruning and head masking, which transformers 4.x tests, are switched off below.


class MosaicBertModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = MODEL_CLASSES
    # transformers 5.x runs test_can_init_all_missing_weights only for models it dates from 2023 on (by a copyright
    # line); ours has none, so opt in. (4.x has no such switch and skips it: "not a priorited model".)
    test_can_init_all_missing_weights_before_2023 = True
    # transformers 4.x tests two features the architecture does not have.
    test_pruning = False  # head pruning: prune_heads is not implemented
    test_head_masking = False  # no head_mask argument (the Triton kernel has no per-head multiplier)

    def setUp(self):
        self.model_tester = MosaicBertModelTester(self)
        self.config_tester = ConfigTester(self, config_class=CONFIG_CLASS, hidden_size=37)  # as transformers BERT

    def test_config(self):
        if TRANSFORMERS_V4:
            # transformers 4.x's ConfigTester also builds `Config(hidden_size=0)`; ours rejects sizes below 1 with a
            # ValueError naming the field (tests/test_modeling.py::test_bad_config_raises). That one check runs
            # below with valid sizes; every other check of run_common_tests runs as shipped.
            self.config_tester.create_and_test_config_common_properties = self._check_common_properties
        self.config_tester.run_common_tests()

    def _check_common_properties(self):
        sizes = {"hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3, "vocab_size": 77}
        for name, value in sizes.items():
            config = CONFIG_CLASS()
            setattr(config, name, value)
            self.assertEqual(getattr(config, name), value)
            self.assertEqual(getattr(CONFIG_CLASS(**{name: value}), name), value)

    def test_load_with_mismatched_shapes(self):
        with registered_with_auto_classes():
            super().test_load_with_mismatched_shapes()


def test_every_shipped_class_is_tested():
    import json

    shipped = json.loads((REPO / "config.json").read_text())["auto_map"]
    assert sorted(c.__name__ for c in MosaicBertModelTest.all_model_classes) == sorted(
        v.split(".")[-1] for k, v in shipped.items() if k != "AutoConfig"
    )


def test_common_tests_come_from_the_installed_version():
    import transformers

    assert Path(test_modeling_common.__file__).parents[1] == hf_tests.CACHE / transformers.__version__
