"""One GPU's first check, in one run of under 8 minutes: training speed and MFU, cached sampling eager and
from CUDA graphs, the image tokenizers and CLIP, and the training tasks' checkpoint collectives.

    python benchmarks/gpu_check.py --device cuda --out gpu_check.json     # one H100: ~5-7 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out tmp.json    # tiny shapes: < 60 s on 2 cores

Needs only PyTorch: the GPU machines that run it have no Ray, DeepSpeed or youtokentome (and maybe no PyYAML,
fsspec or Pillow). The dalle_core modules it imports touch those only in functions it never calls, so while
they import, any of those that is missing is stood in for by an empty module (named in ``stubbed_modules``);
anything that reaches into one raises. Sections (each guarded: an out-of-memory or any other error is recorded
in that section and the rest still run; each has a time budget, checked between measurements):

- ``train``: forward + backward + fused AdamW under bf16 autocast at the paper shape (bench_paper_shape.py's
  SHAPE) and at ``base`` width and depth (configs/base.yaml; depth halved on OOM): tokens/s and MFU against a
  matmul peak timed with CUDA events around back-to-back products (train_utils.measure_peak_flops), and against the
  spec sheet's H100 peak on a GPU;
- ``sampling``: cached sampling at batch 1, 8 and 32, plain and guided, eager and replayed from CUDA graphs
  (``sampling.cuda_graphs``), image tokens/s; and whether the graphs sample the eager tokens for the same seeds;
- ``encoders``: the dVAE encoder (DiscreteVAE at base's size), the VQGAN f16 encoder (random weights) and the
  CLIP scorer, pictures/s at 256 px;
- ``collectives``: a one-rank process group (NCCL on a GPU, gloo on a CPU) running, with tensors on the device,
  the collectives the training tasks run at checkpoint time (gather_floats' all_gather of float64, all_reduce,
  barrier, all_gather_object): ok or the error, each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

# Imported by dalle_core modules at their top but used only by functions this script never calls.
STUBBABLE = ("yaml", "fsspec", "ftfy", "youtokentome", "PIL", "numpy", "safetensors")
H100_BF16_PEAK = 9.89e14  # configs/base.yaml peak_flops_per_worker: H100 SXM bf16 dense
BUDGET_S = {"train": 150.0, "sampling": 210.0, "encoders": 45.0, "collectives": 30.0}  # on a GPU; 435 s in all


class _Missing:
    """What a stub module hands out: fails, naming the module, when used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError(f"{self._name}: not installed here (stubbed by gpu_check)")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an empty module for each import under the given top-level names."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in self.names:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@contextlib.contextmanager
def torch_only_imports(hide: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Lets dalle_core modules import where only torch is installed: each :data:`STUBBABLE` module that is
    missing (or named in ``hide``, to try that here) imports as an empty stub inside the block. The stubs leave
    ``sys.modules`` afterwards, so torch's own optional imports (numpy) still see the truth."""
    names = {n for n in STUBBABLE if n in hide or importlib.util.find_spec(n) is None}
    for name in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[name]
    finder = _StubFinder(names)
    sys.meta_path.insert(0, finder)
    try:
        yield sorted(names)
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m, mod in sys.modules.items() if isinstance(mod, _StubModule)]:
            del sys.modules[name]


