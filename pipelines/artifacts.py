"""Where trained models live: run directories, the checkpoints in them, and the one published file per model.

Every trainer writes its self-describing weights as ``model.safetensors`` inside each Ray Train checkpoint; when a
run ends, the driver publishes the last one to the path named in ``paths`` (``paths.vae``, ``paths.dalle``,
``paths.clip``). Later stages load only the published files, so none of them knows Ray Train's folder layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from dalle_core.checkpoint import SAFETENSORS_SUFFIX, load_model_with_extra, save_model
from dalle_core.io import copy_file, exists
from pipelines import storage
from pipelines.config import Config

MODEL_FILE = "model.safetensors"  # self-describing weights (dalle_core.checkpoint) in every trainer's checkpoint
LEGACY_MODEL_FILE = "model.pt"  # what checkpoints held before safetensors; still found and loaded
CHECKPOINT_PREFIX = "checkpoint_step_"


def run_dir(storage_path: str, run_name: str) -> str:
    """Where Ray Train puts a run's checkpoints, and where its metrics and samples go beside them."""
    return storage.join(storage_path, run_name)


def checkpoint_name(step: int) -> str:
    """Checkpoint folder names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def latest_checkpoint(runs_dir: str, run_name: str) -> str:
    """The model file of the newest checkpoint of a run (local path or URL)."""
    where = run_dir(runs_dir, run_name)
    fs, root = storage.filesystem(where)
    found = sorted(fs.glob(f"{root}/{CHECKPOINT_PREFIX}*/{MODEL_FILE}")
                   + fs.glob(f"{root}/{CHECKPOINT_PREFIX}*/{LEGACY_MODEL_FILE}"))
    if not found:
        raise FileNotFoundError(f"no checkpoint ({MODEL_FILE}) under {where}; train first or pass --checkpoint")
    return found[-1] if storage.is_local(where) else fs.unstrip_protocol(found[-1])


def publish(checkpoint_dir: str, destination: str) -> str:
    """Copies a checkpoint's model file, and nothing else of it, to ``destination`` (atomically; server-side where
    both are on one object store); returns ``destination``. A destination not named ``*.safetensors`` gets the same
    model in the older ``torch.save`` format its name asks for."""
    source = storage.join(checkpoint_dir, MODEL_FILE)
    if destination.endswith(SAFETENSORS_SUFFIX):
        copy_file(source, destination)
    else:
        model, extra = load_model_with_extra(source)
        save_model(model, destination, extra=extra)
    return destination


@dataclass
class ModelPaths:
    """The four artifacts generation and evaluation need (local paths or fsspec URLs)."""

    checkpoint: str
    vae: str
    tokenizer: str
    clip: str

    def require(self) -> None:
        """Raises FileNotFoundError naming every file that is not there: checked before Serve starts, since a
        replica that cannot load its model is retried, not reported."""
        missing = [f"{name} {path}" for name, path in vars(self).items() if not exists(path)]
        if missing:
            raise FileNotFoundError(f"no such model file: {', '.join(missing)}")


def model_paths(config: Config, checkpoint: str | None = None, vae: str | None = None,
                tokenizer: str | None = None, clip: str | None = None) -> ModelPaths:
    """Explicit paths win; the rest default from ``config.paths``. The DALLE default is the published
    ``paths.dalle``, or while a run has published nothing yet, its newest checkpoint."""
    paths = config.paths.resolved()
    if checkpoint is None:
        checkpoint = paths.dalle if exists(paths.dalle) else latest_checkpoint(paths.runs, config.train.run_name)
    return ModelPaths(checkpoint=checkpoint, vae=vae or paths.vae, tokenizer=tokenizer or paths.tokenizer,
                      clip=clip or paths.clip)
