"""What a saved pipeline folder records about its data, so that a likelihood loaded from it is never silently
wrong: ``likelihood_data.json`` beside ``model_index.json``.

    {"num_levels": 17, "scaling": "y = 2x/(n-1) - 1", "data_range": [-1.0, 1.0], "data": "sklearn digits"}

``scaling`` says how integer levels ``x in {0..n-1}`` map to the model space the network saw (the only scaling
supported: the level grid on [-1, 1], as the training script and the sampling pipelines use).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .discrete import check_num_levels

DATA_RECORD_NAME = "likelihood_data.json"
SCALING = "y = 2x/(n-1) - 1"


def save_data_record(save_directory: str, num_levels: Optional[int], data: Optional[str] = None) -> str:
    """Write ``likelihood_data.json`` into a saved pipeline folder (the training script calls it after
    ``save_pretrained``); ``num_levels=None`` records continuous data. Returns the file's path."""
    record = {"num_levels": check_num_levels(num_levels), "scaling": SCALING, "data_range": [-1.0, 1.0]}
    if data is not None:
        record["data"] = str(data)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, DATA_RECORD_NAME)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
    return path


def load_data_record(folder) -> Optional[dict]:
    """The record of a local pipeline folder, or None when it has none; ValueError if it is malformed or
    records a scaling other than the level grid on [-1, 1]."""
    path = os.path.join(str(folder), DATA_RECORD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    if not isinstance(record, dict) or "num_levels" not in record or record.get("scaling", SCALING) != SCALING:
        raise ValueError(f"{path} must hold num_levels and scaling {SCALING!r}; got {record!r}.")
    check_num_levels(record["num_levels"])
    return record
