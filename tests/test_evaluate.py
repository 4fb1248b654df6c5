"""The evaluation Serve application and its batch driver, on tiny untrained models and a local Ray."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import select
import socket
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
import requests
from _eval_artifacts import build_artifacts
from conftest import free_port
from PIL import Image
from ray import serve

from dalle_core.checkpoint import load_model
from dalle_core.sampling import ImageGenerator, PromptChecker, derive_seed, generate_prompt, load_generator
from dalle_core.tokenizer import BPETokenizer
from pipelines import storage
from pipelines.artifacts import model_paths
from pipelines.config import Config, SyntheticConfig
from pipelines.data.synthetic import Attributes, heldout_wording, parse_caption, sentence_shape, write_synthetic
from pipelines.serve.app import RequestError, build_app, generate_batch, max_body_bytes, parse_request, score_batch
from pipelines.serve.evaluation import load_prompts, run_evaluation
from pipelines.serve.report import ATTRIBUTES, compute_metrics, format_metrics, quality_bar

BAD = {"empty": "   ", "too_long": " ".join(["a small red circle on the left and a large blue square"] * 3),
       "unknown_chars": "a red circle ☃"}
EVAL = {"evaluate.num_prompts": 6, "evaluate.max_batch_size": 4, "evaluate.driver_batch_size": 3}
OK = "a small red circle"
# Refused before any model work: (body, or a function of the evaluate section giving it), status, field named.
BAD_REQUESTS: dict[str, tuple[Any, int, str]] = {
    "not_json": (b"not json", 400, "body"),
    "empty_body": (b"", 400, "body"),
    "not_utf8": (b'{"prompt": "\xff"}', 400, "body"),
    "deeply_nested": (b"[" * 1500 + b"]" * 1500, 400, "body"),
    "array": ([OK], 400, "body"),
    "no_prompt": ({"n": 2}, 400, "prompt"),
    "prompt_number": ({"prompt": 7}, 400, "prompt"),
    "prompt_list": ({"prompt": [OK]}, 400, "prompt"),
    "prompt_too_long": (lambda ev: {"prompt": "a" * (ev.max_prompt_chars + 1)}, 400, "prompt"),
    "lone_surrogate": (b'{"prompt": "a red circle \\ud800"}', 400, "prompt"),
    "body_too_large": (lambda ev: {"prompt": "a" * max_body_bytes(ev.max_prompt_chars)}, 413, "body"),
    "n_zero": ({"prompt": OK, "n": 0}, 400, "n"),
    "n_fraction": ({"prompt": OK, "n": 2.7}, 400, "n"),
    "n_float": ({"prompt": OK, "n": 2.0}, 400, "n"),
    "n_bool": ({"prompt": OK, "n": True}, 400, "n"),
    "n_string": ({"prompt": OK, "n": "2"}, 400, "n"),
    "n_null": ({"prompt": OK, "n": None}, 400, "n"),
    "n_over_max": (lambda ev: {"prompt": OK, "n": ev.max_candidates + 1}, 400, "n"),
    "top_zero": ({"prompt": OK, "top": 0}, 400, "top"),
    "top_over_n": ({"prompt": OK, "n": 2, "top": 3}, 400, "top"),
    "top_over_default_n": ({"prompt": OK, "top": 5}, 400, "top"),  # tiny sampling.num_candidates is 4
    "top_fraction": ({"prompt": OK, "n": 2, "top": 1.5}, 400, "top"),
    "format_unknown": ({"prompt": OK, "format": "gif"}, 400, "format"),
    "format_number": ({"prompt": OK, "format": 1}, 400, "format"),
    "unknown_field": ({"prompt": OK, "seed": 1}, 400, "seed"),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory, s3_server, ray_cluster):
    # s3_server (session scope) is set up before this module's Ray starts, so the replicas and client actors of
    # the s3:// test inherit its AWS_* variables.
    return build_artifacts(tmp_path_factory.mktemp("eval"), **EVAL, **{"evaluate.http_port": free_port()})


def outside_serve(config: Config) -> tuple[ImageGenerator, BPETokenizer]:
    """The Generator's models and tokenizer loaded as `jobs/generate.py` loads them, with the config's sampling
    precision and compile setting: what a prompt's pictures are compared against outside Serve."""
    paths = model_paths(config)
    generator = load_generator(paths.checkpoint, paths.vae, precision=config.sampling.precision,
                               compile_step=config.sampling.compile)
    return generator, BPETokenizer.load(paths.tokenizer, config.tokenizer.text_seq_len)


