"""bebop as a good citizen of a vLLM install: versions, source fingerprints, refusal (no engine).

- An unsupported vLLM release (mocked) or a changed upstream function leaves vLLM untouched:
  one warning, no patch applied, and only method "bebop" is refused, with the reason.
- The installed vLLM matches the fingerprints recorded for its release; every patch and every
  copied component has recorded fingerprints for every supported release.
- The fingerprint itself: found by qualified name, blind to blank lines and comments, not to code.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

import bebop_vllm.plugin as plugin
from bebop_vllm.config import BebopSpecError
from bebop_vllm.plugin import upstream
from bebop_vllm.plugin.patches import PATCHES
from bebop_vllm.plugin.version import SUPPORTED_VLLM_VERSIONS, base_version, installed_vllm_version, version_problem

VLLM_033_SOURCE = Path("/tmp/vllm033/src")  # an unzipped vllm==0.33.0 wheel, if someone made one


# ---------------------------------------------------------------- versions


def test_supported_versions():
    assert version_problem("0.32.0") is None and version_problem("0.32.0+cpu") is None
    assert version_problem("0.33.0") is None
    for bad in ("0.31.2", "0.33.1", "0.34.0", "1.0.0"):
        msg = version_problem(bad)
        assert msg is not None and bad in msg and "0.32.0 or 0.33.0" in msg and "other engines are unaffected" in msg
    assert "needs vLLM" in version_problem(None)


# ---------------------------------------------------------------- unsupported vLLM: harmless


@pytest.fixture
def fresh_register(monkeypatch):
    """register() as in a new process, with a stub create_speculative_config and patches that must not run."""
    from vllm.engine.arg_utils import EngineArgs

    calls = []

    def stub(self, target_model_config, target_parallel_config):
        calls.append(self.speculative_config)
        return "vllm-config"

    monkeypatch.setattr(EngineArgs, "create_speculative_config", stub)
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "disabled_reason", None)
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    applied = []
    for patch in PATCHES:
        monkeypatch.setattr(patch, "apply", lambda p=patch: applied.append(p.name))
    monkeypatch.setattr(plugin, "_register_models", lambda: applied.append("models"))
    return EngineArgs, calls, applied


def _engine_args(spec, spec_method=None):
    return types.SimpleNamespace(speculative_config=spec, spec_method=spec_method)


@pytest.mark.parametrize("version", ["0.34.0", "0.31.0"])
def test_unsupported_version_warns_once_patches_nothing_refuses_bebop(fresh_register, monkeypatch, caplog, version):
    EngineArgs, calls, applied = fresh_register
    monkeypatch.setattr("bebop_vllm.plugin.version.installed_vllm_version", lambda: version)
    with caplog.at_level(logging.WARNING, logger="bebop_vllm.plugin"):
        plugin.register()
        plugin.register()  # idempotent: still one warning
    warnings = [r for r in caplog.records if r.name == "bebop_vllm.plugin" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and version in warnings[0].getMessage()
    assert applied == []  # no patch, no model registration
    assert plugin.disabled_reason is not None and version in plugin.disabled_reason

    # other engines: vLLM's own function, untouched arguments
    for spec in (None, {"method": "eagle", "model": "x", "num_speculative_tokens": 2}, {"method": "ngram"}):
        assert EngineArgs.create_speculative_config(_engine_args(spec), "m", "p") == "vllm-config"
    assert calls == [None, {"method": "eagle", "model": "x", "num_speculative_tokens": 2}, {"method": "ngram"}]
    # method "bebop" (dict or --spec-method): refused with the reason, vLLM never sees it
    for args in (_engine_args({"method": "bebop"}), _engine_args(None, spec_method="bebop")):
        with pytest.raises(BebopSpecError, match=rf"'bebop' is unavailable in this vLLM: .*found vLLM {version}"):
            EngineArgs.create_speculative_config(args, "m", "p")
    assert len(calls) == 3


def test_fingerprint_mismatch_disables_bebop_and_names_function(fresh_register, monkeypatch, caplog):
    EngineArgs, _, applied = fresh_register
    version = base_version(installed_vllm_version())
    target = "vllm.v1.sample.rejection_sampler:RejectionSampler.forward"
    monkeypatch.setitem(upstream.FINGERPRINTS, version, {**upstream.FINGERPRINTS[version], target: "0" * 16})
    # as after an upstream edit: the file no longer has its recorded digest (no fast path)
    files = {m: d for m, d in upstream.FILE_DIGESTS[version].items() if m != target.split(":")[0]}
    monkeypatch.setitem(upstream.FILE_DIGESTS, version, files)
    problems = plugin.compatibility_problems()
    assert len(problems) == 1
    assert "verifier: vllm/v1/sample/rejection_sampler.py RejectionSampler.forward" in problems[0]
    assert f"vLLM {version}" in problems[0] and "recorded 0000000000000000" in problems[0]
    with pytest.raises(upstream.FingerprintMismatch, match="RejectionSampler.forward"):
        plugin.verify()
    with caplog.at_level(logging.WARNING, logger="bebop_vllm.plugin"):
        plugin.register()
    assert applied == []
    with pytest.raises(BebopSpecError, match="RejectionSampler.forward"):
        EngineArgs.create_speculative_config(_engine_args({"method": "bebop"}), "m", "p")


def test_patch_check_failure_disables_bebop(fresh_register, monkeypatch):
    from bebop_vllm.plugin.patches.base import PatchError

    _, _, applied = fresh_register

    def broken():
        raise PatchError("patch 'model_runner': vllm.x.GPUModelRunner.__init__ has parameters ('self',)")

    monkeypatch.setattr(PATCHES[0], "check", broken)
    plugin.register()
    assert applied == [] and "has parameters" in plugin.disabled_reason


def test_supported_version_applies_needed_patches_only(fresh_register, monkeypatch):
    _, _, applied = fresh_register
    monkeypatch.setattr(PATCHES[0], "applies", lambda: False)
    plugin.register()
    assert plugin.disabled_reason is None
    assert applied == ["models"] + [p.name for p in PATCHES[1:]]


def test_cpu_only_patches_only_on_cpu_hosts():
    """cpu_expand_fix (the CPU bug) and the CPUWorker hook are needed on vLLM's CPU platform only,
    and say so through ``applies`` (so a CUDA install lists them as not needed, not as missing)."""
    from vllm.platforms import current_platform

    from bebop_vllm.plugin.patches import cpu_expand_fix, draft_length
    from bebop_vllm.plugin.patches.base import on_cpu_host

    for patch in (cpu_expand_fix.PATCH, draft_length.CPU_WORKER_WARMUP):
        assert patch.applies is on_cpu_host
        assert patch.needed() == current_platform.is_cpu()


def test_patch_with_false_predicate_is_not_needed():
    from bebop_vllm.plugin.patches.base import Patch

    p = Patch(name="t", upstream="x", module="json", attr="dumps", make_replacement=lambda o: o,
              applies=lambda: False)
    assert p.needed() is False
    assert Patch(name="u", upstream="x", module="json", attr="dumps", make_replacement=lambda o: o).needed()


# ---------------------------------------------------------------- lossy verification (vLLM 0.33 FLy)


@pytest.mark.parametrize("extra", [{"rejection_sample_method": "fly"}, {"rejection-sample-method": "fly"},
                                   {"fly_window_size": 4}, {"rejection_sample_method": "synthetic"}])
def test_bebop_refuses_lossy_verification(extra):
    from bebop_vllm.plugin.patches.speculative_config import translate

    args = types.SimpleNamespace(speculative_config={"method": "bebop", **extra}, spec_method=None)
    with pytest.raises(BebopSpecError, match="exact rejection sampling.*lossy"):
        translate(args, types.SimpleNamespace(model="m"))


def test_bebop_refuses_other_rejection_methods_as_unknown_keys():
    from bebop_vllm.plugin.patches.speculative_config import translate

    args = types.SimpleNamespace(speculative_config={"method": "bebop", "rejection_sample_method": "block"},
                                 spec_method=None)
    with pytest.raises(BebopSpecError, match="unknown key 'rejection_sample_method'"):
        translate(args, types.SimpleNamespace(model="m"))


# ---------------------------------------------------------------- fingerprints


def test_installed_vllm_matches_recorded_fingerprints():
    version = base_version(installed_vllm_version())
    components = [p.name for p in PATCHES] + list(plugin.COPIED_COMPONENTS)
    assert upstream.check(version, components) == []
    assert plugin.compatibility_problems() == []


def test_every_patch_and_release_has_fingerprints():
    names = {p.name for p in PATCHES} | set(plugin.COPIED_COMPONENTS)
    for version in SUPPORTED_VLLM_VERSIONS:
        layout = upstream.targets_for(version)
        assert names == set(layout), version  # no patch without its upstream definitions, no stale entry
        targets = {t for ts in layout.values() for t in ts}
        assert targets == set(upstream.FINGERPRINTS[version]), version
        assert version in upstream.RELEASE_NOTES


def test_changed_file_is_checked_function_by_function(monkeypatch):
    """A file whose digest changed (a comment elsewhere) still passes when the definitions did not."""
    version = base_version(installed_vllm_version())
    monkeypatch.setitem(upstream.FILE_DIGESTS, version, {m: "f" * 16 for m in upstream.FILE_DIGESTS[version]})
    assert upstream.check(version, [p.name for p in PATCHES] + list(plugin.COPIED_COMPONENTS)) == []


def test_unknown_release_or_component_is_a_mismatch():
    assert "no fingerprints" in str(upstream.check("0.99.0", ["speculative_config"])[0])
    assert "none in bebop_vllm.plugin.upstream.TARGETS" in str(upstream.check("0.32.0", ["no_such_patch"])[0])


@pytest.mark.skipif(not (VLLM_033_SOURCE / "vllm").is_dir(), reason="no unzipped vllm 0.33.0 wheel at /tmp/vllm033/src")
def test_vllm_033_source_matches_recorded_fingerprints():
    assert upstream.check("0.33.0", list(upstream.targets_for("0.33.0")), root=VLLM_033_SOURCE) == []
    # FLy is what changed the verifier's fingerprints between the releases
    assert "use_fly" in (VLLM_033_SOURCE / "vllm/v1/sample/rejection_sampler.py").read_text()


SOURCE = '''\
import x


def helper(a):
    def inner():
        return 1
    return a


class Outer:
    """Doc."""

    x = 1

    @staticmethod
    @other(1)
    def method(self, a):
        # a comment

        return a + 1  # inline

    def inner(self):
        return 2


def method():
    return "module-level, not Outer.method"
'''


def _fp(tmp_path, text, qualname):
    path = tmp_path / "m.py"
    path.write_text(text)
    return upstream.fingerprint_file(path, qualname)


def test_fingerprint_finds_by_qualified_name(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(SOURCE)
    lines = SOURCE.splitlines(keepends=True)
    block = upstream._find_block(lines, "Outer.method")
    assert block[0].strip() == "@staticmethod" and block[-1].strip() == "return a + 1  # inline"
    assert upstream._find_block(lines, "Outer.inner")[-1].strip() == "return 2"  # not helper's inner
    assert upstream._find_block(lines, "method")[-1].strip().startswith('return "module-level')
    assert upstream._find_block(lines, "Outer")[-1].strip() == "return 2"
    with pytest.raises(LookupError):
        upstream._find_block(lines, "Outer.missing")


def test_fingerprint_ignores_layout_not_code(tmp_path):
    base = _fp(tmp_path, SOURCE, "Outer.method")
    assert _fp(tmp_path, SOURCE.replace("        # a comment\n\n", ""), "Outer.method") == base
    assert _fp(tmp_path, SOURCE.replace("x = 1\n", "x = 2\n"), "Outer.method") == base  # outside the block
    assert _fp(tmp_path, SOURCE.replace("a + 1", "a + 2"), "Outer.method") != base
    assert _fp(tmp_path, SOURCE.replace("@other(1)", "@other(2)"), "Outer.method") != base
    indented = "class Wrap:\n" + "".join("    " + ln if ln.strip() else ln for ln in SOURCE.splitlines(True))
    assert _fp(tmp_path, indented, "Wrap.Outer.method") == base  # dedented before hashing


# ---------------------------------------------------------------- bebop serve on either layout


def test_cli_env_setup_found_in_either_release_layout(monkeypatch):
    from bebop_vllm.serve import import_cli_env_setup

    assert callable(import_cli_env_setup())  # the installed release's location
    fake = types.ModuleType("vllm.entrypoints.common.startup")
    fake.cli_env_setup = lambda: "0.33 layout"
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.common.startup", fake)
    assert import_cli_env_setup()() == "0.33 layout"
