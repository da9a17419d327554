"""Weight average (model soup) of two heads checkpoints of the same layout: A + alpha (B - A)."""
import json, os, sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
a_dir, b_dir, alpha, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
assert set(a) == set(b)
meta = safe_open(f"{b_dir}/model.safetensors", "pt").metadata()
os.makedirs(out, exist_ok=True)
save_file({k: (a[k].float() + alpha * (b[k].float() - a[k].float())).to(a[k].dtype) if a[k].is_floating_point()
           else (a[k] if (a[k] == b[k]).all() else sys.exit(f"{k} differs")) for k in a},
          f"{out}/model.safetensors", metadata=meta)
c = json.load(open(f"{b_dir}/config.json"))
c["extra"]["trees"] = {}
c["extra"].pop("tree_search_mix", None); c["extra"].pop("tree_search", None)
c["extra"]["soup"] = {"a": a_dir, "b": b_dir, "alpha": alpha}
open(f"{out}/config.json", "w").write(json.dumps(c, indent=2) + "\n")
