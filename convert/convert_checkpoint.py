#!/usr/bin/env python
"""Convert upstream checkpoints into a MosaicBERT folder of this package (safetensors + config + code + tokenizer).

    python convert/convert_checkpoint.py --input path/to/mosaic-bert-base --output converted/mosaic-bert-base
    python -c "from transformers import AutoModelForMaskedLM; \
               AutoModelForMaskedLM.from_pretrained('converted/mosaic-bert-base', trust_remote_code=True)"

Input formats (`--format`, detected when `auto`):

hub       The Hub repo's `pytorch_model.bin` (or `model.safetensors`) of mosaic-bert-base and its seqlen variants:
          the same state-dict keys as this package. Sizes come from the folder's config.json when there is one,
          else from the tensor shapes (heads = hidden / 64 unless `--num-attention-heads`).
composer  A Composer checkpoint (`.pt`) of the original training code: `state["state"]["model"]` (or
          `state["model"]`) holding the model's keys prefixed with `model.`. Loaded with `weights_only=True`;
          a checkpoint that pickles other objects needs `--unsafe-pickle` (only for files you trust).
hf_bert   A stock transformers BERT checkpoint (BertForMaskedLM, BertForPreTraining, BertModel or
          BertForSequenceClassification). MosaicBERT differs in architecture, so only part of it maps:
            copied      word and token-type embeddings, the embedding LayerNorm; per layer q/k/v fused into Wqkv
                        (concatenated along the output dimension in q, k, v order, i.e. (3, heads, head_dim)),
                        the attention output dense + LayerNorm, and the post-MLP LayerNorm (output.LayerNorm →
                        mlp.layernorm); the pooler; the MLM head transform (dense + LayerNorm) and the decoder bias
                        (the decoder weight is tied to the word embeddings); a sequence classifier.
            NOT mapped  position embeddings (MosaicBERT uses ALiBi and has none: dropped), the MLP
                        (intermediate.dense and output.dense: MosaicBERT's MLP is a gated GLU with no
                        counterpart, so mlp.gated_layers and mlp.wo keep their fresh initialisation), and the NSP
                        head (cls.seq_relationship: dropped). The result needs further pretraining to be useful.

Vocabulary: the output has `--vocab-size` rows (default: the input's size rounded up to a multiple of 8, e.g.
30522 → 30528). Added rows are zero in the embeddings and get the smallest existing decoder bias, so they are
never predicted; a smaller size slices rows off (never below the tokenizer's size).

Every check (file present, recognisable keys, shapes, sizes) runs before anything is written; errors name the
file, key or field at fault; a NaN or infinite weight is refused (naming the tensor), and so is a shard index
whose file names point outside the input folder. Attention dropout is set to 0.0 in the output config (the Triton
attention kernel has none; upstream configs sometimes say 0.1). Option names are dashed; the older underscore
spellings (`--num_attention_heads`) still work.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "train"))
from script_cli import HelpFormatter, exit_on_input_error, flag  # noqa: E402

FORMATS = ("auto", "hub", "composer", "hf_bert")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
# Config fields carried over from an upstream config.json when present.
COPIED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "hidden_act",
                 "hidden_dropout_prob", "max_position_embeddings", "alibi_starting_size", "classifier_dropout",
                 "id2label", "label2id", "problem_type")
_LAYER_KEY = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, key or field."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the input
# ----------------------------------------------------------------------------------------------------------------
def _torch_load(path: Path, unsafe_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses arbitrary pickled objects
        if not unsafe_pickle:
            raise ConversionError(
                f"{str(path)!r} could not be loaded with torch.load(weights_only=True) ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). If it is a checkpoint you trust that pickles "
                "other objects (e.g. a full Composer checkpoint), pass --unsafe-pickle."
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _shard_path(index_file: Path, shard) -> Path:
    """The shard file an index names, which must be a plain relative path inside the index's folder: an absolute
    path or a `..` would read a file outside the checkpoint. (Symlinks inside the folder, as in a Hub cache
    snapshot, are fine: the check is on the name.)"""
    if not isinstance(shard, str) or not shard.strip():
        raise ConversionError(f"{str(index_file)!r} names an invalid shard file {shard!r}.")
    parts = re.split(r"[\\/]", shard)
    if shard.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", shard) or ".." in parts:
        raise ConversionError(f"{str(index_file)!r} names the shard {shard!r}, which is outside the checkpoint "
                              "folder; shard names must be relative paths inside it.")
    return index_file.parent / shard


def _load_weights_file(path: Path, unsafe_pickle: bool):
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ConversionError(f"{str(path)!r} is not valid JSON ({err}).") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{str(path)!r} lists no weight shards.")
        merged = {}
        for shard in sorted({_shard_path(path, v) for v in weight_map.values()}):
            merged.update(_load_weights_file(shard, unsafe_pickle))
        return merged
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {str(path)!r}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path, unsafe_pickle)


def check_finite(tensors: dict, source: Path) -> None:
    """A NaN or infinite weight would convert into a model that outputs NaN; refuse it, naming the tensor."""
    for key, value in tensors.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not finite.all():
                bad = value[~finite]
                raise ConversionError(
                    f"{str(source)!r}: tensor {key!r} holds {bad.numel()} non-finite value(s) (e.g. {bad[0].item()}); "
                    "a checkpoint with NaN or inf weights cannot be converted."
                )


def read_input(path: str, unsafe_pickle: bool = False) -> tuple[dict, dict | None, bool, Path]:
    """Return (state dict, upstream config or None, came_from_composer, weights file)."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"Input checkpoint not found: {path!r}.")
    config = None
    if src.is_dir():
        found = [src / n for n in WEIGHT_NAMES if (src / n).is_file()]
        if not found:
            found = sorted(src.glob("*.pt"))
        if not found:
            raise FileNotFoundError(
                f"No checkpoint in folder {path!r} (looked for {', '.join(WEIGHT_NAMES)} and *.pt)."
            )
        weights = found[0]
        if (src / "config.json").is_file():
            config = json.loads((src / "config.json").read_text())
    else:
        weights = src
        if (src.parent / "config.json").is_file() and src.suffix in (".bin", ".safetensors"):
            config = json.loads((src.parent / "config.json").read_text())
    obj = _load_weights_file(weights, unsafe_pickle)
    composer = False
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj["state"].get("model"), dict):
        obj, composer = obj["state"]["model"], True
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not torch.is_tensor(obj.get("model")):
        obj, composer = obj["model"], True
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{str(weights)!r} does not hold a state dict.")
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConversionError(f"{str(weights)!r} holds no tensors.")
    if composer:
        tensors = {_strip(k, ("model.", "module.")): v for k, v in tensors.items()}
    check_finite(tensors, weights)
    return tensors, config, composer, weights


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _normalize_keys(sd: dict) -> dict:
    """`module.` prefixes (DDP) off, `bert.` on for bare encoder checkpoints, TF-era LayerNorm gamma/beta renamed."""
    out = {}
    for key, value in sd.items():
        key = _strip(key, ("module.",))
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = "bert." + key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


