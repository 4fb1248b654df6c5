"""Model throughput: training tokens/s against DALLE-pytorch 1.6.6, and cached vs recomputed generation.

    python benchmarks/bench_model.py [--steps 6] [--out bench_model.json]

Fixed config (issue 2): dim 256, depth 4, heads 4, text 32 + image 64 tokens, batch 8, the reference's
default text vocabulary (10000) and a 512-code dVAE. Ours and the reference run in this one process, same
threads and dtype, alternating, best of several rounds. The reference is imported when installed
(``make bench`` installs it from ../shared/peer); otherwise its figures are reported as missing.
"""

from __future__ import annotations

import argparse

import model_timing as timing
import torch

from dalle_core.config import DALLEConfig
from dalle_core.dalle import DALLE

BATCH, TEXT_LEN, FMAP, TEXT_VOCAB, CODEBOOK = 8, 32, 8, 10000, 512


def our_model() -> DALLE:
    cfg = DALLEConfig(num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, num_image_tokens=CODEBOOK,
                      image_fmap_size=FMAP, dim=256, depth=4, heads=4, dim_head=64)
    return DALLE(cfg)


def peer_model() -> torch.nn.Module | None:
    classes = timing.import_peer()
    if classes is None:
        return None
    PeerDALLE, PeerVAE = classes  # noqa: N806 (classes)
    vae = PeerVAE(image_size=FMAP * 4, num_layers=2, num_tokens=CODEBOOK, codebook_dim=64, hidden_dim=16)
    return PeerDALLE(dim=256, vae=vae, num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, depth=4, heads=4,
                     dim_head=64, attn_types=("full",), rotary_emb=True, shift_tokens=True)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, TEXT_VOCAB, (BATCH, TEXT_LEN), generator=g)
    text[:, 20:] = 0
    return text, torch.randint(0, CODEBOOK, (BATCH, FMAP * FMAP), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best round counts")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, peer = our_model(), peer_model()
    text, codes = data()
    tokens_per_step = BATCH * ours.seq_len
    report: dict = {
        "config": {"dim": 256, "depth": 4, "heads": 4, "text_seq_len": TEXT_LEN, "image_seq_len": FMAP * FMAP,
                   "batch": BATCH, "text_vocab": TEXT_VOCAB, "codebook": CODEBOOK},
        "machine": timing.machine_info(),
        "params": {"ours": ours.num_params(), "reference": None if peer is None else timing.peer_params(peer)},
        "train": {},
        "generate": {},
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best_ours, best_peer, peak = float("inf"), float("inf"), 0.0
        for _ in range(args.rounds):
            peak = max(peak, timing.matmul_peak(dtype, ours, tokens_per_step))
            best_ours = min(best_ours, timing.train_step_seconds(ours, False, dtype, args.steps, (text, codes)))
            if peer is not None:
                best_peer = min(best_peer, timing.train_step_seconds(peer, True, dtype, args.steps, (text, codes)))
        tps = tokens_per_step / best_ours
        entry = {"tokens_per_s": tps, "matmul_peak_gflops": peak / 1e9,
                 "mfu": timing.checked_mfu(name, tps, ours, peak)}
        if peer is not None:
            entry["reference_tokens_per_s"] = tokens_per_step / best_peer
            entry["speedup_vs_reference"] = best_peer / best_ours
        report["train"][name] = entry

        image_tokens = BATCH * FMAP * FMAP
        cached = min(timing.generation_seconds(ours, text, 1.0, dtype) for _ in range(2))
        recomputed = timing.generation_seconds(ours, text, 1.0, dtype, use_cache=False)
        guided = min(timing.generation_seconds(ours, text, 3.0, dtype) for _ in range(2))
        gen = {
            "cached_image_tokens_per_s": image_tokens / cached,
            "recompute_image_tokens_per_s": image_tokens / recomputed,
            "cache_speedup": recomputed / cached,
            "guided_cached_image_tokens_per_s": image_tokens / guided,
            "guidance_cost": guided / cached,
        }
        if peer is not None:
            peer_guided = timing.peer_generation_seconds(peer, text, 3.0, dtype)
            gen["reference_guided_cached_image_tokens_per_s"] = image_tokens / peer_guided
            gen["guided_speedup_vs_reference"] = peer_guided / guided
        report["generate"][name] = gen
    timing.write_report(report, args.out)


if __name__ == "__main__":
    main()
