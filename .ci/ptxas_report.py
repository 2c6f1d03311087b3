#!/usr/bin/env python3
"""Reads nvcc -Xptxas -v output on stdin; prints one line per kernel and architecture (registers,
spill stores/loads, stack frame, shared memory) and, with --fail-on-spills, exits 1 when a float32
kernel spills."""
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$")


def parse(text):
    kernels, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_stores": 0,
                       "spill_loads": 0}
            kernels.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif current is not None and (m := USED.search(line)):
            current.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
            current = None
    names = subprocess.run(["c++filt"], input="\n".join(k["mangled"] for k in kernels),
                           capture_output=True, text=True).stdout.splitlines()
    for kernel, name in zip(kernels, names):
        name = re.sub(r"lstm_fused::cuda::(\(anonymous namespace\)::)?", "", name)
        name = re.sub(r"\(BackwardMode\)0", "kFused", name)
        name = re.sub(r"\(BackwardMode\)1", "kHiddenGrad", name)
        name = re.sub(r"\(BackwardMode\)2", "kGates", name)
        kernel["name"] = name.split("(")[0]
    return kernels


def main():
    kernels = parse(sys.stdin.read())
    for k in sorted(kernels, key=lambda k: (k["arch"], k["name"])):
        print(f"{k['arch']} {k.get('registers', 0):4d} regs {k['spill_stores']:4d}/"
              f"{k['spill_loads']:<4d} B spilled {k['stack']:4d} B stack {k.get('smem', 0):6d} B smem"
              f"  {k['name']}")
    spilling = [k for k in kernels if (k["spill_stores"] or k["spill_loads"])
                and re.search(r"\bfloat\b", k["name"])]
    print(f"ptxas_report: {len(kernels)} kernels, {sum(1 for k in kernels if k['spill_stores'])}"
          f" spill, {len(spilling)} of them float32")
    if "--fail-on-spills" in sys.argv and spilling:
        sys.exit(1)


if __name__ == "__main__":
    main()
