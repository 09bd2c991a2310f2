"""Uploading a saved T2R folder (weights, config with auto_map, remote code, card) to the Hugging Face hub."""

from __future__ import annotations

import json
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)


def folder_files(folder: str) -> list[str]:
    """Relative paths of every file under `folder` that would be uploaded (hidden and partial files excluded)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            if not name.startswith("."):
                files.append(os.path.relpath(os.path.join(root, name), folder))
    return files


def check_t2r_folder(folder: str) -> dict:
    """Raise unless `folder` is a saved T2R model ready to share; returns its config."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json: save the model with `save_pretrained` first.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "t2r":
        raise ValueError(f"{folder!r} holds a {config.get('model_type')!r} model, not a T2R model.")
    needed = ["README.md", "modeling_t2r.py", "configuration_t2r.py"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing or "auto_map" not in config:
        raise ValueError(
            f"{folder!r} lacks {missing or 'auto_map in config.json'}; re-save it with t2r_hf's `save_pretrained`."
        )
    if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(folder)):
        raise ValueError(f"{folder!r} has no weights file.")
    return config


def push_folder(folder: str, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None,
                commit_message: str = "Upload T2R model"):
    """Upload `folder` to `repo_id` with one `create_repo` + `create_commit`. With `dry_run`, upload nothing and
    return the list of files that would go up; otherwise return the commit info."""
    check_t2r_folder(folder)
    files = folder_files(folder)
    if dry_run:
        return files
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    logger.info("Pushed %d files to %s", len(files), repo_id)
    return info
