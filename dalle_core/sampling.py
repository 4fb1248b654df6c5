"""Prompt -> images in pure torch: check and tokenise prompts, sample codes, decode, score, lay out a grid.

Shared by ``jobs/generate.py`` (one-off, no Ray) and the Serve Generator/Scorer deployments, so a prompt gives
the same pictures whichever path runs it. Prompts the model cannot see faithfully (empty, longer than
``text_seq_len``, characters outside the BPE vocabulary) get a status instead of an exception, because a batch
job must record them and go on.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dalle_core.config import SamplingConfig
from dalle_core.images import to_uint8
from dalle_core.tokenizer import BPETokenizer, normalize_caption, pad_text_ids
from dalle_core.train_utils import DTYPES, precision_choice

STATUS_OK = "ok"
STATUS_EMPTY = "empty"
STATUS_TOO_LONG = "too_long"
STATUS_UNKNOWN_CHARS = "unknown_chars"
STATUS_ERROR = "error"


@dataclass
class PromptCheck:
    """One prompt after checking: ``text_ids`` are set (unpadded) only when ``status`` is ``ok``."""

    prompt: str
    status: str
    detail: str = ""
    text_ids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


class PromptChecker:
    """Classifies prompts against one tokenizer. Truncation and unknown characters are rejected rather than
    generated, since the picture would then answer a different caption than the one recorded."""

    def __init__(self, tokenizer: BPETokenizer) -> None:
        self.tokenizer = tokenizer
        self._untruncated = copy.copy(tokenizer)  # same model, no length cap: tells "too long" apart
        self._untruncated.text_seq_len = 1 << 30
        pieces = (tokenizer.decode([i]) for i in range(len(BPETokenizer.SPECIAL_IDS), tokenizer.vocab_size))
        self.known_chars = set("".join(pieces)) | {" "}

    def check(self, prompts: list[str]) -> list[PromptCheck]:
        out = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                out.append(PromptCheck(str(prompt), STATUS_EMPTY, f"not a string: {type(prompt).__name__}"))
                continue
            text = normalize_caption(prompt)
            if not text:
                out.append(PromptCheck(prompt, STATUS_EMPTY, "prompt is empty after normalisation"))
                continue
            ids = self._untruncated.encode([text])[0]
            if BPETokenizer.UNK_ID in ids:
                unknown = "".join(sorted(set(text) - self.known_chars)) or "?"
                out.append(PromptCheck(prompt, STATUS_UNKNOWN_CHARS,
                                       f"the tokenizer cannot represent {unknown!r}"))
            elif len(ids) > self.tokenizer.text_seq_len:
                out.append(PromptCheck(prompt, STATUS_TOO_LONG,
                                       f"{len(ids)} tokens > text_seq_len={self.tokenizer.text_seq_len}"))
            else:
                out.append(PromptCheck(prompt, STATUS_OK, "", ids))
        return out


def derive_seed(base_seed: int, parts: list[str]) -> int:
    """A seed fixed by a base seed and the given parts (a prompt's key, a candidate's index), the same on every
    machine and rerun."""
    digest = hashlib.sha256(f"{base_seed}|{'|'.join(parts)}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


class ImageGenerator:
    """A DALLE + dVAE decoder pair: text ids -> ``num_candidates`` pictures per prompt in one batched pass.

    ``precision`` (``sampling.precision``) sets the DALLE's weights and so its KV cache: ``auto`` is bf16 where
    the device computes it natively, else fp32. Logits are sampled in fp32 whatever it is, and the dVAE decoder
    stays fp32 (a few percent of the time; its colours are what the checker reads). ``compile_step``
    (``sampling.compile``) samples through :meth:`DALLE.compiled_sampling_step`: it compiles on the first pass of
    each batch shape class (one row, or more) and then runs each step faster. ``cuda_graphs``
    (``sampling.cuda_graphs``, CUDA only) replays the step from CUDA graphs
    (:meth:`DALLE.static_sampling_step`): captured on the first pass of each batch size, then one launch a step
    where eager launches a few hundred kernels."""

    def __init__(self, dalle: torch.nn.Module, vae: torch.nn.Module, device: str | torch.device = "cpu",
                 precision: str = "auto", compile_step: bool = False, cuda_graphs: bool = False) -> None:
        d, v = dalle.config, vae.config
        checks = [("dalle.num_image_tokens", d.num_image_tokens, "vae.num_tokens", v.num_tokens),
                  ("dalle.image_seq_len", d.image_seq_len, "vae.image_seq_len", v.image_seq_len)]
        for left, a, right, b in checks:
            if a != b:
                raise ValueError(f"checkpoint mismatch: {left}={a} but {right}={b}")
        self.device = torch.device(device)
        self.precision, self.precision_reason = precision_choice(precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"sampling.precision: fp16 needs a CUDA device, got {self.device.type} "
                             "(use auto, bf16 or fp32)")
        if cuda_graphs and (compile_step or self.device.type != "cuda"):
            raise ValueError("sampling.cuda_graphs needs a CUDA device and sampling.compile off, got "
                             f"{self.device.type} with compile={compile_step}")
        self.dalle = dalle.to(self.device, DTYPES[self.precision]).eval()
        self.step = self.dalle.compiled_sampling_step() if compile_step else \
            self.dalle.static_sampling_step() if cuda_graphs else None
        self.vae = vae.to(self.device).eval()
        self.text_seq_len = d.text_seq_len

    def check_tokenizer(self, tokenizer: BPETokenizer) -> None:
        """The tokenizer must produce the ids the checkpoint was trained on."""
        d = self.dalle.config
        if tokenizer.text_seq_len != d.text_seq_len:
            raise ValueError(f"tokenizer text_seq_len={tokenizer.text_seq_len} but dalle.text_seq_len="
                             f"{d.text_seq_len}")
        if tokenizer.vocab_size > d.num_text_tokens:
            raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} > dalle.num_text_tokens="
                             f"{d.num_text_tokens}")

    @torch.no_grad()
    def generate(self, text_ids: Tensor, num_candidates: int, sampling: SamplingConfig, seeds: list[int]) -> Tensor:
        """``text_ids [P, T]`` -> float pictures ``[P, num_candidates, C, H, W]`` in [0, 1]. Every candidate of
        every prompt is a row of one cached (and, with ``cond_scale != 1``, guided) sampling pass. Each prompt's
        ``seeds`` entry fixes its candidates' draws, so they do not depend on the other prompts of the pass."""
        if len(seeds) != text_ids.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {text_ids.shape[0]} prompts")
        rows = text_ids.to(self.device).repeat_interleave(num_candidates, dim=0)
        generators = [torch.Generator(self.device).manual_seed(derive_seed(seed, [str(c)]))
                      for seed in seeds for c in range(num_candidates)]
        codes = self.dalle.generate_image_codes(rows, temperature=sampling.temperature, top_k=sampling.top_k,
                                                cond_scale=sampling.cond_scale, use_cache=True,
                                                generator=generators, step=self.step)
        images = self.vae.decode(codes)
        return images.view(text_ids.shape[0], num_candidates, *images.shape[1:])