def _import_project(hide: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    with torch_only_imports(hide) as stubbed:
        from model_timing import device_seconds, machine_info, train_step_seconds

        from dalle_core.clip import CLIP
        from dalle_core.config import CLIPConfig, DALLEConfig, VAEConfig
        from dalle_core.dalle import DALLE
        from dalle_core.train_utils import gather_floats, measure_peak_flops, mfu
        from dalle_core.vae import DiscreteVAE
        from dalle_core.vqgan import VQGAN, VQGANConfig
    lib = {"device_seconds": device_seconds, "machine_info": machine_info, "measure_peak_flops": measure_peak_flops,
           "train_step_seconds": train_step_seconds, "CLIP": CLIP, "CLIPConfig": CLIPConfig,
           "DALLEConfig": DALLEConfig, "VAEConfig": VAEConfig, "DALLE": DALLE, "gather_floats": gather_floats,
           "mfu": mfu, "DiscreteVAE": DiscreteVAE, "VQGAN": VQGAN, "VQGANConfig": VQGANConfig}
    return lib, stubbed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Check:
    """Shapes, dtype, device and the per-section deadline one run works with."""

    def __init__(self, args: argparse.Namespace, lib: dict[str, Any]) -> None:
        self.args, self.lib = args, lib
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.quick = args.quick
        # bf16 on a GPU; fp32 on a CPU, where bf16 without AMX runs many times slower (and the quick run is a
        # check that everything runs, not a figure)
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.deadline = float("inf")
        if self.quick:  # tiny: seconds on a CPU
            seq = {"text_seq_len": 8, "image_fmap_size": 4, "num_image_tokens": 128, "num_text_tokens": 256}
            self.paper = {**seq, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}
            self.base = {**seq, "dim": 64, "depth": 3, "heads": 2, "dim_head": 32}
            self.train_batch, self.train_steps, self.warmup = 2, 2, 1
            self.gen_batches, self.picture, self.picture_batch = [1, 8, 32], 64, 2
        else:
            from bench_paper_shape import SHAPE  # text 256 + 32 x 32 codes, 8192 codes; dim 512, depth 2
            self.paper = dict(SHAPE)
            self.base = {**SHAPE, "dim": 1536, "depth": args.base_depth, "heads": 24, "dim_head": 64}
            self.train_batch, self.train_steps, self.warmup = 8, 5, 2
            self.gen_batches, self.picture, self.picture_batch = [1, 8, 32], 256, 64

    def model(self, shape: dict[str, int], **overrides: object) -> Any:
        cfg = self.lib["DALLEConfig"](**{**shape, "attn_types": ["full"], "null_cond_prob": 0.1, **overrides})
        return self.lib["DALLE"](cfg).to(self.device)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def captions(model: Any, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions (the last quarter padded) and image codes."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.num_text_tokens, (batch, cfg.text_seq_len), generator=g)
    text[:, cfg.text_seq_len * 3 // 4:] = 0
    codes = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_seq_len), generator=g)
    return text.to(device), codes.to(device)


def free_memory(c: Check) -> None:
    import gc

    gc.collect()
    if c.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Sections


def train_section(c: Check) -> dict:
    """Training tokens/s and MFU at the paper shape and at base width and depth (halved until it fits)."""
    lib, out = c.lib, {"dtype": str(c.dtype).removeprefix("torch."), "batch": c.train_batch}
    square = 256 if c.quick else 8192
    peak_square = lib["measure_peak_flops"](c.device, dtype=c.dtype, shape=(square, square, square),
                                            seconds=0.03 if c.quick else 0.5)
    out["matmul_peak_square_tflops"] = peak_square / 1e12
    out["matmul_peak_square_shape"] = square
    for name, shape in (("paper_shape", c.paper), ("base", c.base)):
        if c.left() < 0:
            out[name] = {"skipped": "time budget"}
            continue
        depth, tried = shape["depth"], []
        while True:
            tried.append(depth)
            try:
                out[name] = _train_one(c, {**shape, "depth": depth}, peak_square)
                break
            except torch.OutOfMemoryError as exc:  # halve the depth: a number from a shallower model still says
                free_memory(c)                   # tokens/s per layer and MFU
                if depth == 1:
                    out[name] = {"error": f"OutOfMemoryError at depth 1: {exc}"}
                    break
                depth //= 2
        out[name]["depths_tried"] = tried
        free_memory(c)
    return out


def _train_one(c: Check, shape: dict[str, int], peak_square: float) -> dict:
    lib = c.lib
    model = c.model(shape)
    data = captions(model, c.train_batch, c.device)
    tokens = c.train_batch * model.seq_len
    if c.cuda:
        torch.cuda.reset_peak_memory_stats(c.device)
    step_s = lib["train_step_seconds"](model, False, c.dtype, c.train_steps, data, warmup=c.warmup)
    cfg = model.config
    seconds = 0.02 if c.quick else 0.3
    shapes = {"ff_in": (tokens, cfg.dim, 2 * cfg.ff_mult * cfg.dim), "image_logits": (tokens, cfg.dim,
                                                                                       cfg.num_image_tokens)}
    peaks = {k: lib["measure_peak_flops"](c.device, dtype=c.dtype, shape=s, seconds=seconds) for k, s in shapes.items()}
    peak = max([*peaks.values(), peak_square])
    tps = tokens / step_s
    entry = {"depth": cfg.depth, "dim": cfg.dim, "params": model.num_params(), "seq_len": model.seq_len,
             "step_s": step_s, "tokens_per_s": tps, "flops_per_token": model.flops_per_token(),
             "matmul_peak_tflops": peak / 1e12, **{f"matmul_peak_{k}_tflops": v / 1e12 for k, v in peaks.items()},
             "mfu": lib["mfu"](tps, model.flops_per_token(), peak)}
    if entry["mfu"] > 1:
        entry["mfu_warning"] = "above 1: the matmul peak was read low"
    if c.cuda:
        entry["mfu_vs_h100_spec"] = lib["mfu"](tps, model.flops_per_token(), H100_BF16_PEAK)
        entry["peak_allocated_gib"] = torch.cuda.max_memory_allocated(c.device) / 2**30
    del model
    return entry


def sampling_section(c: Check) -> dict:
    """Exactness first (small model, the graphs against eager for the same seeds), then speed at base width."""
    out: dict = {"cuda_graphs": c.cuda, "mode_names": {"eager": "DALLE.cached_step",
                                                       "graphs" if c.cuda else "static":
                                                       "DALLE.static_sampling_step"}}
    out["tokens_match"] = _sampling_exactness(c)
    free_memory(c)
    shape = {**c.base, "depth": c.args.sample_depth or c.base["depth"]}
    model = c.model(shape).to(c.dtype).eval()  # as ImageGenerator runs it: weights, so the KV cache, in dtype
    out.update(model={"dim": shape["dim"], "depth": shape["depth"], "dtype": str(c.dtype).removeprefix("torch.")},
               image_tokens=model.config.image_seq_len)
    static = model.static_sampling_step(cuda_graphs=c.cuda)
    graphs_name = "graphs" if c.cuda else "static"
    last: dict[str, float] = {}
    for batch in c.gen_batches:
        entry = out[f"batch_{batch}"] = {}
        text = captions(model, batch, c.device)[0]
        for guided, scale in ((False, 1.0), (True, 3.0)):
            for mode, step in (("eager", None), (graphs_name, static)):
                key = f"{mode}{'_guided' if guided else ''}"
                estimate = last.get(mode, 0.0) * (2 if guided else 1)
                if batch != c.gen_batches[0] and c.left() < estimate:  # the first batch always: one figure each
                    entry[key] = {"skipped": "time budget"}
                    continue
                passes = [_sample_seconds(c, model, text, scale, step)]
                if step is not None and c.cuda:  # the first pass captured the graphs: time a second
                    passes.append(_sample_seconds(c, model, text, scale, step))
                entry[f"{key}_image_tokens_per_s"] = batch * model.config.image_seq_len / passes[-1]
                entry[f"{key}_pass_s"] = passes[-1]
                if len(passes) > 1:
                    entry[f"{key}_first_pass_s"] = passes[0]
                last[mode] = passes[-1]
        for guided in ("", "_guided"):
            fast = entry.get(f"{graphs_name}{guided}_image_tokens_per_s")
            eager = entry.get(f"eager{guided}_image_tokens_per_s")
            if fast and eager:
                entry[f"{graphs_name}{guided}_speedup"] = fast / eager
    out["graphs_captured"] = static.num_graphs
    del model, static
    return out


def _sample_seconds(c: Check, model: Any, text: torch.Tensor, scale: float, step: Any) -> float:
    c.sync()
    began = time.perf_counter()
    model.generate_image_codes(text, cond_scale=scale, step=step, generator=torch.Generator(c.device).manual_seed(0))
    c.sync()
    return time.perf_counter() - began


def _sampling_exactness(c: Check) -> dict:
    """At the paper shape (depth 2, guided, 4 prompts, every image token): the CUDA graphs must sample exactly
    what the same static step samples eagerly, and the eager cached step's tokens (fp32: every one; bf16: the
    attention kernels differ, with and without a mask, so rows may part from some token on)."""
    result = {}
    shape = {**c.paper, "depth": 2}
    for dtype in sorted({torch.float32, c.dtype}, key=str):
        model = c.model(shape).to(dtype).eval()
        text = captions(model, 4, c.device, seed=1)[0]
        runs = {}
        modes = [("eager", None), ("static", model.static_sampling_step(cuda_graphs=False))]
        if c.cuda:
            modes.append(("graphs", model.static_sampling_step(cuda_graphs=True)))
        for name, step in modes:
            runs[name] = model.generate_image_codes(text, cond_scale=3.0, step=step,
                                                    generator=torch.Generator(c.device).manual_seed(5))
        last = runs["graphs" if c.cuda else "static"]
        name = str(dtype).removeprefix("torch.")
        result[name] = {"static_equals_eager": bool(torch.equal(runs["static"], runs["eager"])),
                        "match_vs_eager": float((last == runs["eager"]).float().mean()),
                        "first_difference": _first_difference(last, runs["eager"])}
        if c.cuda:
            result[name]["graphs_equal_static"] = bool(torch.equal(runs["graphs"], runs["static"]))
            result[name]["graphs_equal_eager"] = bool(torch.equal(runs["graphs"], runs["eager"]))
        del model
    return result


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first image-token index where any row differs (None: none does)."""
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else None


def encoders_section(c: Check) -> dict:
    """Pictures/s of each image tokenizer's encoder and of CLIP scoring (fp32; TF32 matmuls on a GPU)."""
    lib, out = c.lib, {"picture_px": c.picture, "batch": c.picture_batch}
    if c.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size, batch = c.picture, c.picture_batch
    images = torch.rand(batch, 3, size, size, device=c.device)
    repeats = 2 if c.quick else 5

    def rate(fn: Callable[[], object]) -> float:
        fn()  # warm-up: cuDNN's algorithm search
        return batch * repeats / lib["device_seconds"](lambda: [fn() for _ in range(repeats)], c.device)

    def vae() -> Any:
        small = {"num_resnet_blocks": 1, "hidden_dim": 16} if c.quick else {"num_resnet_blocks": 2, "hidden_dim": 256}
        cfg = lib["VAEConfig"](image_size=size, num_layers=3, num_tokens=8192, codebook_dim=512, **small)
        return lib["DiscreteVAE"](cfg)

    def vqgan() -> Any:
        cfg = lib["VQGANConfig"](ch=32, ch_mult=[1, 1, 2], resolution=size, attn_resolutions=[16], n_embed=512,
                                 embed_dim=32, z_channels=32, num_res_blocks=1) if c.quick else lib["VQGANConfig"]()
        return lib["VQGAN"](cfg)

    builders = {"dvae_encoder": vae, "vqgan_encoder": vqgan}
    for name, build in builders.items():
        if c.left() < 0:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            model = build().to(c.device).eval()
            out[name] = {"pictures_per_s": rate(lambda m=model: m.get_codebook_indices(images)),
                         "params": sum(p.numel() for p in model.parameters())}
            del model
        except Exception as exc:  # one tokenizer failing (OOM, a shape) must not hide the other
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        free_memory(c)
    try:
        dims = {"dim_text": 64, "dim_image": 64, "dim_latent": 64, "text_depth": 1, "image_depth": 1, "heads": 2,
                "patch_size": 16, "text_seq_len": 16} if c.quick else \
            {"dim_text": 512, "dim_image": 512, "dim_latent": 512, "text_depth": 6, "image_depth": 6, "heads": 8,
             "patch_size": 16, "text_seq_len": 256}
        clip = lib["CLIP"](lib["CLIPConfig"](num_text_tokens=16384, image_size=size, **dims)).to(c.device).eval()
        text = torch.randint(1, 16384, (batch, dims["text_seq_len"]), device=c.device)
        out["clip_score"] = {"pictures_per_s": rate(lambda: clip.score(text, images)),
                             "params": sum(p.numel() for p in clip.parameters())}
    except Exception as exc:
        out["clip_score"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def collectives_section(c: Check) -> dict:
    """A one-rank group with the training workers' backend, and the collectives their checkpoints run."""
    import torch.distributed as dist

    backend = "nccl" if c.cuda else "gloo"
    out: dict = {"backend": backend, "world_size": 1}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if c.cuda:
        torch.cuda.set_device(c.device)
    kwargs = {"device_id": c.device} if c.cuda else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    try:
        def gather() -> None:
            got = c.lib["gather_floats"]([1.5, 2.0**40, -3.25], c.device)
            assert got == [[1.5, 2.0**40, -3.25]], got

        def all_reduce() -> None:
            sums = torch.tensor([1.0, 2.5, 1.0], dtype=torch.float64, device=c.device)
            dist.all_reduce(sums)
            assert sums.tolist() == [1.0, 2.5, 1.0], sums

        def barrier() -> None:
            dist.barrier(**({"device_ids": [c.device.index or 0]} if c.cuda else {}))

        def all_gather_object() -> None:
            nodes = [None]
            dist.all_gather_object(nodes, socket.gethostname())
            assert nodes == [socket.gethostname()], nodes

        for name, fn in (("gather_floats_all_gather_float64", gather), ("all_reduce_float64", all_reduce),
                         ("barrier", barrier), ("all_gather_object", all_gather_object)):
            try:
                fn()
                c.sync()
                out[name] = "ok"
            except Exception as exc:
                out[name] = f"fail: {type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    out["all_ok"] = all(v == "ok" for k, v in out.items() if k not in ("backend", "world_size"))
    return out


SECTIONS = {"train": train_section, "sampling": sampling_section, "encoders": encoders_section,
            "collectives": collectives_section}


def main(argv: list[str] | None = None) -> dict:
    """Runs every section in turn, each guarded and time-boxed, and prints (and writes) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a CPU run in < 60 s)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--base-depth", type=int, default=24, help="layers of the base-width training model")
    parser.add_argument("--sample-depth", type=int, default=0, help="layers of the sampling model (0: base's)")
    parser.add_argument("--hide-modules", default="", help=argparse.SUPPRESS)  # tests: pretend these are missing
    args = parser.parse_args(argv)
    began = time.monotonic()
    lib, stubbed = _import_project(tuple(filter(None, args.hide_modules.split(","))))
    c = Check(args, lib)
    report: dict = {"device": str(c.device), "quick": c.quick, "torch": torch.__version__,
                    "machine": lib["machine_info"](c.device), "stubbed_modules": stubbed,
                    "sections": {}, "section_s": {}}
    scale = 0.15 if c.quick else 1.0  # quick: ~65 s of budgets, most of it unused on an idle 2-core CPU
    for name in args.sections:
        start = time.monotonic()
        c.deadline = start + BUDGET_S[name] * scale
        print(f"[gpu_check] {name}", file=sys.stderr, flush=True)
        try:
            report["sections"][name] = SECTIONS[name](c)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next section runs
            report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc().splitlines()[-6:]}
        free_memory(c)
        report["section_s"][name] = time.monotonic() - start
    report["total_s"] = time.monotonic() - began
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
