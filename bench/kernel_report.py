"""The kernel benchmarks' shared harness: run modes (GPU, or the CPU dry run under Triton's
interpreter), result rows, the report (printed, and rewritten as JSON after every row), timing,
the correctness check each pair passes before it is timed, and the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

# Nominal HBM GB/s and dense bf16 TFLOP/s by device-name substring (first match wins).
NOMINAL = (("H200", 4800.0, 989.0), ("H100", 3350.0, 989.0), ("MI300X", 5300.0, 1307.0),
           ("MI325X", 6000.0, 1307.0), ("A100", 2039.0, 312.0))
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Mode:
    dry_run: bool

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.dry_run else torch.bfloat16


@dataclass
class Row:
    op: str
    label: str
    batch: int  # tokens (MoE), sequences (attention, CCA), blocks (quantize)
    triton_ms: float = math.nan
    torch_ms: float = math.nan
    max_abs_err: float = math.nan
    tol: float = 0.0
    ok: bool = False
    nbytes: int = 0  # bytes the op must move at least once; 0: not computed
    flops: int = 0  # 0: not computed
    error: str | None = None

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.triton_ms


@dataclass
class Report:
    mode: Mode
    peak_gbs: float
    peak_tflops: float
    measured_gbs: float = math.nan
    json_path: str | None = None  # rewritten after every row: a killed run keeps its results
    rows: list[Row] = field(default_factory=list)

    def fractions(self, row: Row) -> dict[str, float]:
        gbs = row.nbytes / row.triton_ms / 1e6 if row.nbytes else math.nan
        return {"gbs": gbs, "hbm_frac": gbs / self.peak_gbs,
                "hbm_frac_measured": gbs / self.measured_gbs,
                "flops_frac": row.flops / row.triton_ms / 1e9 / self.peak_tflops
                if row.flops else math.nan}

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        f = self.fractions(row)
        line = (f"{row.op:<16}{row.label:<30}triton {row.triton_ms:8.4f} ms  torch "
                f"{row.torch_ms:8.4f} ms  x{row.speedup:6.2f}")
        if row.nbytes:
            line += f"  HBM {f['hbm_frac']:6.1%} (of measured {f['hbm_frac_measured']:6.1%})"
        if row.flops:
            line += f"  FLOP/s {f['flops_frac']:6.1%}"
        line += f"  err {row.max_abs_err:.2e} " + ("ok" if row.ok else "MISMATCH")
        print(line + (f"  [{row.error}]" if row.error else ""), flush=True)
        self.write(complete=False)
        return row

    def targets(self) -> list[dict[str, Any]]:
        moe = [r for r in self.rows if r.op == "fused_moe" and r.batch >= 64 and r.ok]
        decode = [r for r in self.rows if r.op == "paged_attention"
                  and r.label.startswith("decode") and r.ok]
        out: list[dict[str, Any]] = []
        if moe:
            worst = min(moe, key=lambda r: r.speedup)
            out.append({"target": "fused_moe >= 2x torch at >= 64 tokens",
                        "met": all(r.speedup >= 2 for r in moe), "value": worst.speedup,
                        "shown": f"worst x{worst.speedup:.2f} at {worst.label}"})
        if decode:
            big = max(decode, key=lambda r: r.nbytes)
            frac = self.fractions(big)["hbm_frac_measured"]
            n = sum(self.fractions(r)["hbm_frac_measured"] >= 0.6 for r in decode)
            out.append({"target": "decode attention >= 60% of measured HBM bandwidth",
                        "met": frac >= 0.6, "value": frac,
                        "shown": f"{frac:.1%} at {big.label}, the most bytes read; "
                                 f"{n}/{len(decode)} decode cases reach 60%"})
        return out

    def write(self, complete: bool) -> None:
        if not self.json_path:
            return
        bad = any(not r.ok for r in self.rows)
        doc = {"dry_run": self.mode.dry_run, "device": device_name(self.mode),
               "dtype": str(self.mode.dtype), "peak_gbs": self.peak_gbs,
               "peak_tflops": self.peak_tflops, "measured_gbs": self.measured_gbs,
               "results": [{**asdict(r), "speedup": r.speedup, **self.fractions(r)}
                           for r in self.rows],
               "targets": self.targets(), "complete": complete,
               "ok": complete and not bad and bool(self.rows)}
        with open(self.json_path + ".tmp", "w") as fh:
            json.dump(_finite(doc), fh, indent=1)
        os.replace(self.json_path + ".tmp", self.json_path)  # never a half-written file

    def finish(self) -> int:
        """Prints the targets and the verdict, writes the JSON; the exit status (1: mismatch)."""
        targets = self.targets()
        note = " (dry run: interpreter timings, not meaningful)" if self.mode.dry_run else ""
        for t in targets:
            print(f"target {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['shown']}){note}")
        bad = [f"{r.op} {r.label}" for r in self.rows if not r.ok]
        print(f"{len(self.rows) - len(bad)}/{len(self.rows)} pairs match"
              + (f"; MISMATCH: {', '.join(bad)}" if bad else ""))
        self.write(complete=True)
        return 1 if bad or not self.rows else 0


def _finite(x: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def device_name(mode: Mode) -> str:
    return "cpu (Triton interpreter)" if mode.dry_run else torch.cuda.get_device_name()


def time_ms(fn: Callable[[], object], mode: Mode, reps: int = 2) -> float:
    """Median milliseconds per call: do_bench on a GPU, a perf_counter loop in a dry run (no
    warm-up there: the check has already run `fn` once, and the interpreter is slow)."""
    if not mode.dry_run:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(got: Any, want: Any, tol: float) -> tuple[float, bool]:
    """(max |got - want|, allclose at atol = rtol = tol) over tensors or tuples of them."""
    pairs = list(zip(got, want, strict=True)) if isinstance(got, tuple) else [(got, want)]
    err, ok = 0.0, True
    for g, w in pairs:
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        g, w = g.float(), w.float()
        err = max(err, float((g - w).abs().max()) if g.numel() else 0.0)
        ok = ok and bool(torch.allclose(g, w, atol=tol, rtol=tol))
    return err, ok


def run_pair(report: Report, row: Row, triton_fn: Callable[[], object],
             torch_fn: Callable[[], object],
             check: Callable[[], tuple[float, bool]] | None = None) -> Row:
    """Checks (default: both outputs `compare`d at `row.tol`), then times both sides; an
    exception is recorded as a failed row."""
    try:
        row.max_abs_err, row.ok = (check or (lambda: compare(triton_fn(), torch_fn(), row.tol)))()
        row.triton_ms = time_ms(triton_fn, report.mode)
        row.torch_ms = time_ms(torch_fn, report.mode)
    except Exception as exc:  # report and go on: one broken kernel must not hide the rest
        row.ok, row.error = False, f"{type(exc).__name__}: {exc}"[:300]
    return report.add(row)


def measure_copy_gbs(mode: Mode) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s: median of 20 copies of 1 GiB
    (16 MiB on the CPU in a dry run, where only the code path matters)."""
    nbytes = (16 << 20) if mode.dry_run else (1 << 30)
    src = torch.ones(nbytes, dtype=torch.uint8, device=mode.device)
    dst = src.clone()
    if mode.dry_run:
        return 2 * nbytes / time_ms(partial(dst.copy_, src), mode, reps=20) / 1e6
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e6


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, toy shapes, fp32, Triton interpreter: checks the harness")
    ap.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    ap.add_argument("--peak-gbs", type=float, help="nominal HBM GB/s (default: by device name)")
    ap.add_argument("--peak-tflops", type=float, help="nominal dense bf16 TFLOP/s")


def start(args: argparse.Namespace, module: str,
          argv: Sequence[str] | None) -> Report | int:
    """A Report for this run, or the exit status of a rerun of `module` in a child process
    whose TRITON_INTERPRET fits the mode (it must be set before triton is first imported)."""
    mode = Mode(args.dry_run)
    if (os.environ.get("TRITON_INTERPRET") == "1") != mode.dry_run:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if mode.dry_run:
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env, check=False).returncode
    if not mode.dry_run and not torch.cuda.is_available():
        print(f"{module} needs a CUDA or ROCm GPU; use --dry-run on the CPU", file=sys.stderr)
        return 2
    name = device_name(mode)
    gbs, tflops = next(((g, t) for key, g, t in NOMINAL if key in name), (3350.0, 989.0))
    report = Report(mode, args.peak_gbs or gbs, args.peak_tflops or tflops,
                    measure_copy_gbs(mode), args.json)
    print(f"device: {name}  dtype {mode.dtype}  nominal {report.peak_gbs:.0f} GB/s, "
          f"{report.peak_tflops:.0f} TFLOP/s  measured copy {report.measured_gbs:.0f} GB/s")
    report.write(complete=False)
    return report