@torch.no_grad()
def score_candidates(scorer: torch.nn.Module, text_ids: Tensor, images: Tensor,
                     captions: list[str] | None = None) -> Tensor:
    """CLIP scores ``[P, N]`` of each prompt ``text_ids [P, T]`` (and its caption string, for scorers with a
    tokenizer of their own) against its candidates ``[P, N, C, H, W]``."""
    p, n = images.shape[:2]
    device = next(scorer.parameters()).device
    rows = text_ids.to(device).repeat_interleave(n, dim=0)
    row_captions = None if captions is None else [c for c in captions for _ in range(n)]
    return scorer.score(rows, images.to(device).flatten(0, 1), row_captions).view(p, n).float().cpu()


def rank_order(scores: Tensor) -> Tensor:
    """Candidate indices best first, per prompt (stable, so ties keep generation order)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def load_generator(checkpoint: str, vae_path: str, device: str | torch.device = "cpu",
                   precision: str = "auto", compile_step: bool = False, cuda_graphs: bool = False) -> ImageGenerator:
    """Loads the self-describing DALLE and dVAE checkpoints (local or fsspec URLs) into an ImageGenerator."""
    from dalle_core.checkpoint import load_model

    return ImageGenerator(load_model(checkpoint, map_location=device), load_model(vae_path, map_location=device),
                          device, precision, compile_step, cuda_graphs)


@dataclass
class RankedPrompt:
    """One prompt's outcome: its check, the candidates (uint8 ``[N, H, W, C]``), CLIP scores, best-first order."""

    check: PromptCheck
    images: np.ndarray | None = None
    scores: list[float] | None = None
    order: list[int] | None = None
    seed: int | None = None


def generate_prompt(generator: ImageGenerator, tokenizer: BPETokenizer, prompt: str, num_candidates: int,
                    sampling: SamplingConfig, scorer: torch.nn.Module | None = None) -> RankedPrompt:
    """Check -> tokenise -> sample -> decode -> (optionally) score and rank one prompt; seeded by
    ``sampling.seed`` alone, so the same prompt and settings give the same pictures."""
    check = PromptChecker(tokenizer).check([prompt])[0]
    if not check.ok:
        return RankedPrompt(check)
    text = pad_text_ids([check.text_ids], generator.text_seq_len)
    images = generator.generate(text, num_candidates, sampling, [sampling.seed])
    result = RankedPrompt(check, to_uint8(images[0]), seed=sampling.seed)
    if scorer is not None:
        scores = score_candidates(scorer, text, images, [prompt])
        result.scores, result.order = scores[0].tolist(), rank_order(scores)[0].tolist()
    else:
        result.order = list(range(num_candidates))
    return result
