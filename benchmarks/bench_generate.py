"""Generation throughput: batched cached sampling with and without guidance, and the Serve job end to end.

    python benchmarks/bench_generate.py [--config configs/tiny.yaml] [--checkpoint ...] [--device cpu|cuda]
        [--batches 1 8 32] [--prompts 192] [--skip-serve]

Prints JSON: image tokens/s per batch size for ``cond_scale`` 1 and guided, in the sampler's precision
(``sampling.precision``, auto: bf16 where native), the guidance cost ratio (both branches share one batched
pass), and prompts/s of the evaluation job through Ray Serve versus a plain Ray Data actor pool running the same
generate/score code over the same prompts (target: Serve >= 90% of the pool). Untrained models of the config's
sizes are used unless checkpoints are given (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from model_timing import machine_info, write_report

from dalle_core.checkpoint import save_model
from dalle_core.clip import CLIP
from dalle_core.dalle import DALLE
from dalle_core.sampling import PromptChecker
from dalle_core.tokenizer import BPETokenizer
from dalle_core.train_utils import DTYPES, clock, precision_choice
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config


def sampling_rate(model: DALLE, batch: int, cond_scale: float, device: str, repeats: int) -> float:
    """Median image tokens/s of ``generate_image_codes`` at one batch size (after one warm-up call)."""
    text = torch.randint(1, model.config.num_text_tokens, (batch, model.config.text_seq_len), device=device)
    times = []
    for i in range(repeats + 1):
        start = clock(text.device)
        model.generate_image_codes(text, cond_scale=cond_scale, top_k=0.9, use_cache=True,
                                   generator=torch.Generator(device).manual_seed(i))
        if i:
            times.append(clock(text.device) - start)
    return batch * model.config.image_seq_len / statistics.median(times)


def bench_sampling(config: Config, checkpoint: str | None, device: str, batches: list[int], repeats: int,
                   guided_scale: float) -> dict[str, Any]:
    from dalle_core.checkpoint import load_model

    precision, why = precision_choice(config.sampling.precision, device)
    model = (load_model(checkpoint, device) if checkpoint else DALLE(config.dalle)).to(device, DTYPES[precision])
    model.eval()
    out: dict[str, Any] = {"precision": precision, "precision_reason": why, "guided_cond_scale": guided_scale,
                           "by_batch": {}}
    for batch in batches:
        plain = sampling_rate(model, batch, 1.0, device, repeats)
        guided = sampling_rate(model, batch, guided_scale, device, repeats)
        out["by_batch"][str(batch)] = {"unguided_tokens_per_s": plain, "guided_tokens_per_s": guided,
                                       "guidance_cost_ratio": plain / guided}
    out["max_guidance_cost_ratio"] = max(v["guidance_cost_ratio"] for v in out["by_batch"].values())
    return out


def write_models(config: Config, folder: Path) -> Config:
    """Untrained models of the config's sizes + a tokenizer on synthetic captions, where paths expect them (the
    DALLE as a trainer publishes it, at ``paths.dalle``)."""
    from pipelines.data import synthetic

    config = Config.load(None, {"paths.root": str(folder), **_flatten(config)})
    paths = config.paths.resolved()
    BPETokenizer.train(synthetic.every_combination_captions(), paths.tokenizer, config.tokenizer.vocab_size,
                       config.tokenizer.text_seq_len)
    torch.manual_seed(0)
    save_model(DiscreteVAE(config.vae), paths.vae)
    save_model(CLIP(config.clip), paths.clip)
    save_model(DALLE(config.dalle), paths.dalle)
    return config


def _flatten(config: Config) -> dict[str, Any]:
    from dalle_core.config import to_dict

    derived = {"dalle": {"num_text_tokens", "text_seq_len", "num_image_tokens", "image_fmap_size"},
               "clip": {"num_text_tokens", "text_seq_len", "image_size", "channels"}}
    flat = {}
    for section, values in to_dict(config).items():
        if section == "paths":
            continue
        for key, value in values.items():
            if key not in derived.get(section, ()):
                flat[f"{section}.{key}"] = value
    return flat


def local_client_class() -> type:
    """A plain Ray Data actor that loads the models itself and runs the Serve deployments' batch functions:
    the same work as the Serve path without Serve's request routing and batching queues."""
    from pipelines.artifacts import ModelPaths
    from pipelines.serve.app import generate_batch, score_batch
    from pipelines.serve.evaluation import ServeClient

    class LocalClient(ServeClient):
        def __init__(self, paths: ModelPaths, config: Config, **kwargs: Any) -> None:
            from dalle_core.checkpoint import load_model
            from dalle_core.sampling import load_generator

            self.output, self.n, self.top = kwargs["output"], kwargs["num_candidates"], kwargs["top_images"]
            self.seed, self.settings, self.sampling = kwargs["seed"], kwargs["settings"], config.sampling
            self.model = load_generator(paths.checkpoint, paths.vae)
            self.checker = PromptChecker(BPETokenizer.load(paths.tokenizer, config.tokenizer.text_seq_len))
            self.clip = load_model(paths.clip)

        def _candidates(self, records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[float] | None]]:
            requests = [{"prompt": r["prompt"], "key": r["key"], "num_candidates": self.n} for r in records]
            gens = generate_batch(self.model, self.checker, self.sampling, requests)
            return list(zip(gens, score_batch(self.clip, gens), strict=True))

    return LocalClient


