"""Configuration of MosaicBERT: BERT with ALiBi, a gated-GELU MLP and unpadded attention."""

from transformers import PretrainedConfig

ATTENTION_BACKENDS = ("auto", "torch", "triton")


class BertConfig(PretrainedConfig):
    r"""
    Configuration of a MosaicBERT model. The defaults give mosaic-bert-base.

    MosaicBERT has no position embeddings: attention scores get the symmetric ALiBi bias
    `-slope_h * |i - j|`, so the model runs on any sequence length.

    Args:
        vocab_size (`int`, *optional*, defaults to 30528):
            Vocabulary size (bert-base-uncased's 30522 padded to a multiple of 8).
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the encoder layers.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads; must divide `hidden_size` (checked when a model is built).
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the gated MLP (its input projection is `2 * intermediate_size` wide).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLM head's transform. The encoder MLP always uses the exact GELU, x * Phi(x)
            (not the tanh approximation), as the original.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout after the embeddings, the attention output and the MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities. Only the `"torch"` attention backend implements it.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Kept for compatibility with tools that read it; no length limit follows from it.
        type_vocab_size (`int`, *optional*, defaults to 2):
            Number of token types (segments).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer of Linear and Embedding weights.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of every LayerNorm.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding token; its embedding row starts at zero.
        classifier_dropout (`float`, *optional*):
            Dropout before the classification heads; `hidden_dropout_prob` when unset.
        alibi_starting_size (`int`, *optional*, defaults to 512):
            The sequence length the model was trained at. It is informational only: ALiBi is computed from the
            slopes for any length, so longer inputs need no change to the config.
        attention_backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` uses the Triton FlashAttention kernel on CUDA for fp16/bf16 inputs when triton is installed
            and the plain PyTorch path elsewhere; `"triton"` requires the kernel; `"torch"` always uses the plain
            path.
        low_precision_layernorm (`bool`, *optional*, defaults to `False`):
            Under bf16/fp16 autocast, run LayerNorm in the autocast dtype instead of autocast's float32 (faster;
            MosaicBERT's pretraining did this). No effect outside autocast. The pretraining script turns it on.
        sparse_prediction (`bool`, *optional*, defaults to `False`):
            With labels, `BertForMaskedLM` returns `logits` only for the labelled tokens, `(m, vocab)` in row-major
            order, instead of a dense `(batch, seq_len, vocab)` tensor that is zero elsewhere (ModernBERT's
            convention; the pretraining script turns it on).
        static_shapes (`bool`, *optional*, defaults to `False`):
            Run every position of the padded `(batch, seq_len)` input through the encoder instead of removing the
            padding first. Each row's tokens are moved ahead of its padding and attend only to each other (the
            padding's outputs are computed, then zeroed), so no tensor's size depends on the mask: a forward never
            waits on the GPU (the input checks are read after its work is queued, and still raise `ValueError`)
            and `torch.compile(mode="reduce-overhead")` captures it in a CUDA graph without dynamo's
            data-dependent-shape switches. Same outputs either way; no faster in eager mode at fixed length and
            about half as fast on ragged batches (the padding's work). Packed input (`position_ids`,
            `cu_seqlens`) and the plain attention path's grouping still read the device.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the MLM decoder shares its weight with the word embeddings.

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> config = AutoConfig.from_pretrained(".", trust_remote_code=True, num_hidden_layers=4)
    >>> config.num_hidden_layers
    4
    ```
    """

    model_type = "mosaic_bert"

    def __init__(
        self,
        vocab_size=30528,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        classifier_dropout=None,
        alibi_starting_size=512,
        attention_backend="auto",
        low_precision_layernorm=False,
        sparse_prediction=False,
        static_shapes=False,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        self.classifier_dropout = classifier_dropout
        self.alibi_starting_size = alibi_starting_size
        self.attention_backend = attention_backend
        self.low_precision_layernorm = low_precision_layernorm
        self.sparse_prediction = sparse_prediction
        self.static_shapes = static_shapes
        self.tie_word_embeddings = tie_word_embeddings
        # transformers 4.x's base __init__ sets these two from its own arguments: pass them through.
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_mosaic_bert()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(path, **overrides)` sets the overrides after __init__: validate the result too.
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out).validate_mosaic_bert()
        return out

    def validate_mosaic_bert(self):
        """Raise `ValueError` naming the first invalid field."""
        for name, value in (
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("type_vocab_size", self.type_vocab_size),
            ("alibi_starting_size", self.alibi_starting_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        # hidden_size % num_attention_heads is checked where the model is built (BertUnpadSelfAttention), as in
        # transformers' BERT: transformers' ConfigTester builds configs that only a model would reject.
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be a positive number, got {self.layer_norm_eps!r}.")
        for name, value in (
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"`classifier_dropout` must be None or in [0, 1), got {self.classifier_dropout!r}.")
        for name in ("low_precision_layernorm", "sparse_prediction", "static_shapes"):
            if not isinstance(getattr(self, name, False), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"`attention_backend` must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}."
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})."
            )


__all__ = ["BertConfig"]