def serve_is_down() -> bool:
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return True
    return False


def test_parse_request_defaults_and_limits():
    req = parse_request(b'{"prompt": "a red circle"}', default_n=8, max_candidates=6, max_prompt_chars=20)
    assert (req.prompt, req.n, req.top, req.format) == ("a red circle", 8, 8, "json")  # the default may exceed
    req = parse_request(b'{"prompt": "x", "n": 6, "top": 6, "format": "png"}', 8, 6, 20)
    assert (req.n, req.top, req.format) == (6, 6, "png")
    with pytest.raises(RequestError, match=r"n: must be in \[1, max_candidates=6\], got 7") as info:
        parse_request(b'{"prompt": "x", "n": 7}', 8, 6, 20)
    assert info.value.status_code == 400 and info.value.field == "n"
    # The longest valid prompt fits the body limit however it is escaped (astral characters: 12 bytes each).
    worst = json.dumps({"prompt": "\U0001f600" * 20, "n": 6, "top": 6, "format": "json"}).encode()
    assert len(worst) <= max_body_bytes(20) and parse_request(worst, 8, 6, 20).prompt == "\U0001f600" * 20


def test_score_batch_scores_each_request_against_its_own_caption_and_passes_rejects_through(config):
    clip = load_model(model_paths(config).clip).eval()
    tokenizer = BPETokenizer.load(model_paths(config).tokenizer, config.tokenizer.text_seq_len)
    rng = np.random.default_rng(0)
    ok = [{"text_ids": tokenizer.encode([caption])[0], "caption": caption,
           "images": rng.integers(0, 256, (n, config.vae.image_size, config.vae.image_size, 3), dtype=np.uint8)}
          for caption, n in (("a small red circle", 3), ("a large blue square on the left", 2))]
    rejected = {"text_ids": None, "caption": "a red circle \u2603", "images": None}  # a Generator result, as chained
    scores = score_batch(clip, [ok[0], rejected, ok[1]])
    assert scores[1] is None and [len(s) for s in (scores[0], scores[2])] == [3, 2]
    for request, got in zip(ok, (scores[0], scores[2]), strict=True):
        assert got == pytest.approx(score_batch(clip, [request])[0], abs=1e-5)  # the batch does not mix captions
    assert score_batch(clip, [rejected]) == [None]


class Live:
    """The Serve app on loopback, admitting one request at a time with one waiting (so overload is easy to
    reach); small HTTP limits keep the refused bodies small."""

    def __init__(self, config: Config) -> None:
        ev = dataclasses.replace(config.evaluate, max_ongoing_requests=1, max_queued_requests=1, max_candidates=6,
                                 max_prompt_chars=200)
        self.config, self.ev = dataclasses.replace(config, evaluate=ev), ev
        self.url = f"http://127.0.0.1:{ev.http_port}/"

    def post(self, body: Any) -> requests.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(self.url, data=raw, timeout=60)


