import os
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the real-ComfyUI server fixture, shared by every integration module (one server per ComfyUI tree)
pytest_plugins = ["comfy_fixtures"]

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Strict mode (VORTA_CI_STRICT=1, set by .ci/run, which sets up ComfyUI): a test marked `comfyui`
# that would be skipped fails instead, with the skip reason, so a broken set-up cannot pass as a
# run of skips. Tests marked `gpu` still skip (CI has no GPU); xfail stays xfail; so does a skip whose
# reason starts with NOT_APPLICABLE: a case that cannot exist in this ComfyUI tree (a model class
# an older ComfyUI lacks), e.g. pytest.skip(f"{NOT_APPLICABLE} SCAILWanModel is not in ComfyUI 0.3.64").
STRICT = os.environ.get("VORTA_CI_STRICT") == "1"
NOT_APPLICABLE = "not applicable:"


class _StrictFailure(str):
    """The failure text; its reprcrash puts the reason on pytest's short-summary line too."""

    def __new__(cls, reason):
        self = super().__new__(cls, f"VORTA_CI_STRICT=1: this ComfyUI test would have been skipped: {reason}")
        self.reprcrash = types.SimpleNamespace(message=str(self))
        return self


def _skip_reason(rep) -> str:
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (STRICT and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    if item.get_closest_marker("comfyui") is None or item.get_closest_marker("gpu") is not None:
        return
    if _skip_reason(rep).lower().startswith(NOT_APPLICABLE):
        return
    rep.outcome = "failed"
    rep.longrepr = _StrictFailure(_skip_reason(rep))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module that skips itself while being imported has no items to mark: judged by its text
    outcome = yield
    rep = outcome.get_result()
    if not (STRICT and rep.skipped and isinstance(collector, pytest.Module)):
        return
    text = Path(collector.path).read_text(errors="replace")
    if "mark.comfyui" in text and "mark.gpu" not in text:
        rep.outcome = "failed"
        rep.longrepr = _StrictFailure(_skip_reason(rep))
