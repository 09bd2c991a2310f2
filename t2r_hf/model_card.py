"""Model cards for saved T2R checkpoints, from the template in `model_cards/`."""

from __future__ import annotations

import json
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)

TEMPLATE = "t2r_model_card.md"


def _template_text() -> str:
    """The card template: package data `t2r_hf/model_cards/` when installed, `model_cards/` in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "model_cards"), os.path.join(os.path.dirname(here), "model_cards")):
        path = os.path.join(folder, TEMPLATE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError(f"Model card template {TEMPLATE} not found (it ships with the t2r-hf package).")


def render_model_card(config, results: dict | None = None) -> str:
    """The card text for a T2R model with `config`; `results` (name -> value) adds a table of measured numbers."""
    base = config.base_model_name_or_path
    is_hub_id = bool(base) and not os.path.isabs(base) and base.count("/") == 1 and not os.path.exists(base)
    rows = "\n".join(f"| {k} | {v} |" for k, v in (results or {}).items())
    results_block = f"| metric | value |\n|---|---|\n{rows}" if rows else "No evaluation was recorded when this model was saved."
    options = {
        "source family": config.source_model_type,
        "feature map": config.feature_map,
        "feature_dim": config.feature_dim,
        "eps": config.eps,
        "chunk_size": config.chunk_size,
        "window_size": config.window_size,
        "softmax_layers": list(config.softmax_layers or []),
    }
    notes = []
    if config.window_size:
        notes.append(
            f"Each converted layer is a sliding-window hybrid (LoLCATs): exact softmax over the last "
            f"{config.window_size} tokens, linear attention beyond, one shared normaliser; the state holds a "
            f"{config.window_size}-token key/value window beside it."
        )
    if config.softmax_layers:
        notes.append(
            f"Layers {list(config.softmax_layers)} keep their original softmax attention, with an ordinary key/value "
            "cache that grows with the context."
        )
    return _template_text().format(
        hybrid_note="".join("\n\n" + n for n in notes),
        base_model_line=f"base_model: {base}\n" if is_hub_id else "",
        base_model=base or "unknown",
        options="\n".join(f"| {k} | {v} |" for k, v in options.items()),
        results=results_block,
        config_json=json.dumps(options),
    )


def write_model_card(config, save_directory, results: dict | None = None) -> str:
    """Write `README.md` into `save_directory`; returns its path."""
    path = os.path.join(save_directory, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_model_card(config, results))
    logger.info("Model card written to %s", path)
    return path
