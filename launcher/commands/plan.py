"""`corral plan --config FILE [--json]`: which model goes on which card, and why. Starts nothing.

Prints the rig line, the cards (VRAM planned / free, the backend and port each one serves), the
models on each backend (context, VRAM, expected tokens/s, the reason for the choice), then warnings,
the candidates turned down ("why not elsewhere") and a one-line summary per model. Errors (a model
that fits nowhere, an impossible pin) go to stderr and make the exit status 1; a config error is
one line and exit status 2 (launcher.commands.cli). `--json` prints the whole plan and the rig for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from launcher.commands.rig import Rig, model_specs, resolve_rig
from launcher.config import LauncherSettings, load_config
from launcher.gpus.discovery import GpuInfo, inventory_to_json
from launcher.planner.fit import card_budgets, card_tags
from launcher.planner.placement import Plan, PlannedBackend
from launcher.planner.plan import plan

GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path of config.toml (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the plan and the rig as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    rig = resolve_rig(cfg)
    the_plan = plan(rig.gpus, model_specs(cfg), cfg.launcher, rig.era)
    try:
        if args.json:
            json.dump({"rig": rig_to_json(rig), "plan": plan_to_json(the_plan)}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_plan(the_plan, rig, sys.stdout, usable=usable_bytes(rig.gpus, cfg.launcher))
        sys.stdout.flush()
    except BrokenPipeError:  # `corral plan | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for error in the_plan.errors:
        print(f"error: {error}", file=sys.stderr)
    return 0 if the_plan.ok else 1


def rig_to_json(rig: Rig) -> dict[str, Any]:
    return {
        "mode": rig.mode,
        "message": rig.message,
        "ollama_bin": rig.ollama_bin,
        "memory_model": {"era": str(rig.era), "note": rig.era_note, "warning": rig.era_warning},
        "gpus": inventory_to_json(rig.gpus),
    }


def plan_to_json(the_plan: Plan) -> dict[str, Any]:
    """The whole Plan as plain JSON (tuples as lists, enums as their values), plus `ok`."""
    data = dataclasses.asdict(the_plan)
    data["ok"] = the_plan.ok
    return json.loads(json.dumps(data))  # StrEnum -> str, tuple -> list


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.1f}"


def _table(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "  ") -> None:
    """Left-aligned columns; the last column is free text and is never padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        out.write((indent + "  ".join(cells)).rstrip() + "\n")


def usable_bytes(gpus: Sequence[GpuInfo], settings: LauncherSettings) -> dict[str, int]:
    """Card UUID -> what the planner may use there (free memory minus the configured reserve)."""
    budgets, _ = card_budgets(gpus, settings)
    return {b.gpu.uuid: b.usable_bytes for b in budgets.values()}


def _card_rows(the_plan: Plan, gpus: Sequence[GpuInfo], usable: Mapping[str, int]) -> list[list[str]]:
    """PLANNED / FREE: what the plan puts on the card, and what stays free after it (the usable
    memory, free minus the reserve, less the planned)."""
    rows = [["CARD", "PLANNED / FREE", "BACKEND", "PORT", "MODELS"]]
    by_uuid: dict[str, tuple[PlannedBackend, int]] = {}
    for b in the_plan.backends:
        for pos, uuid in enumerate(b.gpu_uuids):
            by_uuid[uuid] = (b, pos)
    for gpu, tag in zip(gpus, card_tags(gpus), strict=True):
        room = usable.get(gpu.uuid, gpu.memory_free_bytes)
        if gpu.uuid not in by_uuid:
            rows.append([f"{tag} {gpu.name}", f"0.0 / {_gib(room)} GiB", "-", "-", "(unused)"])
            continue
        b, pos = by_uuid[gpu.uuid]
        planned = sum(m.card_vram_bytes[pos] if m.card_vram_bytes else 0 for m in b.models)
        free = _gib(max(0, room - planned))
        kind = "" if str(b.kind) == "single" else f" ({b.kind})"
        rows.append(
            [
                f"{tag} {gpu.name}",
                f"{_gib(planned)} / {free} GiB",
                b.id + kind,
                str(b.port),
                ", ".join(b.model_names),
            ]
        )
    for b in the_plan.backends:
        if not b.gpu_uuids:
            rows.append(["CPU (host memory)", "-", f"{b.id} ({b.kind})", str(b.port), ", ".join(b.model_names)])
    return rows


def _model_rows(the_plan: Plan) -> list[list[str]]:
    rows = [["BACKEND", "PARALLEL", "MODEL", "NUM_CTX", "VRAM", "TOK/S", "WHY"]]
    for b in the_plan.backends:
        for n, m in enumerate(b.models):
            offload = f" ({m.num_gpu} layers)" if m.num_gpu >= 0 else ""
            if len(m.card_layers) > 1:
                offload += " (" + "+".join(str(n) for n in m.card_layers) + " layers)"
            rows.append(
                [
                    f"{b.id} :{b.port}" if n == 0 else "",
                    str(b.num_parallel) if n == 0 else "",
                    m.name,
                    str(m.num_ctx),
                    f"{_gib(m.vram_bytes)} GiB{offload}",
                    f"{m.expected_tokens_per_s:.0f}",
                    m.reason,
                ]
            )
    return rows


def print_plan(the_plan: Plan, rig: Rig, out: TextIO, *, usable: Mapping[str, int] | None = None) -> None:
    out.write(f"rig: {rig.message}\n")
    out.write(f"memory model: {rig.era_note}\n")
    if rig.era_warning:
        out.write(f"warning: {rig.era_warning}\n")
    out.write("\n")
    _table(_card_rows(the_plan, rig.gpus, usable or {}), out)
    if any(b.models for b in the_plan.backends):
        out.write("\n")
        _table(_model_rows(the_plan), out)
    if the_plan.warnings:
        out.write("\nwarnings:\n")
        for warning in the_plan.warnings:
            out.write(f"  - {warning}\n")
    if the_plan.rejections:
        out.write("\nwhy not elsewhere:\n")
        _table([[r.model, f"{r.candidate}:", r.reason] for r in the_plan.rejections], out)
    if the_plan.notes:
        out.write("\nsummary:\n")
        _table([[f"{name}:", note] for name, note in the_plan.notes.items()], out)
    if the_plan.errors:
        out.write(f"\n{len(the_plan.errors)} error(s): see stderr; `corral up` will not start this plan\n")
