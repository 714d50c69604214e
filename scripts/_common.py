"""Shared plumbing of the verification and benchmark scripts: report tables, JSON output, failures, statistics.

Every script prints readable tables on stdout, writes the same content as JSON with `--output`, and exits 1 with
the fix when a check fails (`ScriptFailure` carries the message and the fix). Heavy imports (torch, transformers)
stay inside functions so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # scripts run as `python scripts/x.py` import the backend package
    sys.path.insert(0, str(REPO_ROOT))


class ScriptFailure(Exception):
    """A check failed: `message` says what, `fix` says what the user should change."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass
class Report:
    """Tables and checks of one script run; printed as they come, written as JSON at the end."""

    script: str
    args: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Store `rows` under `name` and print them as an aligned table."""
        self.tables[name] = rows
        print(format_table(name, rows), flush=True)

    def check(self, name: str, ok: bool, detail: str, fix: str = "") -> bool:
        """Record a pass/fail line (printed at once). Failed checks make the script exit 1."""
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail, **({"fix": fix} if fix else {})})
        mark = "PASS" if ok else "FAIL"
        print(f"[{mark}] {name}: {detail}" + (f"\n       fix: {fix}" if fix and not ok else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["ok"]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "script": self.script,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.time() - self.started, 2),
            "args": self.args,
            "environment": environment(),
            "info": self.info,
            "tables": self.tables,
            "checks": self.checks,
            "ok": not self.failed,
        }

    def write(self, output: str | None) -> None:
        if output:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.as_dict(), indent=2, default=_json_default))
            print(f"report written to {path}", flush=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table: the union of the rows' keys as columns, numbers rounded for reading."""
    if not rows:
        return f"\n== {title} ==\n(no rows)\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [f"\n== {title} ==", "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def environment() -> dict[str, Any]:
    """Versions and GPU of this run (imports torch/transformers only if already imported)."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for name in ("transformers", "sentence_transformers", "tokenizers"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    return env


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """p50/p95/... of `values` (same unit), nearest-rank on the sorted values; NaN when empty."""
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    ordered = sorted(values)
    out = {}
    for q in qs:
        rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
        out[f"p{q}"] = ordered[rank]
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares (--output, --device)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="write the JSON report to this file")
    return parser


def run_script(name: str, main: Callable[[argparse.Namespace, Report], None], parser: argparse.ArgumentParser,
               argv: list[str] | None = None) -> int:
    """Parse args, run `main(args, report)`, write the report; 1 (with the fix printed) on any failure."""
    args = parser.parse_args(argv)
    # The providers log their decisions (token budget, memory, kernels) at INFO: part of every report's log.
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = Report(script=name, args=dict(vars(args)))
    code = 0
    try:
        main(args, report)
    except ScriptFailure as exc:
        report.checks.append({"check": "script", "ok": False, "detail": exc.message, "fix": exc.fix})
        print(f"\nFAILED: {exc.message}" + (f"\nfix: {exc.fix}" if exc.fix else ""), file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:  # the report is still written, with the error, and the script exits 1
        traceback.print_exc()
        fix = getattr(exc, "fix", "") or "see the message above; rerun with the same arguments after fixing it"
        report.checks.append({"check": "script", "ok": False, "detail": f"{type(exc).__name__}: {exc}", "fix": fix})
        print(f"\nFAILED: {type(exc).__name__}: {exc}\nfix: {fix}", file=sys.stderr, flush=True)
        code = 1
    if code == 0 and report.failed:
        print(f"\nFAILED: {len(report.failed)} check(s) failed: " + ", ".join(c["check"] for c in report.failed),
              file=sys.stderr, flush=True)
        code = 1
    report.write(args.output)
    return code
