"""The evaluation Serve application: a Generator (DALLE + dVAE decoder) and a Scorer (CLIP) deployment, each
loading its model once per replica and grouping concurrent requests with ``@serve.batch``, behind an HTTP
ingress for interactive use.

Batch job: ``pipelines.serve.evaluation`` calls the Generator and Scorer handles directly (prompts from many Ray
Data actors meet in one sampling pass). Live use::

    serve run pipelines.serve.app:app_builder config=configs/tiny.yaml
    curl -s -X POST localhost:8000/ -d '{"prompt": "a small red circle on the left", "n": 8}'

HTTP requests are checked whole (:func:`parse_request`) before any model work, and the ingress admits at most
``evaluate.max_ongoing_requests`` at once with ``evaluate.max_queued_requests`` waiting: beyond that Serve's
proxy answers 503 with ``Retry-After``, so overload costs neither a crash nor unbounded memory.

The model maths lives in :mod:`dalle_core.sampling`; this module only wires it into Serve.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dalle_core.checkpoint import load_model
from dalle_core.config import SamplingConfig
from dalle_core.images import from_uint8, make_grid, png_bytes, to_uint8
from dalle_core.sampling import (
    STATUS_ERROR,
    ImageGenerator,
    PromptChecker,
    derive_seed,
    load_generator,
    rank_order,
    score_candidates,
)
from dalle_core.tokenizer import BPETokenizer, pad_text_ids
from pipelines.artifacts import ModelPaths, model_paths
from pipelines.config import Config, EvaluateConfig
from pipelines.resources import deployment_actor_options

GENERATOR, SCORER = "Generator", "Scorer"
REQUEST_FIELDS = ("prompt", "n", "top", "format")
FORMATS = ("json", "png")
USAGE = 'POST {"prompt": "...", "n": 8, "top": 4, "format": "json"|"png"}'


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def generate_batch(model: ImageGenerator, checker: PromptChecker, sampling: SamplingConfig,
                   requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Generator's work for one batch of requests (also what a plain Ray Data actor runs in the
    benchmark): check prompts, sample every accepted one in one pass, return uint8 pictures or a status.
    A prompt's seed is ``sampling.seed``, or derived from it and the request's ``key`` where there is one (the
    batch job's prompts), and it alone fixes the prompt's draws, whatever else the batch holds."""
    checks = checker.check([r["prompt"] for r in requests])
    out: list[dict[str, Any]] = [
        {"status": c.status, "detail": c.detail, "caption": r["prompt"], "text_ids": c.text_ids, "images": None,
         "seed": None} for r, c in zip(requests, checks, strict=True)]
    ok = [i for i, c in enumerate(checks) if c.ok]
    # One pass needs one candidate count; a batch mixing counts runs one pass per count.
    for n in sorted({int(requests[i].get("num_candidates") or sampling.num_candidates) for i in ok}):
        group = [i for i in ok if int(requests[i].get("num_candidates") or sampling.num_candidates) == n]
        seeds = [sampling.seed if "key" not in requests[i] else derive_seed(sampling.seed, [str(requests[i]["key"])])
                 for i in group]
        text = pad_text_ids([checks[i].text_ids for i in group], model.text_seq_len)
        try:
            images = to_uint8(model.generate(text, n, sampling, seeds))
        except Exception as exc:  # recorded per prompt; the replica stays up for the next batch
            for i in group:
                out[i].update(status=STATUS_ERROR, detail=f"generation failed: {exc!r}")
            continue
        for j, i in enumerate(group):
            out[i].update(images=images[j], seed=seeds[j], batch_prompts=len(group))
    return out


def score_batch(clip: torch.nn.Module, requests: list[dict[str, Any]]) -> list[list[float] | None]:
    """The Scorer's work for one batch: every candidate of every request in one CLIP pass; None for a request
    without pictures (a prompt the Generator rejected, whose result is chained here as it is). Requests carry
    both the BPE ids (our CLIP reads them) and the caption (an open_clip scorer tokenizes it itself)."""
    scored = [r for r in requests if r["images"] is not None]
    if not scored:
        return [None] * len(requests)
    counts = [len(r["images"]) for r in scored]
    ids = [r["text_ids"] for r in scored]
    seq = getattr(clip.config, "text_seq_len", None) or max(len(i) for i in ids)
    text = pad_text_ids(ids, seq).repeat_interleave(torch.tensor(counts), dim=0)
    captions = [r.get("caption", "") for r, n in zip(scored, counts, strict=True) for _ in range(n)]
    images = from_uint8(np.concatenate([r["images"] for r in scored]))
    scores = iter(s.tolist() for s in score_candidates(clip, text, images[:, None], captions)[:, 0].split(counts))
    return [next(scores) if r["images"] is not None else None for r in requests]


