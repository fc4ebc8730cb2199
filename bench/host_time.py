"""Host time of a MosaicBERT forward on the CPU, where the tensor work is made to cost little: a proxy for the host
side of a small GPU batch, to compare checkouts without a GPU.

    python bench/host_time.py [--repo ../other-checkout ...] [--rounds 12] [--forwards 100] [--kernels] [--train]

A 12-layer model of width 64 (head size 32) on one sequence of 128 tokens, fp32, one thread; this checkout, each
`--repo` checkout (same config, same seed) and transformers' BertModel of the same size, built in one process and
timed in rotation (best of `--rounds` rounds of `--forwards` forwards each, µs per forward). The default runs the
plain PyTorch path (the ops themselves run, small). `--kernels` runs the path a GPU takes instead — the fused Triton
functions, their launchers and the attention kernel's `PackedSelfAttention` — with every kernel launch replaced by
a no-op (under `TRITON_INTERPRET=1` so that the package takes that path on CPU tensors; outputs are garbage, the
host work is real): what remains is the Python and allocation work each launch carries. BERT runs its real ops in
both modes. `--train`: a masked-LM training step instead (forward with labels on every seventh token, sparse
prediction for MosaicBERT, and backward; no optimizer; a 1024-token vocabulary for both models), where the kernels
run through autograd; the forward's share of the step is printed too.
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=12)


def stub_launches(model):
    """Makes `model`'s package take its kernel path on CPU tensors with every launch a no-op."""
    package = type(model).__module__.rsplit(".", 1)[0]
    modeling, ops = sys.modules[f"{package}.modeling_bert"], sys.modules[f"{package}.fused_ops"]
    attention = sys.modules[f"{package}.flash_attn_triton"]
    if not (ops.HAS_TRITON and ops._INTERPRET):
        sys.exit("--kernels needs triton installed (it sets TRITON_INTERPRET=1 itself)")
    if hasattr(ops, "stubbed_launches"):  # a second model of the same package
        return ops.stubbed_launches
    launches = ops.stubbed_launches = []

    def no_launch(*args, **kwargs):
        launches.append(1)

    def no_tuned_launch(*args, **kwargs):
        launches.append(1)
        return None, None

    ops.DEFAULT_USE_TRITON = True
    ops.launch = attention.launch = attention.relaunch = no_launch
    attention._launch_tuned = no_tuned_launch
    modeling.kernel_available = lambda device, dtype: True
    return launches


def build(repo, kernels, train=False):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    # training: a 1024-token vocabulary, so that the head's real matmuls (not host work) do not dominate
    extra = dict(sparse_prediction=True, vocab_size=1024) if train else {}
    config = AutoConfig.from_pretrained(Path(repo).resolve(), trust_remote_code=True, **SIZE, **extra)
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if train else AutoModel
    model = auto.from_config(config, trust_remote_code=True).train(train)
    if kernels:
        model.launches = stub_launches(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", nargs="*", default=[], help="other MosaicBERT checkouts to time beside this one")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--forwards", type=int, default=100, help="forwards per model and round")
    parser.add_argument("--kernels", action="store_true", help="the GPU's kernel path, launches stubbed out")
    parser.add_argument("--train", action="store_true", help="a training step (forward with labels + backward)")
    args = parser.parse_args()
    if args.kernels:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import contextlib

    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.set_num_threads(1)
    models = {"MosaicBERT": build(REPO, args.kernels, args.train)}
    for repo in args.repo:
        models[f"MosaicBERT {repo}"] = build(repo, args.kernels, args.train)
    vocab = models["MosaicBERT"].config.vocab_size
    bert = (BertForMaskedLM if args.train else BertModel)(BertConfig(vocab_size=vocab, attn_implementation="sdpa",
                                                                      **SIZE))
    models["BERT sdpa"] = bert.train(args.train)
    ids = torch.randint(5, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if args.train:
        batch["labels"] = torch.where(torch.arange(128) % 7 == 0, ids, -100)

    def call(model):
        """Seconds of the forward (the backward, with --train, runs after it)."""
        start = time.perf_counter()
        out = model(**batch)
        forward = time.perf_counter() - start
        if args.train:
            out.loss.backward()
        return forward

    best = dict.fromkeys(models, float("inf"))
    best_forward = dict.fromkeys(models, float("inf"))  # --train: the forward's part of the best round
    with contextlib.nullcontext() if args.train else torch.inference_mode():
        for name, model in models.items():
            # every package's launches: a custom op is registered once per process, by the first package imported,
            # and serves the others' calls through the dispatcher
            before = sum(len(m.launches) for m in models.values() if hasattr(m, "launches"))
            for _ in range(10):
                call(model)
            launched = sum(len(m.launches) for m in models.values() if hasattr(m, "launches")) - before
            if args.kernels and name != "BERT sdpa" and not launched:
                sys.exit(f"{name} took no kernel path: nothing was launched")
        for _ in range(args.rounds):
            for name, model in models.items():
                start, forward = time.perf_counter(), 0.0
                for _ in range(args.forwards):
                    forward += call(model)
                seconds = (time.perf_counter() - start) / args.forwards
                if seconds < best[name]:
                    best[name], best_forward[name] = seconds, forward / args.forwards
    path = "kernel path, launches stubbed" if args.kernels else "PyTorch path"
    unit = "training step (forward + backward)" if args.train else "forward"
    print(f"torch {torch.__version__}; {path}; best of {args.rounds} rounds of {args.forwards} calls")
    extra = " of it, forward |" if args.train else ""
    print(f"| model | µs per {unit} | × BERT |{extra}\n|---|---:|---:|" + ("---:|" if args.train else ""))
    for name, seconds in best.items():
        forward = f" {best_forward[name] * 1e6:.0f} |" if args.train else ""
        print(f"| {name} | {seconds * 1e6:.0f} | {seconds / best['BERT sdpa']:.2f} |{forward}")


if __name__ == "__main__":
    main()
