"""Weight average ("model soup") of two heads checkpoints of one layout: A + alpha (B - A), in fp32, stored in
A's dtype. Integer tensors (the draft vocabulary's ids) must agree. The config is B's, with its fitted trees
dropped (they belong to B's weights: refit with `tree-search --save`) and the soup recorded.
    python soup_heads.py A_DIR B_DIR ALPHA OUT_DIR"""
import json
import os
import sys

from safetensors import safe_open
from safetensors.torch import load_file, save_file

a_dir, b_dir, alpha, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
if set(a) != set(b):
    sys.exit(f"the checkpoints hold different tensors: {sorted(set(a) ^ set(b))}")
soup = {}
for k, ta in a.items():
    if ta.is_floating_point():
        soup[k] = (ta.float() + alpha * (b[k].float() - ta.float())).to(ta.dtype)
    elif not (ta == b[k]).all():
        sys.exit(f"{k} differs between the checkpoints (integer tensors are not averaged)")
    else:
        soup[k] = ta
os.makedirs(out, exist_ok=True)
save_file(soup, f"{out}/model.safetensors", metadata=safe_open(f"{b_dir}/model.safetensors", "pt").metadata())
config = json.load(open(f"{b_dir}/config.json"))
config["extra"]["trees"] = {}
config["extra"].pop("tree_search_mix", None)
config["extra"].pop("tree_search", None)
config["extra"]["soup"] = {"a": a_dir, "b": b_dir, "alpha": alpha}
open(f"{out}/config.json", "w").write(json.dumps(config, indent=2) + "\n")