@serve.deployment
class Generator:
    """Prompt strings in, ``num_candidates`` uint8 pictures per prompt out; all prompts of a Serve batch go
    through one batched, KV-cached, guided sampling pass. Rejected prompts come back with their status."""

    def __init__(self, paths: ModelPaths, text_seq_len: int, sampling: SamplingConfig, max_batch_size: int,
                 batch_wait_timeout_s: float, num_gpus: float = 0.0) -> None:
        self.sampling = sampling
        self.model = load_generator(paths.checkpoint, paths.vae, _device(num_gpus), sampling.precision,
                                    sampling.compile, sampling.cuda_graphs)
        print(f"[generator] precision={self.model.precision} ({self.model.precision_reason})", flush=True)
        self.tokenizer = BPETokenizer.load(paths.tokenizer, text_seq_len)
        self.model.check_tokenizer(self.tokenizer)
        self.checker = PromptChecker(self.tokenizer)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return generate_batch(self.model, self.checker, self.sampling, requests)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``{"prompt", "key"?, "num_candidates"?}`` per request. Runs in a thread so the replica keeps
        queueing the next batch while this one samples."""
        return await asyncio.to_thread(self._run, requests)

    def settings(self) -> dict[str, Any]:
        """The sampling settings this replica uses, ``auto`` precision resolved and the reason beside it."""
        return dict(vars(self.sampling), precision=self.model.precision, precision_reason=self.model.precision_reason)


@serve.deployment
class Scorer:
    """CLIP scores of each prompt against its candidates; the rows of all requests in a batch share one pass."""

    def __init__(self, clip_path: str, max_batch_size: int, batch_wait_timeout_s: float,
                 num_gpus: float = 0.0) -> None:
        self.clip = load_model(clip_path, map_location=_device(num_gpus)).eval()
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _run(self, requests: list[dict[str, Any]]) -> list[list[float] | None]:
        return score_batch(self.clip, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def score(self, requests: list[dict[str, Any]]) -> list[list[float] | None]:
        """``{"text_ids": list[int], "caption": str, "images": uint8 [N, H, W, C] | None}`` per request (a
        Generator result fits) -> N scores, or None where there are no pictures."""
        return await asyncio.to_thread(self._run, requests)


class RequestError(ValueError):
    """An HTTP request refused before any model work; ``field`` names what is wrong with it."""

    def __init__(self, field: str, detail: str, status_code: int = 400) -> None:
        super().__init__(f"{field}: {detail}")
        self.field, self.detail, self.status_code = field, detail, status_code

    def response(self) -> JSONResponse:
        return JSONResponse({"status": "bad_request", "field": self.field, "detail": self.detail},
                            status_code=self.status_code)


@dataclass(frozen=True)
class GenerateRequest:
    """A checked HTTP request: ``1 <= top <= n <= max_candidates``, a prompt of bounded length."""

    prompt: str
    n: int
    top: int
    format: str


def max_body_bytes(max_prompt_chars: int) -> int:
    """The largest body a valid request can have: the longest prompt with every character JSON-escaped as a
    surrogate pair (12 bytes), plus room for the other fields. Anything longer is refused unread."""
    return 12 * max_prompt_chars + 1024


def _count(body: dict[str, Any], name: str, default: int, maximum: int, bound_name: str) -> int:
    if name not in body:
        return default
    value = body[name]
    if type(value) is not int:  # bool is an int subclass; 2.0 and 2.7 are not counts
        raise RequestError(name, f"must be an integer, got {value!r}")
    if not 1 <= value <= maximum:
        raise RequestError(name, f"must be in [1, {bound_name}={maximum}], got {value}")
    return value


def parse_request(raw: bytes, default_n: int, max_candidates: int, max_prompt_chars: int) -> GenerateRequest:
    """The request body, checked whole so that no malformed value is silently replaced by a default or
    truncated; raises :class:`RequestError` naming the first field at fault. An empty or unrepresentable
    prompt passes: the prompt checker rejects it with its status (422), as the batch job records it."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise RequestError("body", f"not JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; the fields are {', '.join(REQUEST_FIELDS)}")
    if "prompt" not in body:
        raise RequestError("prompt", "required")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"must be a string, got {type(prompt).__name__}")
    if len(prompt) > max_prompt_chars:
        raise RequestError("prompt", f"must be at most {max_prompt_chars} characters, got {len(prompt)}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("prompt", "is not valid Unicode (a lone surrogate escape)") from None
    n = _count(body, "n", default_n, max_candidates, "max_candidates")
    top = _count(body, "top", n, n, "n")
    fmt = body.get("format", "json")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise RequestError("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return GenerateRequest(prompt, n, top, fmt)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as more than ``limit`` bytes have arrived."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError("body", f"larger than {limit} bytes", status_code=413)
    return bytes(body)


@serve.deployment
class DalleApp:
    """HTTP ingress: ``POST {"prompt": str, "n": int?, "top": int?, "format": "json"|"png"}`` returns the
    candidates ranked by CLIP (JSON with base64 PNGs and scores, or one PNG strip best first)."""

    def __init__(self, generator: Any, scorer: Any, sampling: SamplingConfig, max_candidates: int,
                 max_prompt_chars: int) -> None:
        self.generator, self.scorer, self.sampling = generator, scorer, sampling
        self.max_candidates, self.max_prompt_chars = max_candidates, max_prompt_chars

    async def rank(self, prompt: str, n: int | None = None) -> dict[str, Any]:
        """Generate, score and order the candidates of one prompt (also callable through the app handle)."""
        n = self.sampling.num_candidates if n is None else n
        gen = await self.generator.generate.remote({"prompt": prompt, "num_candidates": n})
        result = {"prompt": prompt, "status": gen["status"], "detail": gen["detail"], "seed": gen["seed"],
                  "num_candidates": n, "settings": dict(vars(self.sampling), num_candidates=n), "candidates": []}
        if gen["images"] is None:
            return result
        scores = await self.scorer.score.remote({"text_ids": gen["text_ids"], "caption": gen["caption"],
                                                 "images": gen["images"]})
        order = rank_order(torch.tensor([scores]))[0].tolist()
        result["candidates"] = [{"rank": r, "candidate": c, "score": scores[c], "image": gen["images"][c]}
                                for r, c in enumerate(order)]
        return result

    async def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return JSONResponse({"usage": USAGE})
        try:
            raw = await read_body(request, max_body_bytes(self.max_prompt_chars))
            req = parse_request(raw, self.sampling.num_candidates, self.max_candidates, self.max_prompt_chars)
        except RequestError as exc:
            return exc.response()
        result = await self.rank(req.prompt, req.n)
        if result["status"] != "ok":
            return JSONResponse({k: result[k] for k in ("prompt", "status", "detail")}, status_code=422)
        best = result["candidates"][: req.top]
        if req.format == "png":
            return Response(png_bytes(make_grid([[c["image"] for c in best]])), media_type="image/png",
                            headers={"X-Num-Candidates": str(req.n)})
        for c in best:
            c["png_base64"] = base64.b64encode(png_bytes(c.pop("image"))).decode()
        return JSONResponse(dict(result, candidates=best))


def build_app(config: Config, paths: ModelPaths) -> Application:
    """The application graph with replica counts, CPUs/GPUs, batch sizes and the HTTP limits from
    ``config.evaluate``. Only the ingress has a queue limit: its ``max_ongoing_requests`` already bounds what
    reaches the Generator and Scorer from HTTP, and the batch driver's handle calls must never be refused."""
    ev: EvaluateConfig = config.evaluate
    generator = Generator.options(
        num_replicas=ev.generator_replicas, max_ongoing_requests=ev.max_ongoing_requests,
        ray_actor_options=deployment_actor_options(ev.generator_num_cpus, ev.generator_num_gpus),
    ).bind(paths, config.tokenizer.text_seq_len, config.sampling, ev.max_batch_size, ev.batch_wait_timeout_s,
           ev.generator_num_gpus)
    scorer = Scorer.options(
        num_replicas=ev.scorer_replicas, max_ongoing_requests=ev.max_ongoing_requests,
        ray_actor_options=deployment_actor_options(ev.scorer_num_cpus, ev.scorer_num_gpus),
    ).bind(paths.clip, ev.scorer_max_batch_size, ev.batch_wait_timeout_s, ev.scorer_num_gpus)
    ingress = DalleApp.options(
        max_ongoing_requests=ev.max_ongoing_requests, max_queued_requests=ev.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=ev.retry_after_s),
        ray_actor_options=deployment_actor_options(0, 0))
    return ingress.bind(generator, scorer, config.sampling, ev.max_candidates, ev.max_prompt_chars)


def app_builder(args: dict[str, str]) -> Application:
    """``serve run pipelines.serve.app:app_builder config=... [checkpoint=... vae=... tokenizer=... clip=...]``;
    paths default as :func:`pipelines.artifacts.model_paths` says (the published ``paths.dalle``, else the newest
    checkpoint under ``paths.runs``)."""
    config = Config.load(args.get("config") or None)
    return build_app(config, model_paths(config, **{k: v for k, v in args.items() if k != "config"}))
