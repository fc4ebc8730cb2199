"""Host time of a MosaicBERT forward on the CPU, where the tensor work is made to cost little: a proxy for the host
side of a small GPU batch, to compare checkouts without a GPU.

    python bench/host_time.py [--repo ../other-checkout ...] [--rounds 12] [--forwards 100] [--kernels]

A 12-layer model of width 64 (head size 32) on one sequence of 128 tokens, fp32, one thread; this checkout, each
`--repo` checkout (same config, same seed) and transformers' BertModel of the same size, built in one process and
timed in rotation (best of `--rounds` rounds of `--forwards` forwards each, µs per forward). The default runs the
plain PyTorch path (the ops themselves run, small). `--kernels` runs the path a GPU takes instead — the fused Triton
functions, their launchers and the attention kernel's `PackedSelfAttention` — with every kernel launch replaced by
a no-op (under `TRITON_INTERPRET=1` so that the package takes that path on CPU tensors; outputs are garbage, the
host work is real): what remains is the Python and allocation work each launch carries. BERT runs its real ops in
both modes.
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


def build(repo, kernels):
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(Path(repo).resolve(), trust_remote_code=True, **SIZE)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, trust_remote_code=True).eval()
    if kernels:
        model.launches = stub_launches(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", nargs="*", default=[], help="other MosaicBERT checkouts to time beside this one")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--forwards", type=int, default=100, help="forwards per model and round")
    parser.add_argument("--kernels", action="store_true", help="the GPU's kernel path, launches stubbed out")
    args = parser.parse_args()
    if args.kernels:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from transformers import BertConfig, BertModel

    torch.set_num_threads(1)
    models = {"MosaicBERT": build(REPO, args.kernels)}
    for repo in args.repo:
        models[f"MosaicBERT {repo}"] = build(repo, args.kernels)
    vocab = models["MosaicBERT"].config.vocab_size
    models["BERT sdpa"] = BertModel(BertConfig(vocab_size=vocab, attn_implementation="sdpa", **SIZE)).eval()
    ids = torch.randint(5, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for name, model in models.items():
            for _ in range(10):
                model(input_ids=ids, attention_mask=mask)
            if args.kernels and name != "BERT sdpa" and not model.launches:
                sys.exit(f"{name} took no kernel path: nothing was launched")
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(args.forwards):
                    model(input_ids=ids, attention_mask=mask)
                best[name] = min(best[name], (time.perf_counter() - start) / args.forwards)
    path = "kernel path, launches stubbed" if args.kernels else "PyTorch path"
    print(f"torch {torch.__version__}; {path}; best of {args.rounds} rounds of {args.forwards} forwards")
    print("| model | µs per forward | × BERT |\n|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e6:.0f} | {seconds / best['BERT sdpa']:.2f} |")


if __name__ == "__main__":
    main()
