"""The DALLE transformer and its sampler, including one test per known bug of the reference implementation."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dalle_core import dalle as dalle_module
from dalle_core.config import ATTN_TYPES, ConfigError, DALLEConfig
from dalle_core.dalle import DALLE, attention_mask, sample_logits, sparse_attention

PATTERNS = [["full"], ["axial_row"], ["axial_col"], ["conv_like"], ["axial_row", "axial_col", "conv_like", "full"]]


def tiny_config(**overrides) -> DALLEConfig:
    base = dict(num_text_tokens=40, text_seq_len=6, num_image_tokens=24, image_fmap_size=4, dim=32, depth=4,
                heads=2, dim_head=16)
    base.update(overrides)
    return DALLEConfig(**base)


def sharpened(model: DALLE) -> DALLE:
    """Scales the output heads so sampling is far from uniform: a cached/uncached mismatch then changes tokens."""
    with torch.no_grad():
        model.to_image_logits.weight.mul_(40)
        model.to_text_logits.weight.mul_(40)
    return model


def batch(cfg: DALLEConfig, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.num_text_tokens, (b, cfg.text_seq_len), generator=g)
    text[0, 3:] = 0
    text[min(1, b - 1), 5:] = 0
    codes = torch.randint(0, cfg.num_image_tokens, (b, cfg.image_seq_len), generator=g)
    return text, codes


@pytest.mark.parametrize("attn_types", PATTERNS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_and_uncached_generation_give_identical_tokens(attn_types, cond_scale):
    torch.manual_seed(0)
    model = sharpened(DALLE(tiny_config(attn_types=attn_types)))
    text, _ = batch(model.config)
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        runs.append(model.generate_image_codes(text, cond_scale=cond_scale, top_k=0.5, use_cache=use_cache,
                                               generator=gen))
    assert runs[0].shape == (3, model.config.image_seq_len)
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0].flatten().tolist())) > 3  # the sampler really explored the codebook


def test_compiled_sampling_step_samples_what_the_eager_step_does_in_one_graph():
    """``sampling.compile``: one graph serves every position and batch size from 2 rows up (a recompile per
    position made an earlier compiled step slower than eager; the last position and the token-shift history
    each cost one until the cache kept a spare slot and the history one tensor), the sampled codes are the eager
    sampler's, and the freezing it compiles with does not leak into the rest of the process (a trainer's compile
    would freeze its weights)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = sharpened(DALLE(tiny_config(attn_types=["full", "axial_row", "axial_col", "conv_like"]))).eval()
    step = model.compiled_sampling_step()
    text, _ = batch(model.config, b=5)
    # First as many rows as the model has heads: duck shaping once gave both one symbol, so the heads pinned the
    # batch size and the next batch compiled a second graph.
    for rows, cond_scale in ((text[:model.config.heads], 1.0), (text, 3.0)):
        runs = [model.generate_image_codes(rows, cond_scale=cond_scale, top_k=0.5, step=s,
                                           generator=torch.Generator().manual_seed(3)) for s in (step, None)]
        assert torch.equal(runs[0], runs[1])
        assert len(set(runs[0].flatten().tolist())) > 3
    assert counters["stats"]["unique_graphs"] == 1
    assert torch._inductor.config.freezing is False and torch.fx.experimental._config.use_duck_shape is True
    with pytest.raises(ValueError, match="use_cache"):
        model.generate_image_codes(text, step=step, use_cache=False)


@pytest.mark.parametrize("attn_types", PATTERNS, ids=lambda p: "+".join(p))
def test_cached_step_logits_match_full_forward(attn_types):
    torch.manual_seed(1)
    for rotary in (True, False):
        model = DALLE(tiny_config(attn_types=attn_types, rotary_emb=rotary)).eval()
        text, codes = batch(model.config)
        with torch.no_grad():
            full = model(text, codes)
            stream = torch.cat([model.text_tokens(text), codes], dim=1)[:, : model.seq_len]
            caches = model.new_cache(text.shape[0])
            prefill = model.text_len + 2
            steps = [model._hidden(stream[:, :prefill], 0, caches)]
            steps += [model._hidden(stream[:, p:p + 1], p, caches) for p in range(prefill, model.seq_len)]
            hidden = torch.cat(steps, dim=1)
            cached = torch.cat([model.to_text_logits(hidden), model.to_image_logits(hidden)], dim=-1)
        cached = cached.masked_fill(model.logits_mask, -torch.finfo(cached.dtype).max)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["axial_row", "axial_col", "conv_like"])