def detect_format(sd: dict, composer: bool) -> str:
    if composer:
        return "composer"
    keys = list(sd)
    if any(k.endswith("attention.self.Wqkv.weight") for k in keys):
        return "hub"
    if any(k.endswith("attention.self.query.weight") for k in keys):
        return "hf_bert"
    raise ConversionError(
        "No recognisable BERT keys (neither attention.self.Wqkv nor attention.self.query) in the checkpoint; "
        f"it looks like another architecture. First keys: {keys[:5]}."
    )


# ----------------------------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------------------------
def _num_layers(sd: dict) -> int:
    layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    if not layers:
        raise ConversionError("The checkpoint has no bert.encoder.layer.* keys.")
    if layers != set(range(len(layers))):
        raise ConversionError(f"Encoder layer indices are not contiguous: {sorted(layers)}.")
    return len(layers)


def _require(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"The checkpoint lacks {key!r}.")
    return sd[key]


def map_hf_bert(sd: dict) -> tuple[dict, dict]:
    """Stock transformers BERT keys → ours. Returns (mapped state dict, report of what was not mapped)."""
    out, dropped = {}, []
    for name in ("word_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        out[f"bert.embeddings.{name}"] = _require(sd, f"bert.embeddings.{name}")
    n_layers = _num_layers(sd)
    for i in range(n_layers):
        src, dst = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = (_require(sd, f"{src}attention.self.{n}.{part}") for n in ("query", "key", "value"))
            if not q.shape == k.shape == v.shape:
                raise ConversionError(f"Layer {i}: query/key/value {part} shapes differ: "
                                      f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
            out[f"{dst}attention.self.Wqkv.{part}"] = torch.cat([q, k, v], dim=0)  # (3 * hidden, ...)
            out[f"{dst}attention.output.dense.{part}"] = _require(sd, f"{src}attention.output.dense.{part}")
            out[f"{dst}attention.output.LayerNorm.{part}"] = _require(sd, f"{src}attention.output.LayerNorm.{part}")
            out[f"{dst}mlp.layernorm.{part}"] = _require(sd, f"{src}output.LayerNorm.{part}")
    for part in ("weight", "bias"):
        for src_key, dst_key in ((f"bert.pooler.dense.{part}", f"bert.pooler.dense.{part}"),
                                 (f"cls.predictions.transform.dense.{part}",
                                  f"cls.predictions.transform.dense.{part}"),
                                 (f"cls.predictions.transform.LayerNorm.{part}",
                                  f"cls.predictions.transform.LayerNorm.{part}"),
                                 (f"classifier.{part}", f"classifier.{part}")):
            if src_key in sd:
                out[dst_key] = sd[src_key]
    bias = sd.get("cls.predictions.decoder.bias", sd.get("cls.predictions.bias"))
    if bias is not None:
        out["cls.predictions.decoder.bias"] = bias
    for key in sd:
        if key.endswith("position_embeddings.weight"):
            dropped.append(f"{key} (no position embeddings: ALiBi)")
        elif key.startswith("cls.seq_relationship."):
            dropped.append(f"{key} (next-sentence head)")
    dropped.append(f"bert.encoder.layer.*.intermediate.dense / output.dense ({n_layers} layers): the MLP is not "
                   "mapped; mlp.gated_layers and mlp.wo keep their fresh initialisation")
    fresh = ["bert.encoder.layer.*.mlp.gated_layers.weight", "bert.encoder.layer.*.mlp.wo.weight",
             "bert.encoder.layer.*.mlp.wo.bias"]
    return out, {"dropped": dropped, "fresh": fresh}


def infer_sizes(sd: dict, fmt: str, upstream: dict | None, num_heads: int | None) -> dict:
    """Config sizes from the tensors; an upstream config.json fills what shapes cannot tell, and must agree."""
    word = _require(sd, "bert.embeddings.word_embeddings.weight")
    sizes = {
        "vocab_size": word.shape[0],
        "hidden_size": word.shape[1],
        "num_hidden_layers": _num_layers(sd),
        "type_vocab_size": _require(sd, "bert.embeddings.token_type_embeddings.weight").shape[0],
    }
    if fmt == "hf_bert":
        sizes["intermediate_size"] = _require(sd, "bert.encoder.layer.0.intermediate.dense.weight").shape[0]
    else:
        sizes["intermediate_size"] = _require(sd, "bert.encoder.layer.0.mlp.gated_layers.weight").shape[0] // 2
    fields = {}
    if upstream:
        fields = {k: upstream[k] for k in COPIED_FIELDS if k in upstream and upstream[k] is not None}
        for key, value in sizes.items():
            if key in fields and fields[key] != value:
                raise ConversionError(f"config.json says {key}={fields[key]} but the weights have {value}.")
    fields.update(sizes)
    if num_heads is not None:
        fields["num_attention_heads"] = num_heads
    elif "num_attention_heads" not in fields:
        if sizes["hidden_size"] % 64:
            raise ConversionError(f"Cannot infer the number of heads for hidden_size {sizes['hidden_size']}; "
                                  "pass --num-attention-heads.")
        fields["num_attention_heads"] = sizes["hidden_size"] // 64
        print(f"note: no config.json; assuming head dim 64 → {fields['num_attention_heads']} heads "
              "(override with --num-attention-heads)")
    if "classifier.weight" in sd:
        fields["num_labels"] = sd["classifier.weight"].shape[0]
        if "id2label" in fields and len(fields["id2label"]) != fields["num_labels"]:
            fields.pop("id2label")
            fields.pop("label2id", None)
    fields["attention_probs_dropout_prob"] = 0.0
    return fields


def resize_vocab(sd: dict, new_size: int) -> dict:
    """Grow (zero rows; bias = its minimum) or shrink (slice) every vocabulary-sized tensor."""
    old = sd["bert.embeddings.word_embeddings.weight"].shape[0]
    if new_size == old:
        return sd
    out = dict(sd)
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                "cls.predictions.decoder.bias"):
        if key not in out:
            continue
        t = out[key]
        if new_size < old:
            out[key] = t[:new_size].clone()
        else:
            fill = t.min().item() if key.endswith("bias") else 0.0
            extra = torch.full((new_size - old, *t.shape[1:]), fill, dtype=t.dtype)
            out[key] = torch.cat([t, extra])
    return out


def choose_auto_class(sd: dict) -> str:
    if "classifier.weight" in sd:
        return "AutoModelForSequenceClassification"
    if any(k.startswith("cls.predictions.") for k in sd):
        return "AutoModelForMaskedLM"
    return "AutoModel"


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def convert(input_path: str, output_dir: str, fmt: str = "auto", model_dir: str = str(REPO_ROOT),
            vocab_size: int | None = None, num_attention_heads: int | None = None, unsafe_pickle: bool = False,
            overwrite: bool = False) -> dict:
    """Convert and write; returns a report. Raises before writing anything when the input is not convertible."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; use one of {FORMATS}.")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {output_dir!r} is not empty; pass --overwrite to replace its files.")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in --model-dir {model_dir!r} (the package folder).")

    raw, upstream, composer, weights_file = read_input(input_path, unsafe_pickle)
    sd = _normalize_keys(raw)
    detected = detect_format(sd, composer)
    if fmt != "auto" and fmt != detected and not (fmt == "hub" and detected == "composer"):
        raise ConversionError(f"--format {fmt} was given but {str(weights_file)!r} looks like {detected}.")
    fmt = fmt if fmt != "auto" else detected
    if fmt == "composer":
        # Composer wraps the same model as the Hub release; its keys are ours once the prefix is gone.
        if not any(k.endswith("attention.self.Wqkv.weight") for k in sd):
            raise ConversionError(f"The Composer checkpoint {str(weights_file)!r} holds no MosaicBERT keys "
                                  f"(attention.self.Wqkv); first keys: {list(sd)[:5]}.")
    sizes = infer_sizes(sd, "hf_bert" if fmt == "hf_bert" else "hub", upstream, num_attention_heads)
    report = {"format": fmt, "input": str(weights_file), "dropped": [], "fresh": []}
    if fmt == "hf_bert":
        sd, notes = map_hf_bert(sd)
        report.update(notes)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    target_vocab = vocab_size or -(-sizes["vocab_size"] // 8) * 8
    if target_vocab < len(tokenizer):
        raise ConversionError(f"--vocab-size {target_vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    if target_vocab != sizes["vocab_size"]:
        report["vocab_resized"] = [sizes["vocab_size"], target_vocab]
    sd = resize_vocab(sd, target_vocab)
    sizes["vocab_size"] = target_vocab

    auto_class = choose_auto_class(sd)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True, **sizes)
    if config.model_type != "mosaic_bert":
        raise ConversionError(f"--model-dir {model_dir!r} is not the MosaicBERT package (model_type "
                              f"{config.model_type!r}).")
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(config, trust_remote_code=True)
    expected = model.state_dict()
    tied = set()
    if getattr(config, "tie_word_embeddings", True) and "cls.predictions.decoder.weight" in expected:
        tied.add("cls.predictions.decoder.weight")
        # The tied decoder weight is the word embedding; a separate copy in the input must agree with it.
        given = sd.pop("cls.predictions.decoder.weight", None)
        if given is not None and not torch.equal(given, sd["bert.embeddings.word_embeddings.weight"]):
            report["dropped"].append("cls.predictions.decoder.weight (differs from the word embeddings; the "
                                     "package ties them, the word embeddings are kept)")
    prefix = getattr(model, "base_model_prefix", "bert")
    if auto_class == "AutoModel":  # a bare encoder has no `bert.` prefix in its own state dict
        sd = {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v for k, v in sd.items()}
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        raise ConversionError(f"Keys with no place in MosaicBERT ({auto_class}): {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}.")
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConversionError(f"Shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, "
                                  f"MosaicBERT {tuple(expected[key].shape)}.")
    missing = sorted(k for k in expected if k not in sd and k not in tied)
    allowed_fresh = re.compile(r"(mlp\.gated_layers\.weight|mlp\.wo\.(weight|bias))$") if fmt == "hf_bert" else None
    unexplained = [k for k in missing if not (allowed_fresh and allowed_fresh.search(k))]
    if unexplained:
        raise ConversionError(f"The checkpoint lacks {unexplained[:8]}{' ...' if len(unexplained) > 8 else ''} "
                              f"for {auto_class}.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)
    report.update(auto_class=auto_class, mapped_tensors=len(sd), config=sizes)

    # Everything checked: write.
    if out.exists() and overwrite:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "conversion_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, help="Checkpoint file or folder.")
    p.add_argument("--output", required=True, help="Folder to write the converted model to.")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument(*flag("--model-dir"), default=str(REPO_ROOT),
                   help="This package's folder (config, code, tokenizer).")
    p.add_argument(*flag("--vocab-size"), type=int, default=None, help="Rows of the output vocabulary.")
    p.add_argument(*flag("--num-attention-heads"), type=int, default=None, help="When no config.json gives it.")
    p.add_argument(*flag("--unsafe-pickle"), action="store_true", help="Allow torch.load(weights_only=False).")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    report = convert(args.input, args.output, args.format, args.model_dir, args.vocab_size,
                     args.num_attention_heads, args.unsafe_pickle, args.overwrite)
    print(f"Converted {report['input']} ({report['format']}) → {args.output} as {report['auto_class']}: "
          f"{report['mapped_tensors']} tensors mapped.")
    if report.get("vocab_resized"):
        print(f"  vocabulary resized {report['vocab_resized'][0]} → {report['vocab_resized'][1]} rows")
    for line in report["dropped"]:
        print(f"  not mapped: {line}")
    for line in report["fresh"]:
        print(f"  freshly initialised: {line}")
    return report


if __name__ == "__main__":
    # Bad input: a one-line error and status 2 (nothing written).
    exit_on_input_error(main)
