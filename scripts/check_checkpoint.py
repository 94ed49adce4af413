"""Reads a ferrovit checkpoint with only json, zlib, numpy and safetensors, as another
tool would (docs/checkpoint-format.md), and checks it against its own index:

- index.json matches its CRC-32 in index.json.crc32 (version 2);
- every shard opens with safetensors.numpy.load_file;
- every tensor of the index is in its shard under its key, with the index's dtype and
  shape, its bytes at the index's absolute byte range, and the index's CRC-32;
- the weight_map names every model tensor's shard;
- with --export FILE: the exported file holds exactly the model tensors, equal to the
  shards' values.

Usage: python3 scripts/check_checkpoint.py CHECKPOINT_DIR [--export FILE]
Exit status 0 when everything matches.
"""
import argparse
import json
import os
import sys
import zlib

import numpy as np
from safetensors.numpy import load_file

DTYPES = {"F32": np.float32, "F16": np.float16}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--export")
    args = ap.parse_args()
    with open(os.path.join(args.dir, "index.json"), "rb") as f:
        raw_index = f.read()
    # version 2: the index is used only once its bytes match index.json.crc32
    sum_path = os.path.join(args.dir, "index.json.crc32")
    if os.path.exists(sum_path):
        with open(sum_path) as f:
            stored = int(f.read().strip(), 16)
        assert zlib.crc32(raw_index) == stored, "index.json does not match its checksum"
    index = json.loads(raw_index)
    assert index["format"] == "ferrovit-checkpoint", index["format"]
    assert index["version"] in (1, 2), index["version"]
    assert index["version"] == 1 or os.path.exists(sum_path), "index.json.crc32 is missing"
    files = sorted({c["file"] for t in index["tensors"].values() for c in t["chunks"]})
    shards = {name: load_file(os.path.join(args.dir, name)) for name in files}
    model = {}
    for name, t in index["tensors"].items():
        assert len(t["chunks"]) == 1, f"{name}: this checker reads whole tensors"
        c = t["chunks"][0]
        arr = shards[c["file"]][c["key"]]
        assert arr.dtype == DTYPES[t["dtype"]], f"{name}: dtype {arr.dtype} vs {t['dtype']}"
        assert list(arr.shape) == t["shape"], f"{name}: shape {arr.shape} vs {t['shape']}"
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        assert zlib.crc32(raw) == c["crc32"], f"{name}: CRC-32 differs"
        with open(os.path.join(args.dir, c["file"]), "rb") as f:
            f.seek(c["start"])
            assert f.read(c["end"] - c["start"]) == raw, f"{name}: bytes at {c['start']}..{c['end']} differ"
        if t["group"] == "model":
            assert index["weight_map"][name] == c["file"], f"{name}: weight_map"
            model[name] = arr
    assert set(index["weight_map"]) == set(model), "weight_map lists exactly the model tensors"
    print(f"ok: {len(index['tensors'])} tensors in {len(files)} shards match the index "
          f"(dtype, shape, byte range, CRC-32); {len(model)} model tensors")
    if args.export:
        exported = load_file(args.export)
        assert set(exported) == set(model), "the export holds exactly the model tensors"
        for name, arr in model.items():
            assert np.array_equal(exported[name], arr), f"{name}: exported values differ"
        print(f"ok: {args.export} holds the {len(model)} model tensors with equal values")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"mismatch: {e}", file=sys.stderr)
        sys.exit(1)
