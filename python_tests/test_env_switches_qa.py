"""Every run-time AMPHISTA_* variable reads one way (amphista_engine/env_settings.py): 1/0, true/false, yes/no and
on/off in any case, and a value it does not take is a ConfigError naming the variable. Before, each module parsed its
own way: AMPHISTA_EXACT_GREEDY=true was silently off, AMPHISTA_CPU_PACK=off silently on, AMPHISTA_PDL=true an error."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import ConfigError

BAD = "maybe"


def test_switch_helper_takes_every_spelling_and_names_the_bad_value(monkeypatch):
    from amphista_engine.env_settings import env_choice, env_switch
    name = "AMPHISTA_QA_SWITCH"
    monkeypatch.delenv(name, raising=False)
    assert env_switch(name, True) is True and env_switch(name, False) is False
    for word in ("1", "true", "TRUE", " Yes ", "on"):
        monkeypatch.setenv(name, word)
        assert env_switch(name, False) is True, word
    for word in ("0", "false", "No", " OFF "):
        monkeypatch.setenv(name, word)
        assert env_switch(name, True) is False, word
    monkeypatch.setenv(name, "  ")
    assert env_switch(name, True) is True
    monkeypatch.setenv(name, "Auto")
    assert env_switch(name, None, auto=True) is None
    with pytest.raises(ConfigError, match=r"AMPHISTA_QA_SWITCH='Auto'.*1/true/yes/on or 0/false/no/off"):
        env_switch(name, False)                       # "auto" only where the variable has it
    monkeypatch.setenv(name, " Launch ")
    assert env_choice(name, ("auto", "launch"), "auto") == "launch"
    monkeypatch.setenv(name, "2x")
    with pytest.raises(ConfigError, match=r"AMPHISTA_QA_SWITCH='2x'.*auto, launch"):
        env_choice(name, ("auto", "launch"), "auto")


def test_exact_greedy_takes_true_and_refuses_a_bad_value(monkeypatch):
    from amphista_engine.kernels import cpu_exact, gpu_exact
    for word, on in (("true", True), ("YES", True), ("on", True), ("false", False), ("off", False), ("", False)):
        monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", word)
        assert gpu_exact.enabled() is on, word
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "true")
    # the CPU's exact path reads the same switch: fp32 orders its attention when asked (as bf16 always does)
    assert cpu_exact.applies(torch.zeros(1, 1, 4, 8), rounded_linears=False)
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", BAD)
    with pytest.raises(ConfigError, match="AMPHISTA_EXACT_GREEDY='maybe'"):
        gpu_exact.enabled()


def test_cpu_pack_off_spellings_turn_packing_off(monkeypatch):
    from amphista_engine.kernels import cpu_packed
    try:
        monkeypatch.setenv("AMPHISTA_CPU_PACK", "1")
        cpu_packed.available.cache_clear()
        packs = cpu_packed.available(torch.float32)
        for word, want in (("off", False), ("false", False), ("No", False), ("true", packs), (" ", packs)):
            monkeypatch.setenv("AMPHISTA_CPU_PACK", word)
            cpu_packed.available.cache_clear()
            assert cpu_packed.available(torch.float32) is want, word
        monkeypatch.setenv("AMPHISTA_CPU_PACK", BAD)
        cpu_packed.available.cache_clear()
        with pytest.raises(ConfigError, match="AMPHISTA_CPU_PACK='maybe'"):
            cpu_packed.available(torch.float32)
    finally:
        monkeypatch.undo()
        cpu_packed.available.cache_clear()


def test_cuda_graphs_switch_refuses_a_bad_value(monkeypatch):
    from amphista_engine import cuda_graphs
    for word, on in (("true", True), ("Yes", True), ("off", False), ("no", False), ("", True)):
        monkeypatch.setenv(cuda_graphs.ENV_VAR, word)
        assert cuda_graphs.DecodeGraphs().enabled is on, word
    monkeypatch.setenv(cuda_graphs.ENV_VAR, BAD)           # was: on, whatever was meant
    with pytest.raises(ConfigError, match="AMPHISTA_CUDA_GRAPHS='maybe'"):
        cuda_graphs.DecodeGraphs()


def test_pdl_takes_true_and_false(monkeypatch):
    from amphista_engine.kernels import backend
    for word, on in (("true", True), ("yes", True), ("Auto", True), ("false", False), ("NO", False)):
        monkeypatch.setenv(backend.PDL_ENV, word)
        assert backend.pdl_wanted() is on, word
    monkeypatch.setenv(backend.PDL_ENV, BAD)
    with pytest.raises(ConfigError, match="AMPHISTA_PDL='maybe'"):
        backend.pdl_wanted()


def test_triton_linear_takes_true_and_false(monkeypatch):
    from amphista_engine.kernels import routed_linear
    for word, mode in (("true", "on"), ("Yes", "on"), ("false", "off"), ("no", "off"), (" AUTO ", "auto"),
                       ("", "auto")):
        monkeypatch.setenv(routed_linear.ENV_VAR, word)
        assert routed_linear.mode() == mode, word
    monkeypatch.setenv(routed_linear.ENV_VAR, BAD)
    with pytest.raises(ConfigError, match="AMPHISTA_TRITON_LINEAR='maybe'"):
        routed_linear.mode()


@pytest.mark.parametrize("name, module, read, bad", [
    ("AMPHISTA_TREE_MERGE", "split_merge", "default_merge", "Foo"),
    ("AMPHISTA_CPU_POOL", "cpu_threads", "pool_setting", "2X"),
])
def test_choice_variables_name_the_value_as_set(name, module, read, bad, monkeypatch):
    """The error quoted the value lower-cased, not as the user set it."""
    import importlib
    mod = importlib.import_module(f"amphista_engine.kernels.{module}")
    monkeypatch.setenv(name, bad)
    with pytest.raises(ConfigError, match=f"{name}='{bad}'.*auto"):
        getattr(mod, read)()
    monkeypatch.setenv(name, " AUTO ")
    assert getattr(mod, read)() == "auto"


@pytest.mark.parametrize("word", ["on", "ON", "1", "true", "yes"])
def test_cache_dir_on_words_mean_the_default_place(word, monkeypatch, tmp_path):
    """AMPHISTA_CACHE_DIR=on made a folder named ./on (as =false made ./false before the off-words)."""
    from amphista_engine import timing_cache
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(timing_cache.CACHE_ENV, word)
    assert timing_cache.path("step_costs.json") == tmp_path / "xdg" / "amphista-engine" / "step_costs.json"
