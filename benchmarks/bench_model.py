"""Latency and throughput of one scoring forward pass of the mPLUG-Owl2 port, with random weights.

Times `iqa_cli.scoring.read_levels` (LM head at the last position only, closed-set level softmax) against
the reference's way of reading levels from the same port (the LM head over every position, then the
last row picked out), in the same run, at several batch sizes. Reports ms per batch, images/s and peak
memory.

    python benchmarks/bench_model.py                         # tiny model on CPU (issue 3's CPU latency)
    python benchmarks/bench_model.py --config mplug-owl2-7b --device cuda --dtype bfloat16 --batch-sizes 1,16,64

The 7B run needs a GPU with about 20 GB free; weights are random (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from iqa_cli.models.mplug_owl2.abstractor import abstractor_pos_embeds
from iqa_cli.models.mplug_owl2.backbone import wrap
from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.moments import level_moments
from iqa_cli.scoring.readout import Readout, read_levels

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run

# The default prompt's ids as the released tokenizer gives them (tests/fixtures/README.md); the tiny model's
# vocabulary is smaller, so ids are folded into it there (timing does not depend on which ids they are).
PROMPT_IDS = (1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200, 29871,
              319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338)  # fmt: skip
LEVEL_IDS = (4319, 6460, 6534, 1781, 15129)  # bad, poor, fair, good, excellent


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> MPLUGOwl2ForCausalLM:
    """Random weights without a CPU copy of the full model: built on meta, materialized on the device."""
    config = MPLUGOwl2Config.from_name(name)
    with torch.device("meta"):
        model = MPLUGOwl2ForCausalLM(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and pname.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    q_pos, k_pos = abstractor_pos_embeds(config.abstractor, device)  # the only buffers: fixed sin-cos tables
    for bname, buf in model.named_buffers():
        buf.copy_(q_pos if bname.endswith("q_pos_embed") else k_pos)
    return model.to(dtype).eval()


def readout_for(config: MPLUGOwl2Config) -> Readout:
    vocab = config.language.vocab_size
    ids = tuple(i if i < 0 else i % vocab for i in PROMPT_IDS)
    levels = tuple(i % vocab for i in LEVEL_IDS)
    return Readout(ids, levels, ("bad", "poor", "fair", "good", "excellent"), "default prompt")


@torch.inference_mode()
def reference_readout(model: MPLUGOwl2ForCausalLM, pixels: torch.Tensor, readout: Readout):
    """The reference's way: logits over every position, then the last one's level logits."""
    ids = torch.tensor(readout.input_ids, device=model.device).expand(pixels.shape[0], -1)
    logits = model(ids, pixels.to(model.device, model.dtype), logits_at="all").logits[:, -1]
    return level_moments(logits[:, list(readout.level_token_ids)], readout.centers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device: torch.device, repeat: int, warmup: int) -> list[list[float]]:
    """Times each fn `repeat` times, alternating between them, so that drift in the machine's speed (other
    load, clock changes) hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mplug-owl2-tiny", help="mplug-owl2-tiny or mplug-owl2-7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per batch size")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.config, device, dtype)
    backbone = wrap(model)
    config = model.config
    side = config.vision.image_size
    readout = readout_for(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.config}: {n_params / 1e6:,.1f}M parameters, {side} px, {model.num_visual_tokens} visual tokens, "
        f"{len(readout.input_ids) - 1 + model.num_visual_tokens} LLM positions; device {device} {args.dtype}; "
        f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} CPU threads"
    )
    header = ("batch", "ours ms", "ours img/s", "ref ms", "ref img/s", "ratio", "peak MB")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 9, 10, 9, 9, 5, 8), strict=True)))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        gen = torch.Generator().manual_seed(bs)
        pixels = torch.randn(bs, 3, side, side, generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours, ref = time_interleaved(
            [
                lambda pixels=pixels: read_levels(backbone, {"pixel_values": pixels}, readout),
                lambda pixels=pixels: reference_readout(model, pixels, readout),
            ],
            device,
            args.repeat,
            args.warmup,
        )
        peak = peak_memory_mb(device)
        ours_s, ref_s = statistics.median(ours), statistics.median(ref)
        print(
            f"{bs:>5}  {ours_s * 1e3:>9.2f}  {bs / ours_s:>10.1f}  {ref_s * 1e3:>9.2f}  {bs / ref_s:>9.1f}  "
            f"{ref_s / ours_s:>5.2f}  {peak:>8.0f}"
        )
        if args.json:
            row = {"batch": bs, "ours_s": ours_s, "reference_s": ref_s, "peak_mb": peak, "config": args.config}
            print(json.dumps(row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
