"""Resumable training state: model and optimizer tensors in safetensors, the rest (step, data cursor, random
states, history) in JSON; never pickle. Written atomically (a temporary directory renamed over the old state), so a
run killed at any moment resumes from the last complete state: `python -m emo_edge.train` continues where it
stopped when `--work` holds a state for the same configuration.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 1


def state_dir(work: Path, name: str) -> Path:
    return work / f"{name}.state"


def save_state(work: Path, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict,
               order: np.ndarray, gen: torch.Generator) -> Path:
    final = state_dir(work, name)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt_tensors = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            opt_tensors[f"{idx}.{key}"] = torch.as_tensor(val).detach().contiguous()
    opt_tensors["__order__"] = torch.from_numpy(np.ascontiguousarray(order.astype(np.int64)))
    opt_tensors["__gen__"] = gen.get_state()
    save_file(opt_tensors, str(tmp / "optim.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"version": STATE_VERSION, **meta}))
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(work: Path, name: str, config: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
               gen: torch.Generator) -> tuple[dict, np.ndarray] | None:
    """Restore model, optimizer and generator from a saved state; returns (meta, order), or None when there is no
    state or it was written for another configuration (then training starts from scratch)."""
    d = state_dir(work, name)
    if not (d / "meta.json").is_file():
        old = d.with_name(d.name + ".old")  # killed between the two renames: the previous state is complete
        if (old / "meta.json").is_file():
            d = old
        else:
            return None
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("version") != STATE_VERSION or meta.get("config") != config:
        return None
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    tensors = load_file(str(d / "optim.safetensors"))
    sd = opt.state_dict()
    state: dict = {}
    for key, val in tensors.items():
        if key.startswith("__"):
            continue
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = val
    sd["state"] = state
    opt.load_state_dict(sd)
    gen.set_state(tensors["__gen__"])
    return meta, tensors["__order__"].numpy()
