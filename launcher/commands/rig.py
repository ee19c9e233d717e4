"""Which rig this run drives: the real GPUs with `ollama`, or the simulated rig from `[sim]`.

Shared by `corral plan`, `corral up` and `corral status`, so they all agree and all say it the same
way: `resolve_rig(cfg)` returns the cards, the mode, the argv that starts one backend, and the one
line to print at start. `model_specs(cfg)` is the one place that turns `[[models]]` into the model
facts the planner needs.

Rules for `[launcher].ollama_bin`:
- "sim": the simulated rig from `[sim]`, always;
- "auto": the real rig when `ollama` is on PATH *and* NVML finds GPUs, else the simulated rig;
- anything else: the path (or PATH name) of an ollama executable, run on whatever NVML finds.
`require_gpus = true` turns "no real GPU" into an error instead of a fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher.config import CorralConfig
from launcher.facts.memory import ERA_DESCRIPTION, Era, era_for_version, parse_version
from launcher.facts.strictconf import ConfigError
from launcher.gpus import discovery as gpus
from launcher.gpus.discovery import GpuInfo, NvmlUnavailable
from launcher.models.resolve import ModelUnknown, resolve_model
from launcher.planner.plan import ModelRequest
from launcher.supervise.env import resolve_models_dir

RigMode = Literal["real", "sim"]
Discover = Callable[[], list[GpuInfo]]
Which = Callable[[str], str | None]


@dataclass(frozen=True)
class Rig:
    gpus: list[GpuInfo]
    mode: RigMode
    ollama_bin: list[str]  # argv that starts one backend (env: OLLAMA_HOST, CUDA_VISIBLE_DEVICES, ...)
    message: str  # the one line to print at start
    era: Era = Era.HEAD  # the memory model the backends' Ollama uses (launcher.facts.memory)
    era_note: str = "simulated Ollama (HEAD): " + ERA_DESCRIPTION[Era.HEAD]  # the line `corral plan` prints
    era_warning: str = ""  # why the version could not be read ("" when it could)


VERSION_TIMEOUT_S = 10.0


def ollama_era(ollama: str) -> tuple[Era, str, str]:
    """Run `ollama --version` and pick the memory model: (era, note, warning). When the version
    cannot be read, HEAD's model with a warning that says why."""
    try:
        proc = subprocess.run(
            [ollama, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=False
        )
        text = (proc.stdout or "") + "\n" + (proc.stderr or "")
        era = era_for_version(text)
        why = f"no version in its output: {text.strip()[:120]!r}" if era is None else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        era, why = None, str(e) or type(e).__name__
    if era is None:
        warning = f"`{ollama} --version` failed ({why}); planning with HEAD's memory model"
        return Era.HEAD, f"unknown Ollama version: {ERA_DESCRIPTION[Era.HEAD]}", warning
    version = ".".join(str(n) for n in parse_version(text) or ())
    return era, f"Ollama {version}: {ERA_DESCRIPTION[era]}", ""


def _real_rig(found: list[GpuInfo], ollama: str, message: str) -> Rig:
    era, note, warning = ollama_era(ollama)
    return Rig(found, "real", [ollama, "serve"], message, era, note, warning)


def sim_argv() -> list[str]:
    """Start the simulated backend with this interpreter, so it runs from the same environment."""
    return [sys.executable, "-m", "launcher.sim.cli", "serve"]


def describe_cards(cards: Sequence[GpuInfo]) -> str:
    """ "2x RTX 4090, 2x RTX 3090": consecutive cards of one name counted together."""
    groups: list[tuple[str, int]] = []
    for gpu in cards:
        if groups and groups[-1][0] == gpu.name:
            groups[-1] = (gpu.name, groups[-1][1] + 1)
        else:
            groups.append((gpu.name, 1))
    return ", ".join(f"{n}x {name}" for name, n in groups) or "no GPUs"


def _nvml_discover() -> list[GpuInfo]:
    # The operator's CUDA_VISIBLE_DEVICES limits which cards the rig uses (say, to keep a display
    # card out of it); each backend then gets its own cards by UUID.
    return gpus.discover(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _discover_real(discover: Discover) -> tuple[list[GpuInfo], str]:
    """(GPUs, "") or ([], why there are none)."""
    try:
        found = discover()
    except NvmlUnavailable as e:
        return [], f"no NVIDIA GPU found (NVML: {e})"
    if not found:
        return [], "no NVIDIA GPU found (NVML sees none)"
    return found, ""


def _sim_rig(cfg: CorralConfig, why: str) -> Rig:
    if cfg.launcher.require_gpus:
        raise ConfigError("launcher.require_gpus", f"is true, but {why}")
    if not cfg.sim.gpus:
        raise ConfigError(
            "sim.gpus",
            f"{why}, and there is no simulated rig to run instead: add [[sim.gpus]] entries "
            '(name = "RTX 4090", ...) or run where ollama and NVIDIA GPUs are',
        )
    cards = gpus.simulated_inventory(cfg.sim.gpus)
    where = Path(cfg.source).name if cfg.source else "the config"
    return Rig(
        cards, "sim", sim_argv(), f"{why}: running the simulated rig from {where} [sim]: {describe_cards(cards)}"
    )


def _explicit_ollama(path: str, which: Which) -> str:
    """The executable `ollama_bin` names (a path, or a name looked up on PATH)."""
    found = path if os.sep in path else which(path)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise ConfigError("launcher.ollama_bin", f"{path!r} is not an executable file")
    return found


def resolve_rig(cfg: CorralConfig, *, discover: Discover | None = None, which: Which = shutil.which) -> Rig:
    """Decide real or simulated, find the cards, and say so in one line. Raises ConfigError (exit 2).

    `discover` and `which` are seams for tests: by default NVML (`launcher.gpus.discover`) and PATH.
    """
    discover = discover or _nvml_discover
    setting = cfg.launcher.ollama_bin.strip()
    if setting == "sim":
        return _sim_rig(cfg, 'launcher.ollama_bin = "sim"')
    if setting == "auto":
        ollama = which("ollama")
        if not ollama:
            return _sim_rig(cfg, "no `ollama` on PATH")
        found, why = _discover_real(discover)
        if not found:
            return _sim_rig(cfg, why)
        return _real_rig(found, ollama, f"ollama at {ollama} on {len(found)} GPU(s): {describe_cards(found)}")
    ollama = _explicit_ollama(setting, which)
    found, why = _discover_real(discover)
    if not found:
        if cfg.launcher.require_gpus:
            raise ConfigError("launcher.require_gpus", f"is true, but {why}")
        return _real_rig([], ollama, f"{why}: ollama at {ollama} runs on the CPU")
    return _real_rig(found, ollama, f"ollama at {ollama} on {len(found)} GPU(s): {describe_cards(found)}")


def model_specs(cfg: CorralConfig) -> list[ModelRequest]:
    """The planner's input for every `[[models]]` entry: facts from the model store's GGUF header,
    else the built-in catalog (launcher.models.resolve). An unknown model is a ConfigError naming it."""
    models_dir = resolve_models_dir(cfg.launcher.models_dir, cfg.source or None)
    requests = []
    for i, entry in enumerate(cfg.models):
        try:
            spec = resolve_model(entry.name, models_dir=models_dir)
        except ModelUnknown as e:
            raise ConfigError(f"models[{i}].name", str(e)) from None
        requests.append(ModelRequest(entry, spec, i))
    return requests
