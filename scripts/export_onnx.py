"""Export MosaicBERT to ONNX with dynamic batch and sequence axes, then check the graph in onnxruntime.

    python scripts/export_onnx.py --model . --task fill-mask --output mosaic-bert-mlm.onnx

Tasks and graphs (inputs are int64 `(batch, sequence)`: input_ids, attention_mask, token_type_ids):

    feature-extraction    BertModel                      last_hidden_state (batch, sequence, hidden),
                                                         pooler_output (batch, hidden)
    fill-mask             BertForMaskedLM                logits (batch, sequence, vocab)
    text-classification   BertForSequenceClassification  logits (batch, num_labels)

While exporting, the model runs its dense path: every position goes through the layers and attention takes one
(batch, heads, sequence, sequence) mask built from attention_mask (ALiBi within each sequence, nothing across
padding), so the graph has no data-dependent shapes. Outputs are zero at padding, as in PyTorch.

After exporting, the graph runs in onnxruntime on a ragged batch of another size and lengths than the export
example, and its outputs are compared with PyTorch's (float32, `--atol`, default 1e-4). `--no-check` skips that.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

TASKS = {
    "feature-extraction": ("AutoModel", ["last_hidden_state", "pooler_output"]),
    "fill-mask": ("AutoModelForMaskedLM", ["logits"]),
    "text-classification": ("AutoModelForSequenceClassification", ["logits"]),
}
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def load_model(model_path, task, **config_overrides):
    auto_class = getattr(transformers, TASKS[task][0])
    model = auto_class.from_pretrained(model_path, trust_remote_code=True, **config_overrides)
    return model.eval()


def ragged_batch(lengths, vocab_size, seqlen=None, left_padding=False, seed=0):
    """int64 input_ids, attention_mask, token_type_ids of shape (len(lengths), seqlen) with those valid lengths."""
    g = torch.Generator().manual_seed(seed)
    seqlen = seqlen or max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), seqlen), generator=g)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    token_type = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(seqlen - n, seqlen) if left_padding else slice(0, n)
        mask[row, span] = 1
        token_type[row, span] = (torch.arange(n) >= n // 2).long()  # a second segment in each row
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": token_type}


def export(model, output, task, opset=None):
    """Export with torch.onnx's dynamo exporter; batch and sequence axes dynamic."""
    example = ragged_batch([8, 5], model.config.vocab_size)
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    dynamic_shapes = {name: {0: batch, 1: sequence} for name in INPUTS}
    program = torch.onnx.export(
        model,
        (),
        kwargs=example,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=INPUTS,
        output_names=TASKS[task][1],
        opset_version=opset,
    )
    program.save(str(output))
    return output


def pytorch_outputs(model, task, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [out[name].numpy() for name in TASKS[task][1]]


def onnx_outputs(path, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: inputs[name].numpy() for name in INPUTS})


def check(model, path, task, atol=1e-4):
    """Largest |onnxruntime - PyTorch| over the outputs of ragged batches unlike the export example."""
    vocab = model.config.vocab_size
    worst = 0.0
    for inputs in (
        ragged_batch([13, 1, 7], vocab, seed=1),
        ragged_batch([3, 11, 11, 6, 2], vocab, seqlen=16, left_padding=True, seed=2),
        ragged_batch([21], vocab, seed=3),
    ):
        for ours, theirs in zip(onnx_outputs(path, inputs), pytorch_outputs(model, task, inputs)):
            assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
            worst = max(worst, float(np.abs(ours - theirs).max()))
    if worst > atol:
        raise AssertionError(f"onnxruntime and PyTorch differ by {worst:.2e} (> {atol:.0e}).")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".", help="folder or Hub id of the model (default: this folder)")
    parser.add_argument("--task", choices=sorted(TASKS), default="fill-mask")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--num-labels", type=int, default=None, help="text-classification: number of labels")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--no-check", action="store_true", help="do not compare onnxruntime with PyTorch")
    args = parser.parse_args(argv)

    overrides = {"num_labels": args.num_labels} if args.num_labels else {}
    model = load_model(args.model, args.task, **overrides)
    export(model, args.output, args.task, args.opset)
    print(f"wrote {args.output}")
    if not args.no_check:
        print(f"onnxruntime matches PyTorch: max abs difference {check(model, args.output, args.task, args.atol):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
