"""Bad checkpoints give clear errors that name the file and the tensor or key."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from prs_jax.errors import CheckpointError
from prs_jax.models import load_causal_lm
from prs_jax.models.safetensors_io import SafetensorsFile, save_file


@pytest.fixture
def ckpt(llama_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(llama_dir, dst)
    return dst


def _rewrite(path, edit):
    with SafetensorsFile(path) as st:
        tensors = {k: st.get(k).copy() for k in st.keys()}
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    for scan_layers in (False, True):  # stacked layers: a missing layer of a stack is named the same way
        with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'model.layers.1.mlp.up_proj.weight'"):
            load_causal_lm(ckpt, scan_layers=scan_layers)


def test_wrong_shape_names_tensor_and_file(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
    _rewrite(ckpt / "model.safetensors", edit)
    for scan_layers in (False, True):
        with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj."
                                                  r"weight' has shape \[16, 64\]"):
            load_causal_lm(ckpt, scan_layers=scan_layers)


def test_unexpected_tensor(ckpt):
    def edit(t):
        t["model.layers.7.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
    _rewrite(ckpt / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.7.mlp.up_proj.weight'"):
        load_causal_lm(ckpt)


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: unsupported model_type 'mamba'.*Supported: llama"):
        load_causal_lm(ckpt)


def test_unsupported_rope_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        load_causal_lm(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_causal_lm(ckpt)


def test_missing_key_in_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="required key 'hidden_size' is missing"):
        load_causal_lm(ckpt)


@pytest.mark.parametrize("damage", ["huge_header_length", "garbage_json", "short_file", "bad_offsets"])
def test_corrupt_safetensors_header(ckpt, damage):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if damage == "huge_header_length":
        raw = struct.pack("<Q", len(raw) * 10) + raw[8:]
    elif damage == "garbage_json":
        raw = raw[:8] + b"{not json" + raw[17:]
    elif damage == "short_file":
        raw = raw[:5]
    else:
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        raw = struct.pack("<Q", len(blob)) + blob + raw[8 + n:]
    f.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors"):
        load_causal_lm(ckpt)


def test_no_weights_and_pickle_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle-based weights are never loaded"):
        load_causal_lm(ckpt)


def test_index_naming_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002.safetensors'"):
        load_causal_lm(ckpt)
