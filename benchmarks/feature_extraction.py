"""Feature extraction throughput: DinoModel vs transformers' ViTModel (SDPA) with the same weights.

A random ViT-S/16 (or another preset) is converted with `dino_hf.convert.export.to_vit_model`; both models
embed the same images of the native size in inference mode, in alternating rounds, and the best
round of each is kept. The CLS features are compared first (they must agree). On a GPU both run
under bf16 autocast.

    python benchmarks/feature_extraction.py                 # CPU: batch 8, 3 rounds of 2 batches
    python benchmarks/feature_extraction.py --batch 256     # GPU
"""

import argparse
import time

import torch

from dino_hf import DinoConfig, DinoModel
from dino_hf.convert.export import to_vit_model


def timed(fn, pixels, batches, cuda):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn(pixels)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16", help="a DinoModel preset")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (CPU 8, GPU 256)")
    parser.add_argument("--batches", type=int, default=None, help="batches per round (CPU 2, GPU 20)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per model (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU default 1: shared cores)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (256 if cuda else 8)
    batches = args.batches or (20 if cuda else 2)
    if not cuda:
        torch.set_num_threads(args.threads or 1)

    torch.manual_seed(0)
    ours = DinoModel(DinoConfig.from_preset(args.model)).eval()
    theirs = to_vit_model(ours)
    ours, theirs = ours.to(device), theirs.to(device)
    size = ours.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    @torch.inference_mode()
    def ours_fn(x):
        with autocast:
            return ours(x).pooler_output

    @torch.inference_mode()
    def theirs_fn(x):
        with autocast:
            return theirs(x).pooler_output

    difference = (ours_fn(pixels).float() - theirs_fn(pixels).float()).abs().max().item()
    best = {"ours": float("inf"), "theirs": float("inf")}
    for _ in range(args.rounds):
        best["ours"] = min(best["ours"], timed(ours_fn, pixels, batches, cuda))
        best["theirs"] = min(best["theirs"], timed(theirs_fn, pixels, batches, cuda))
    rates = {name: batch * batches / seconds for name, seconds in best.items()}

    hardware = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(
        f"{args.model} at {size} px, batch {batch}, {'bf16 autocast' if cuda else 'fp32'}, {hardware}, "
        f"best of {args.rounds} rounds of {batches} batches; max |feature difference| {difference:.2e}"
    )
    print(f"{'':10s} {'DinoModel':>10s} {'ViTModel (' + theirs.config._attn_implementation + ')':>16s} {'ratio':>7s}")
    print(f"{'images/s':10s} {rates['ours']:10.1f} {rates['theirs']:16.1f} {rates['ours'] / rates['theirs']:6.2f}x")


if __name__ == "__main__":
    main()
