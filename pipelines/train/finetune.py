"""Fine-tuning: a new run that starts from a published model's weights instead of the seeded init.

The trainer section's ``init_from`` names the file (``model.safetensors``, local or s3://). Only the weights carry over:
the optimiser, the LR schedule (``optim.*``, e.g. a smaller ``optim.lr``) and the step count start fresh, in a
run of its own. A run that already has a checkpoint resumes from it, whatever ``init_from`` says, so a killed
fine-tune continues instead of starting over from the init weights (:func:`pipelines.train.runner.train_worker`).

:func:`check_init_from` reads the file on the driver, before Ray starts, and refuses one that does not fit the
job, naming the field. Fields that shape the parameters or what they mean must be equal; the few that only change
how the model trains (:data:`TRAINING_ONLY`) may differ, and the config's value is used.
"""

from __future__ import annotations

import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from dalle_core.checkpoint import load_model_with_extra
from dalle_core.config import to_dict
from pipelines import artifacts, storage
from pipelines.config import Config, InputError, TrainerConfig
from pipelines.train.runner import section_name

# trainer section -> (the model kind it trains, the config section describing that model)
MODELS = {"train": ("DALLE", "dalle"), "train_vae": ("DiscreteVAE", "vae"), "train_clip": ("CLIP", "clip")}
# Per kind, the model fields a fine-tune may change: regularisation and loss weights, never shapes or layout.
TRAINING_ONLY = {
    "DALLE": frozenset({"attn_dropout", "ff_dropout", "loss_img_weight", "null_cond_prob",
                        "sparse_attention", "activation_checkpointing"}),
    "DiscreteVAE": frozenset({"temperature", "straight_through", "kl_div_loss_weight", "diversity_loss_weight",
                              "smooth_l1_loss"}),
    "CLIP": frozenset(),
}
# What a DALLE records of the token shards it trained on (``extra``), against the manifest's fields.
TRAINED_ON = {"tokenizer_hash": ("tokenizer", "model_hash"), "vae_hash": ("vae", "checkpoint_hash")}


def trained_on(manifest: dict[str, Any]) -> dict[str, str]:
    """The tokenizer and dVAE identity of the token shards, as a DALLE trained on them records it."""
    return {key: manifest[part][field] for key, (part, field) in TRAINED_ON.items()}


def _location(path: str) -> tuple[type, str]:
    fs, inner = storage.filesystem(path)
    return type(fs), os.path.realpath(inner) if isinstance(fs, LocalFileSystem) else inner.rstrip("/")


def _inside(path: str, folder: str) -> bool:
    (path_fs, inner), (folder_fs, root) = _location(path), _location(folder)
    return path_fs is folder_fs and inner.startswith(root + "/")


def check_init_from(config: Config, section: TrainerConfig, *, storage_path: str, run_name: str,
                    manifest: dict[str, Any] | None = None) -> None:
    """Refuses (:class:`InputError`, naming the field) a ``section.init_from`` file that is missing, of another
    model kind, built with a different model config, inside the run folder being started (that would be a
    resume, not a fine-tune), or for DALLE trained on another tokenizer or dVAE than ``manifest``'s shards.
    Does nothing without ``init_from``. Needs no Ray: jobs call it before ``ray.init``."""
    path = section.init_from
    if not path:
        return
    name = section_name(config, section)
    where = f"{name}.init_from {path}"
    run = artifacts.run_dir(storage_path, run_name)
    if _inside(path, run):
        raise InputError(f"{where}: is inside {run}, the folder of the run being started; a fine-tune needs a run "
                         f"name of its own ({name}.run_name, --run-name)")
    try:
        model, extra = load_model_with_extra(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{where}: {exc}") from exc
    kind, model_section = MODELS[name]
    if type(model).__name__ != kind:
        raise InputError(f"{where}: holds a {type(model).__name__}, {name} trains a {kind}")
    wanted = to_dict(getattr(config, model_section))
    for key, have in to_dict(model.config).items():
        if key not in TRAINING_ONLY[kind] and have != wanted[key]:
            raise InputError(f"{where}: {model_section}.{key} is {have} in the file, {wanted[key]} in the config")
    for key, want in (trained_on(manifest) if manifest else {}).items():
        have = extra.get(key)
        if have and want and have != want:
            part, field = TRAINED_ON[key]
            raise InputError(f"{where}: trained on shards of {part}.{field}={have[:12]}..., these shards have "
                             f"{want[:12]}... (manifest.{part}.{field}): its tokens would mean something else")