def stalled_post(port: int, body: bytes) -> socket.socket:
    """A POST whose body has only begun to arrive: it holds its place in Serve (with the ingress or queued)
    until the rest is sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
    return sock


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


class TestHTTP:
    """The live ingress over HTTP on 127.0.0.1 (one Serve start for the class; the batch-job tests below start
    their own)."""

    @pytest.fixture(scope="class")
    def live(self, config):
        app = Live(config)
        serve.start(http_options={"host": "127.0.0.1", "port": app.ev.http_port})
        try:
            serve.run(build_app(app.config, model_paths(app.config)), name=app.ev.app_name, route_prefix="/")
            yield app
        finally:
            serve.shutdown()
        assert serve_is_down()

    def test_request_returns_ranked_pngs_and_the_count_used(self, live):
        reply = live.post({"prompt": "a small red circle on the left", "n": 3})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "ok" and len(body["candidates"]) == 3
        assert body["num_candidates"] == body["settings"]["num_candidates"] == 3 != live.config.sampling.num_candidates
        scores = [c["score"] for c in body["candidates"]]
        assert scores == sorted(scores, reverse=True) and [c["rank"] for c in body["candidates"]] == [0, 1, 2]
        picture = Image.open(io.BytesIO(base64.b64decode(body["candidates"][0]["png_base64"])))
        assert picture.size == (live.config.vae.image_size, live.config.vae.image_size)
        # Seeded by sampling.seed, as `jobs/generate.py` is: it draws the same pictures.
        sampling = live.config.sampling
        alone = generate_prompt(*outside_serve(live.config), "a small red circle on the left", 3, sampling)
        assert body["seed"] == sampling.seed
        assert np.array_equal(np.asarray(picture), alone.images[body["candidates"][0]["candidate"]])
        default = live.post({"prompt": "a red circle", "top": 1}).json()
        assert default["num_candidates"] == live.config.sampling.num_candidates and len(default["candidates"]) == 1
        strip = live.post({"prompt": "a red square", "n": 2, "format": "png"})
        assert strip.headers["content-type"] == "image/png" and strip.headers["x-num-candidates"] == "2"
        assert Image.open(io.BytesIO(strip.content)).size[0] > 2 * live.config.vae.image_size
        assert requests.get(live.url, timeout=60).json()["usage"].startswith("POST")

    @pytest.mark.parametrize("body, status, field", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
    def test_bad_request_is_refused_naming_the_field(self, live, body, status, field):
        reply = live.post(body(live.ev) if callable(body) else body)
        assert reply.status_code == status, reply.text
        assert reply.json()["status"] == "bad_request" and reply.json()["field"] == field

    def test_rejected_prompts_answer_422_with_their_status(self, live):
        longest = live.post({"prompt": "a" * live.ev.max_prompt_chars})  # just passes the length check
        assert longest.status_code == 422 and longest.json()["status"] == "too_long"
        for text, status in (("", "empty"), ("   ", "empty"), ("a red circle \u2603", "unknown_chars")):
            rejected = live.post({"prompt": text})
            assert rejected.status_code == 422 and rejected.json()["status"] == status

    def test_overload_answers_503_with_retry_after(self, live):
        body = json.dumps({"prompt": "a small red circle", "n": 2}).encode()
        socks: list[socket.socket] = []
        try:
            # Sent one at a time, each given time to reach Serve's router (requests that arrive together can all
            # pass the queue check before any of them is counted): the first is with the ingress and the second
            # waits; the other three must be turned away at once, before their bodies are sent.
            for i in range(5):
                socks.append(stalled_post(live.ev.http_port, body))
                answered, _, _ = select.select(socks[-1:], [], [], 2 if i < 2 else 60)
                assert bool(answered) == (i >= 2), f"request {i}: {'answered' if answered else 'no answer'}"
            for sock in socks[2:]:
                response = read_response(sock)
                assert response.status == 503 and response.getheader("retry-after") == str(live.ev.retry_after_s)
            for sock in socks[:2]:
                sock.sendall(body[5:])
            assert [read_response(s).status for s in socks[:2]] == [200, 200]
        finally:
            for sock in socks:
                sock.close()


def test_batch_job_writes_consistent_ranked_outputs(config, tmp_path):
    prompts = load_prompts(config)
    prompts += [{"key": f"bad_{status}", "prompt": text} for status, text in BAD.items()]
    out = tmp_path / "out"
    metrics = run_evaluation(config, model_paths(config), str(out), prompts)
    assert serve_is_down()

    results = pd.read_parquet(out / "results.parquet")
    n, top = config.sampling.num_candidates, config.sampling.top_images
    per_prompt = results.groupby("key")
    statuses = per_prompt["status"].first().to_dict()
    for status in BAD:
        assert statuses[f"bad_{status}"] == status
    ok_keys = [k for k, s in statuses.items() if s == "ok"]
    assert len(ok_keys) == 6  # every synthetic caption fits the tiny tokenizer
    assert len(results) == len(ok_keys) * n + len(BAD)
    assert set(results.loc[results.status == "ok", "pair_split"]) == {"seen", "heldout"}
    for key in ok_keys:
        rows = results[results.key == key].sort_values("rank")
        assert rows["rank"].tolist() == list(range(n))
        assert sorted(rows["candidate"]) == list(range(n))
        assert rows["score"].is_monotonic_decreasing  # reranking order == score order
        assert rows["random_pick"].sum() == 1
        paths = rows["image_path"].dropna().tolist()
        assert len(paths) == top and rows["image_path"].iloc[:top].notna().all()
        for path in paths:
            assert Image.open(out / path).size == (config.vae.image_size,) * 2
        assert rows["seed"].notna().all() and (rows["cond_scale"] == config.sampling.cond_scale).all()
    assert results.loc[results.status != "ok", "score"].isna().all()
    # Each prompt's seed alone fixes its pictures: drawn alone (`jobs/generate.py --seed` with the recorded seed),
    # in one pass with every other prompt, or as Serve batched them, they are the same.
    generator, tokenizer = outside_serve(config)
    best = results[(results.status == "ok") & (results["rank"] == 0)]
    together = generate_batch(generator, PromptChecker(tokenizer), config.sampling,
                              [{"key": r.key, "prompt": r.prompt} for r in best.itertuples()])
    for row, batched in zip(best.itertuples(), together, strict=True):
        assert row.seed == batched["seed"] == derive_seed(config.sampling.seed, [row.key])
        own_seed = dataclasses.replace(config.sampling, seed=row.seed)
        alone = generate_prompt(generator, tokenizer, row.prompt, n, own_seed)
        drawn = np.asarray(Image.open(out / row.image_path))
        assert np.array_equal(alone.images[row.candidate], drawn)
        assert np.array_equal(batched["images"][row.candidate], drawn)
    written = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
    assert written == set(results["image_path"].dropna())

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["num_prompts"] == len(prompts) == metrics["num_prompts"]
    assert on_disk["status_counts"]["ok"] == 6
    top1 = results[(results.status == "ok") & (results["rank"] == 0)]["score"].mean()
    assert on_disk["clip_score"]["top1_mean"] == pytest.approx(top1)
    assert on_disk["clip_score"]["top1_mean"] >= on_disk["clip_score"]["random_mean"]
    assert set(on_disk["attribute_accuracy"]) == {"seen", "heldout", "heldout_wording"}
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 6 * config.vae.image_size  # six prompt rows
    report = (out / "report.html").read_text()
    assert "grid.png" in report and "too_long" in report and all(p in report for p in results.image_path.dropna())


def test_evaluation_reads_models_and_prompt_shard_from_s3_and_writes_there(config, s3_bucket):
    root = f"{s3_bucket}/project"
    raw = f"{root}/raw"
    write_synthetic(SyntheticConfig(num_samples=8, samples_per_shard=8, image_size=16), raw)
    shard = storage.list_files(raw, (".parquet",))[0]
    # As jobs/evaluate.py runs it: the config's paths (all under s3://) give the models, a Parquet shard the prompts.
    s3_config = build_artifacts(root, **{**EVAL, "evaluate.http_port": config.evaluate.http_port,
                                         "evaluate.num_prompts": 3, "evaluate.prompt_source": "parquet",
                                         "evaluate.prompts_path": shard})
    paths = model_paths(s3_config)
    assert all(p.startswith(f"{root}/") for p in dataclasses.asdict(paths).values())
    out = f"{s3_bucket}/eval"
    with pytest.raises(FileNotFoundError, match=f"clip {root}/nope.pt"):  # refused before Serve starts
        run_evaluation(s3_config, dataclasses.replace(paths, clip=f"{root}/nope.pt"), out, [])
    metrics = run_evaluation(s3_config, paths, out, load_prompts(s3_config))
    assert serve_is_down()

    results = storage.read_parquet(f"{out}/results.parquet").to_pandas()
    n = s3_config.sampling.num_candidates
    assert metrics["status_counts"] == {"ok": 3} and len(results) == 3 * n
    assert storage.read_json(f"{out}/metrics.json")["clip_score"] == metrics["clip_score"]
    assert metrics["models"] == dataclasses.asdict(paths) and metrics["output"] == out
    written = storage.list_files(f"{out}/images", (".png",), recursive=True)
    assert written == sorted(f"{out}/{p}" for p in results["image_path"].dropna())
    assert len(written) == 3 * s3_config.sampling.top_images
    assert Image.open(io.BytesIO(storage.read_bytes(f"{out}/grid.png"))).size[1] > 3 * s3_config.vae.image_size
    assert "grid.png" in storage.read_bytes(f"{out}/report.html").decode()


def test_serve_is_shut_down_when_the_job_fails(config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray Data wraps the write error in
        run_evaluation(config, model_paths(config), str(blocker / "out"), load_prompts(config)[:2])
    assert serve_is_down()


def test_prompt_sources(config, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\na blue square\n")
    prompts = load_prompts(config, "text", str(text), num_prompts=0)
    assert [p["prompt"] for p in prompts] == ["a red circle", "", "a blue square"]
    assert len({p["key"] for p in prompts}) == 3
    table = tmp_path / "prompts.parquet"
    pd.DataFrame({"text": ["x", None, "y"]}).to_parquet(table)
    assert [p["prompt"] for p in load_prompts(config, "parquet", str(table), "text", 2)] == ["x", ""]
    synthetic = load_prompts(config, "synthetic", num_prompts=8)
    assert len(synthetic) == 8 and {p["pair_split"] for p in synthetic} == {"seen", "heldout"}
    held = {tuple(pair) for pair in config.synthetic.holdout_pairs}
    assert [p["wording"] for p in synthetic].count("heldout") == 8 // 3
    for p in synthetic:
        assert ((p["truth_color"], p["truth_shape"]) in held) == (p["pair_split"] == "heldout")
        assert heldout_wording(sentence_shape(p["prompt"])) == (p["wording"] == "heldout")
        assert parse_caption(p["prompt"]) == Attributes(*(p[f"truth_{a}"] for a in ATTRIBUTES))


def test_metrics_split_attribute_accuracy_by_pair():
    def row(key, rank, score, pick, split, pred_color):
        return {"key": key, "status": "ok", "rank": rank, "score": score, "random_pick": pick, "pair_split": split,
                "truth_color": "red", "truth_shape": "circle", "truth_size": "small", "truth_position": "left",
                "pred_color": pred_color, "pred_shape": "circle", "pred_size": "small", "pred_position": "left"}

    results = pd.DataFrame([row("a", 0, 0.9, False, "seen", "red"), row("a", 1, 0.1, True, "seen", "blue"),
                            row("b", 0, 0.5, True, "heldout", "blue"), row("b", 1, 0.2, False, "heldout", "red")])
    metrics = compute_metrics(results)
    assert metrics["clip_score"]["top1_mean"] == pytest.approx(0.7)
    assert metrics["clip_score"]["random_mean"] == pytest.approx(0.3)
    acc = metrics["attribute_accuracy"]
    assert acc["seen"]["top1"]["color"] == 1.0 and acc["seen"]["random"]["color"] == 0.0
    assert acc["heldout"]["top1"]["color"] == 0.0 and acc["heldout"]["top1"]["shape"] == 1.0
    assert np.isclose(acc["seen"]["top1"]["all"], 1.0) and acc["heldout"]["random"]["n"] == 1


def test_quality_bar_verdicts_and_missing_metrics():
    def entry(**values):
        return {"color": 0.5, "shape": 0.5, "size": 0.5, "position": 0.5, "all": 0.5, "n": 10, **values}

    metrics = {"attribute_accuracy": {
        "seen": {"top1": entry(color=0.95, shape=0.70), "random": entry(all=0.6)},
        "heldout": {"top1": entry(all=0.85)}, "heldout_wording": {"top1": entry(all=0.69)}}}
    checks = {c["check"]: c for c in quality_bar(metrics)}
    assert checks["top-1 colour, seen (color, shape) pairs"]["passed"]
    assert not checks["top-1 shape, seen (color, shape) pairs"]["passed"]
    assert checks["top-1 all four right, held-out (color, shape) pairs"]["passed"]  # the minimum is inclusive
    assert not checks["top-1 all four right, held-out wordings"]["passed"]
    rerank = checks["reranking beats a random candidate (all four, seen)"]
    assert not rerank["passed"] and rerank["minimum"] == 0.6 and rerank["strict"]
    assert len(checks) == 5  # no dVAE score, so its check is left out rather than failed
    metrics["vae_reconstruction"] = {"all": {"color": 1.0, "shape": 0.99, "both": 0.99, "n": 100}}
    table = format_metrics(dict(metrics, num_prompts=1, status_counts={"ok": 1}, quality_bar=quality_bar(metrics),
                                clip_score={"top1_mean": 0.5, "random_mean": None}))
    assert "dVAE keeps colour and shape" in table and table.count("MISSED") == 3
    assert "held-out wordings" in table
