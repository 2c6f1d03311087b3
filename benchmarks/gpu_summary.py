#!/usr/bin/env python3
"""Writes OUT_DIR/summary.json from what benchmarks/gpu_check.sh left in OUT_DIR, prints it, and
exits 1 if a step failed.

Reads: steps.tsv (step, exit status, seconds), test_cuda.xml (pytest's JUnit XML),
benchmark/results.json (bench_lstm.py --out), memcheck.log and racecheck.log (compute-sanitizer).
Every part that is missing is reported as missing, not guessed.
"""
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional

BASELINES = {"nn.LSTM": "nn_lstm", "nn.LSTM+graph": "nn_lstm_graph"}


def read_steps(out: Path) -> Dict[str, dict]:
    steps = {}
    path = out / "steps.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps[name] = {"status": int(status) if status.lstrip("-").isdigit() else status,
                           "seconds": int(seconds)}
    return steps


def read_tests(path: Path) -> Optional[dict]:
    """Counts and failing names from pytest's JUnit XML."""
    if not path.is_file():
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failing: List[str] = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        if case.find("failure") is not None:
            counts["failed"] += 1
            failing.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failing.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts, failing=failing)


def read_benchmark(path: Path) -> Optional[List[dict]]:
    """Per goal row: the median times and lstm_fused's speed-up against nn.LSTM and
    nn.LSTM+graph (> 1: lstm_fused is faster), and the time per step."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    rows = []
    for result in doc.get("results", []):
        providers = result["providers"]
        ours = providers.get("lstm_fused", {})
        row = {"shape": [result["B"], result["T"], result["I"], result["H"]],
               "mode": result["mode"], "dtype": result["dtype"],
               "lstm_fused_ms": ours.get("median_ms"),
               "lstm_fused_status": ours.get("status"),
               "lstm_fused_reason": ours.get("reason")}
        for name, key in BASELINES.items():
            theirs = providers.get(name, {})
            row[f"{key}_ms"] = theirs.get("median_ms")
            row[f"speedup_vs_{key}"] = (theirs["median_ms"] / ours["median_ms"]
                                        if theirs.get("median_ms") and ours.get("median_ms")
                                        else None)
        row["lstm_fused_us_per_step"] = (1000 * ours["median_ms"] / result["T"]
                                         if ours.get("median_ms") else None)
        rows.append(row)
    return rows


def read_sanitizer(path: Path, step: Optional[dict]) -> dict:
    """compute-sanitizer's verdict: its ERROR SUMMARY line, or why there is none."""
    if step is None or step["status"] == "absent" or not path.is_file():
        reason = path.read_text().strip() if path.is_file() else "not run"
        return {"ran": False, "reason": reason or "not run"}
    text = path.read_text()
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
    errors = int(summary.group(1)) if summary else None
    if errors is None and hazards:  # racecheck: "N hazards displayed (E errors, W warnings)"
        counted = re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)
        errors = int(counted.group(1)) if counted else None
    return {"ran": True, "exit_status": step["status"], "errors": errors,
            "hazards": int(hazards.group(1)) if hazards else None,
            "clean": step["status"] == 0 and errors == 0}


def summarize(out: Path) -> dict:
    steps = read_steps(out)
    summary = {
        "steps": steps,
        "tests": read_tests(out / "test_cuda.xml"),
        "benchmark": read_benchmark(out / "benchmark" / "results.json"),
        "memcheck": read_sanitizer(out / "memcheck.log", steps.get("memcheck")),
        "racecheck": read_sanitizer(out / "racecheck.log", steps.get("racecheck")),
    }
    results = out / "benchmark" / "results.json"
    if results.is_file():
        machine = json.loads(results.read_text()).get("machine", {})
        summary["machine"] = {key: machine.get(key) for key in
                              ("gpu", "torch", "cuda", "cudnn", "cudnn_allow_tf32",
                               "matmul_allow_tf32", "cpu", "cpu_count")}
    failed = [name for name, step in steps.items()
              if isinstance(step["status"], int) and step["status"] != 0]
    summary["failed_steps"] = failed
    summary["ok"] = bool(steps) and not failed and summary["tests"] is not None and \
        summary["tests"]["failed"] == 0 and summary["tests"]["errors"] == 0
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    summary = summarize(out)
    text = json.dumps(summary, indent=1)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