def bench_end_to_end(config: Config, num_prompts: int, workdir: Path) -> dict[str, Any]:
    """The same prompts through the Serve job and through a plain actor pool (one actor per Generator
    replica, batches of ``evaluate.max_batch_size`` prompts), each run at a quarter of ``num_prompts`` and at all
    of them. The wall time of the whole run includes starting the client actors (the pool's also load the
    models; Serve's replicas are up before its clock starts), so the headline is the marginal rate: the extra
    prompts over the extra seconds, what a long evaluation runs at."""
    import ray

    from pipelines.artifacts import model_paths
    from pipelines.serve.evaluation import client_kwargs, load_prompts, run_evaluation, stream_prompts

    config = Config.load(None, {"paths.root": str(workdir), **_flatten(config), "evaluate.num_prompts": num_prompts,
                                "evaluate.prompt_source": "synthetic", "evaluate.http_port": _free_port()})
    paths, ev = model_paths(config), config.evaluate
    prompts = load_prompts(config)
    sizes = (len(prompts) // 4, len(prompts))

    def serve_seconds(n: int) -> float:
        metrics = run_evaluation(config, paths, str(workdir / f"serve_{n}"), prompts[:n])
        return metrics["generation_s"]

    def plain_seconds(n: int) -> float:
        start = time.perf_counter()
        kwargs = dict(client_kwargs(config, str(workdir / f"plain_{n}")), paths=paths, config=config)
        rows = stream_prompts(prompts[:n], local_client_class(), kwargs, ev.max_batch_size, ev.generator_replicas,
                              num_cpus=ev.generator_num_cpus, num_gpus=ev.generator_num_gpus)
        assert len(rows) == n * config.sampling.num_candidates
        return time.perf_counter() - start

    ray.init(num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data starts its helper actors on a process's first dataset: paid here, not by whichever path runs first.
    ray.data.range(1).materialize()
    try:
        paths_timed = {"serve": serve_seconds, "plain_actor_pool": plain_seconds}
        seconds = {name: [timed(n) for n in sizes] for name, timed in paths_timed.items()}
    finally:
        ray.shutdown()
    out: dict[str, Any] = {"num_prompts": list(sizes), "num_candidates": config.sampling.num_candidates}
    for name, (short, full) in seconds.items():
        out[name] = {"seconds": [short, full], "prompts_per_s_including_client_start": sizes[1] / full,
                     "marginal_prompts_per_s": (sizes[1] - sizes[0]) / (full - short)}
    serve, plain = out["serve"], out["plain_actor_pool"]
    out["serve_over_plain_throughput"] = serve["marginal_prompts_per_s"] / plain["marginal_prompts_per_s"]
    out["serve_over_plain_including_client_start"] = (serve["prompts_per_s_including_client_start"]
                                                      / plain["prompts_per_s_including_client_start"])
    out["target_serve_over_plain"] = 0.9
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--checkpoint", help="DALLE model file for the sampling benchmark (default: untrained)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cond-scale", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=192,
                        help="prompts for the end-to-end comparison (each path also runs a quarter of them)")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    config = Config.load(args.config)
    torch.manual_seed(0)
    report: dict[str, Any] = {"device": args.device, "machine": machine_info(args.device),
                              "dalle": {"dim": config.dalle.dim, "depth": config.dalle.depth,
                                        "image_seq_len": config.dalle.image_seq_len}}
    report["sampling"] = bench_sampling(config, args.checkpoint, args.device, args.batches, args.repeats,
                                        args.cond_scale)
    if not args.skip_serve:
        with tempfile.TemporaryDirectory() as tmp:
            write_models(config, Path(tmp))
            report["end_to_end"] = bench_end_to_end(config, args.prompts, Path(tmp))
    write_report(report, args.out)


if __name__ == "__main__":
    main()