def test_structured_sparse_attention_equals_the_mask_path_forward_and_backward(kind, monkeypatch):
    torch.manual_seed(2)
    structured = DALLE(tiny_config(attn_types=[kind, "full"], depth=2, image_fmap_size=5))
    masked = DALLE(tiny_config(attn_types=[kind, "full"], depth=2, image_fmap_size=5, sparse_attention="mask"))
    masked.load_state_dict(structured.state_dict())
    calls = []
    real = dalle_module.sparse_attention
    monkeypatch.setattr(dalle_module, "sparse_attention", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    text, codes = batch(structured.config)
    results = []
    for model in (structured, masked):
        model(text, codes, return_loss=True)[0].backward()
        results.append({name: p.grad for name, p in model.named_parameters()})
        with torch.no_grad():
            results[-1]["logits"] = model.eval()(text, codes)
    assert calls == [kind, kind]  # the structured model took the structured path, the masked one never did
    for name, value in results[1].items():
        torch.testing.assert_close(results[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["axial_row", "axial_col", "conv_like"])
def test_structured_sparse_attention_matches_the_mask_in_bf16(kind):
    torch.manual_seed(5)
    text_len, fmap = 7, 6
    seq = text_len + fmap * fmap - 1
    q, k, v = torch.randn(3, 2, 2, seq, 16).unbind(0)
    mask = attention_mask(kind, text_len, fmap, 3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = sparse_attention(kind, q.bfloat16(), k.bfloat16(), v.bfloat16(), text_len, fmap, 3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_sparse_layers_count_only_the_keys_they_score():
    shape = dict(text_seq_len=256, image_fmap_size=32, depth=1, dim=64, heads=1, dim_head=64)
    full = DALLE(tiny_config(**shape)).flops_per_token()
    for kind in ("axial_row", "axial_col", "conv_like"):
        sparse = DALLE(tiny_config(attn_types=[kind], **shape)).flops_per_token()
        assert sparse < 0.8 * full, kind


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients():
    torch.manual_seed(3)
    plain = DALLE(tiny_config(ff_dropout=0.2))
    recomputed = DALLE(tiny_config(ff_dropout=0.2, activation_checkpointing=True))
    recomputed.load_state_dict(plain.state_dict())
    text, codes = batch(plain.config)
    calls = []
    recomputed.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(4)  # the same dropout draws: checkpointing replays the RNG state in its recompute
        model(text, codes, return_loss=True)[0].backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert len(calls) == 2  # forward once, again in backward
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, msg=name)
    with torch.no_grad():
        recomputed(text, codes)
    assert len(calls) == 3  # no recompute without gradients


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_compiles_to_one_graph(checkpointing):
    """``train.compile`` fuses the whole step only while the forward has no graph break (a ``.item()``, a tensor
    turned into a Python int): TorchDynamo traces every pattern into a single graph."""
    torch._dynamo.reset()
    model = DALLE(tiny_config(attn_types=["full", "axial_row", "axial_col", "conv_like"],
                              activation_checkpointing=checkpointing))
    explained = torch._dynamo.explain(model)(*batch(model.config), return_loss=True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_guided_sampling_leaves_prompt_unchanged_and_uses_the_caption():
    torch.manual_seed(2)
    model = sharpened(DALLE(tiny_config()))
    text, _ = batch(model.config)
    before = text.clone()
    guided = model.generate_image_codes(text, cond_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(text, before)
    # Every step after the first still sees the caption: changing the caption changes the whole image.
    other = text.clone()
    other[:, 0] = (other[:, 0] % (model.config.num_text_tokens - 1)) + 1
    guided_other = model.generate_image_codes(other, cond_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(guided[:, 1:], guided_other[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_generator_per_row_draws_each_row_as_it_would_be_drawn_alone(dtype):
    """The Serve evaluation batches prompts as they arrive: with a generator per row, a row samples the same codes
    alone, in a batch and in another order. With one generator for the batch, the rows after the first draw
    from another part of its stream when the batch changes."""
    torch.manual_seed(4)
    model = sharpened(DALLE(tiny_config())).to(dtype).eval()
    text, _ = batch(model.config, b=4)
    seeds = [10, 11, 12, 13]

    def sample(rows: list[int], generator=None) -> torch.Tensor:
        generator = generator or [torch.Generator().manual_seed(seeds[r]) for r in rows]
        return model.generate_image_codes(text[rows], cond_scale=3.0, top_k=0.5, generator=generator)

    together = sample([0, 1, 2, 3])
    assert torch.equal(torch.cat([sample([r]) for r in range(4)]), together)
    assert torch.equal(sample([3, 1, 0, 2])[[2, 1, 3, 0]], together)
    assert len(set(together.flatten().tolist())) > 3
    shared = [sample(rows, torch.Generator().manual_seed(10)) for rows in ([0, 1, 2, 3], [1])]
    assert not torch.equal(shared[0][1], shared[1][0])
    with pytest.raises(ValueError, match="one per row"):
        sample([0, 1], [torch.Generator()])


@pytest.mark.parametrize("cond_scale", [1.0, 2.0])
def test_sampling_uses_the_cache_and_one_batched_pass_with_or_without_guidance(cond_scale):
    torch.manual_seed(3)
    model = DALLE(tiny_config())
    text, _ = batch(model.config, b=2)
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[:2])))
    model.generate_image_codes(text, cond_scale=cond_scale, generator=torch.Generator().manual_seed(0))
    hook.remove()
    rows = 4 if cond_scale != 1.0 else 2  # conditional and null rows share each pass
    assert len(seen) == model.config.image_seq_len  # one pass per sampled code, not two
    assert seen[0] == (rows, model.text_len)  # the prompt once ...
    assert set(seen[1:]) == {(rows, 1)}  # ... then one new token per step: the cache is used


def test_guided_logits_equal_separate_conditional_and_null_passes():
    torch.manual_seed(4)
    model = DALLE(tiny_config()).eval()
    text, codes = batch(model.config, b=2)
    cond_scale = 2.5
    with torch.no_grad():
        cond = model(text, codes)[:, -1, model.num_text_vocab:]
        null = model(torch.zeros_like(text), codes)[:, -1, model.num_text_vocab:]
        expected = null + (cond - null) * cond_scale
        stream = torch.cat([model.text_tokens(text), codes], dim=1)[:, : model.seq_len]
        null_stream = torch.cat([model.text_tokens(torch.zeros_like(text)), codes], dim=1)[:, : model.seq_len]
        both = model._next_logits(torch.cat([stream, null_stream]), None, 0, True)
        c, n = both.chunk(2)
    torch.testing.assert_close(n + (c - n) * cond_scale, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ATTN_TYPES)
def test_attention_patterns_are_causal_and_text_is_visible(kind):
    text_len, fmap = 5, 4
    mask = attention_mask(kind, text_len, fmap)
    seq = text_len + fmap * fmap - 1
    assert mask.shape == (seq, seq)
    assert not torch.triu(mask, diagonal=1).any()
    assert mask.diagonal().all()
    assert mask[:, :text_len].tril().equal(torch.ones(seq, text_len, dtype=torch.bool).tril())
    if kind == "axial_row":  # image token 5 (row 1, col 1) sees token 4 (row 1) but not token 3 (row 0)
        assert mask[text_len + 5, text_len + 4] and not mask[text_len + 5, text_len + 3]
    if kind == "axial_col":  # token 5 sees token 1 (same column), not token 4
        assert mask[text_len + 5, text_len + 1] and not mask[text_len + 5, text_len + 4]


@pytest.mark.parametrize("attn_types", PATTERNS, ids=lambda p: "+".join(p))
def test_no_position_sees_the_future(attn_types):
    torch.manual_seed(5)
    model = DALLE(tiny_config(attn_types=attn_types)).eval()
    text, codes = batch(model.config, b=1)
    changed = codes.clone()
    changed[0, 9] = (changed[0, 9] + 1) % model.config.num_image_tokens
    with torch.no_grad():
        a, b = model(text, codes), model(text, changed)
    first_affected = model.text_len + 9  # the position holding code 9
    torch.testing.assert_close(a[:, :first_affected], b[:, :first_affected])
    assert not torch.allclose(a[:, first_affected:], b[:, first_affected:])


def test_logits_mask_keeps_text_on_text_and_image_on_image():
    model = DALLE(tiny_config())
    text, codes = batch(model.config)
    logits = model(text, codes)
    t, v = model.config.text_seq_len, model.num_text_vocab
    very_negative = -torch.finfo(logits.dtype).max
    assert (logits[:, :t, v:] == very_negative).all()
    assert (logits[:, t:, :v] == very_negative).all()
    assert (logits[:, :t, :v] > very_negative).all() and (logits[:, t:, v:] > very_negative).all()


def test_loss_is_weighted_text_plus_seven_image_over_eight_and_equals_masked_cross_entropy():
    model = DALLE(tiny_config())
    text, codes = batch(model.config)
    loss, loss_text, loss_img = model(text, codes, return_loss=True)
    torch.testing.assert_close(loss, (loss_text + 7 * loss_img) / 8)
    logits = model(text, codes)
    labels = torch.cat([model.text_tokens(text)[:, 1:], codes + model.num_text_vocab], dim=1)
    t = model.config.text_seq_len
    torch.testing.assert_close(loss_text, F.cross_entropy(logits[:, :t].flatten(0, 1), labels[:, :t].flatten()))
    torch.testing.assert_close(loss_img, F.cross_entropy(logits[:, t:].flatten(0, 1), labels[:, t:].flatten()))


def test_each_text_slot_has_its_own_pad_id():
    model = DALLE(tiny_config())
    text = torch.tensor([[5, 6, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0]])
    before = text.clone()
    stream = model.text_tokens(text)
    assert torch.equal(text, before)
    n = model.config.num_text_tokens
    assert stream[0].tolist() == [0, 5, 6, n + 2, n + 3, n + 4, n + 5]
    assert stream[1].tolist() == [0, 5, n + 1, n + 2, n + 3, n + 4, n + 5]


def test_caption_dropout_only_in_training_and_without_touching_input():
    torch.manual_seed(6)
    model = DALLE(tiny_config(null_cond_prob=0.5))
    text, codes = batch(model.config, b=64)
    before = text.clone()
    model.train()
    a = model(text, codes, return_loss=True)[1]
    b = model(text, codes, return_loss=True)[1]
    assert torch.equal(text, before)
    assert not torch.allclose(a, b)  # different rows dropped each call
    model.eval()
    torch.testing.assert_close(model(text, codes, return_loss=True)[1], model(text, codes, return_loss=True)[1])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = DALLE(tiny_config(depth=2, dim=64))
    text, codes = batch(model.config, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(text, codes, return_loss=True)[0]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_priming_keeps_the_given_codes():
    torch.manual_seed(8)
    model = DALLE(tiny_config())
    text, codes = batch(model.config, b=2)
    out = model.generate_image_codes(text, prime_codes=codes[:, :5], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :5], codes[:, :5])
    with pytest.raises(ValueError, match="prime_codes"):
        model.generate_image_codes(text, prime_codes=codes)


def test_generate_texts_cached_matches_uncached_and_returns_plain_ids():
    torch.manual_seed(9)
    model = sharpened(DALLE(tiny_config()))
    a = model.generate_texts(batch=3, generator=torch.Generator().manual_seed(1))
    b = model.generate_texts(batch=3, use_cache=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.shape == (3, model.config.text_seq_len)
    assert (a < model.config.num_text_tokens).all()
    prompt = torch.tensor([[3, 4]])
    assert model.generate_texts(prompt)[0, :2].tolist() == [3, 4]


def test_sample_logits_top_k_by_fraction_and_by_count():
    logits = torch.arange(10.0).repeat(200, 1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(sample_logits(logits, u, temperature=1.0, top_k=0.2).tolist()) <= {8, 9}
    assert set(sample_logits(logits, u, temperature=1.0, top_k=3).tolist()) == {7, 8, 9}
    assert set(sample_logits(logits, u, temperature=1e-4, top_k=3).tolist()) == {9}


def test_sample_logits_draws_the_filtered_softmax_distribution():
    """The draw (one uniform per row against the cumulative distribution) follows softmax(logits / T) over the
    kept codes: frequencies of 40k draws within 0.01 of it, filtered codes never drawn."""
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0, -2.0, 0.0, 2.5]).repeat(40_000, 1)
    tokens = sample_logits(logits, torch.rand(40_000, generator=torch.Generator().manual_seed(1)), temperature=0.7,
                           top_k=5)
    counts = torch.bincount(tokens, minlength=8).double() / len(tokens)
    kept = logits[0] >= logits[0].topk(5).values[-1]
    expected = torch.softmax((logits[0] / 0.7).masked_fill(~kept, float("-inf")), dim=0).double()
    assert counts[~kept].sum() == 0
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.01)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"depth": 0}, "dalle.depth"), ({"attn_types": ["sparse"]}, "dalle.attn_types"),
     ({"dim_head": 12}, "dalle.dim_head"), ({"conv_kernel_size": 4}, "dalle.conv_kernel_size"),
     ({"null_cond_prob": 1.5}, "dalle.null_cond_prob"), ({"sparse_attention": "flex"}, "dalle.sparse_attention")],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(**overrides).validate("dalle")


@pytest.mark.parametrize("attn_types", PATTERNS, ids=lambda p: "+".join(p))
def test_static_step_at_a_tensor_position_gives_the_cached_steps_logits(attn_types):
    """``sampling.cuda_graphs``: the position-independent step (position in a device tensor, keys read from the
    whole preallocated cache, or a bucket of it, under a mask) computes what the eager cached step does, at
    every position, with rotary and learned position embeddings; so one graph captured at any position serves
    every other."""
    torch.manual_seed(4)
    for rotary in (True, False):
        model = DALLE(tiny_config(attn_types=attn_types, rotary_emb=rotary)).eval()
        text, codes = batch(model.config)
        stream = torch.cat([model.text_tokens(text), codes], dim=1)[:, : model.seq_len]
        with torch.no_grad():
            eager, static = model.new_cache(3), model.new_cache(3)
            for caches in (eager, static):
                model.cached_step(stream[:, :model.text_len], 0, caches, True)
            for p in range(model.text_len, model.seq_len):
                want = model.cached_step(stream[:, p:p + 1], p, eager, True)
                for keys in (None, p + 1):  # the whole cache, and exactly the slots up to this position
                    snapshot = [(c.attn_hist.clone(), c.ff_hist.clone()) for c in static]
                    got = model.static_step(stream[:, p:p + 1], torch.tensor([p]), static, True, keys)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    if keys is None:  # run the step twice: put back the token-shift history the first moved on
                        for c, (a, f) in zip(static, snapshot, strict=True):
                            c.attn_hist.copy_(a)
                            c.ff_hist.copy_(f)
            torch.testing.assert_close(static[0].k, eager[0].k)


@pytest.mark.parametrize("attn_types", [["full"], ["axial_row", "axial_col", "conv_like", "full"]],
                         ids=lambda p: "+".join(p))
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_static_sampling_step_samples_the_eager_tokens_and_reuses_its_caches(attn_types, cond_scale):
    """The static step as a sampler's ``step`` (what the CUDA graphs replay, here run eagerly on the CPU):
    the same codes as eager sampling for the same seeds, across key buckets, and again on a second pass over
    the caches it keeps (zeroed, as a fresh cache is); caches from elsewhere are refused (a graph holds its
    own cache's addresses)."""
    torch.manual_seed(0)
    model = sharpened(DALLE(tiny_config(attn_types=attn_types))).eval()
    text, _ = batch(model.config, b=4)
    step = model.static_sampling_step(key_bucket=5)
    want = model.generate_image_codes(text, cond_scale=cond_scale, top_k=0.5,
                                      generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        got = model.generate_image_codes(text, cond_scale=cond_scale, top_k=0.5, step=step,
                                         generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
    assert len(set(want.flatten().tolist())) > 3
    assert step.keys_for(model.seq_len - 1) == model.seq_len + 1 and step.keys_for(0) == 5
    with pytest.raises(ValueError, match="caches"):
        step(text[:, :1], model.text_len, model.new_cache(4), True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampling_replays_the_static_steps_tokens():
    """On a GPU: the captured graphs sample exactly what the same static step samples eagerly (the same
    kernels), and close to eager cached sampling (fp32); one graph per batch and key bucket."""
    torch.manual_seed(0)
    model = sharpened(DALLE(tiny_config(attn_types=["full", "axial_row"]))).cuda().eval()
    text = batch(model.config, b=4)[0].cuda()
    runs = {}
    for name, step in (("eager", None), ("static", model.static_sampling_step(cuda_graphs=False, key_bucket=5)),
                       ("graphs", model.static_sampling_step(cuda_graphs=True, key_bucket=5))):
        runs[name] = model.generate_image_codes(text, cond_scale=3.0, top_k=0.5, step=step,
                                                generator=torch.Generator("cuda").manual_seed(3))
        if name == "graphs":
            assert step.num_graphs == len({step.keys_for(p) for p in range(model.text_len, model.seq_len)})
    assert torch.equal(runs["graphs"], runs["static"])
    assert (runs["graphs"] == runs["eager"]).float().mean() > 0.9
