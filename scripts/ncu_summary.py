#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (`ncu --csv --page raw --metrics gpu__time_duration.sum`)
by kernel: launches, total microseconds and share, the heaviest first, then by class.

Usage: python3 scripts/ncu_summary.py ncu.csv [top]
"""
import csv
import re
import sys
from collections import defaultdict

# Kernel classes, matched in order against the kernel's name (lower case).
CLASSES = [
    ("matmul", ("matmul", "gemm", "mma", "tile")),
    ("attention", ("attention", "band_", "flash")),
    ("soft top-k", ("coor_descent", "forward_kernel", "backward_kernel", "converged", "clear_words")),
    ("top-k selection", ("top_k", "radix", "histogram")),
    ("reduction", ("reduce", "sum", "mean", "max", "argmax")),
    ("gather / scatter / copy", ("select", "gather", "scatter", "slice", "copy", "cat", "into_contiguous", "index")),
]


def kernel_class(name):
    lower = name.lower()
    for cls, keys in CLASSES:
        if any(k in lower for k in keys):
            return cls
    return "elementwise / other"


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    time_key = next(k for k in rows[0] if k.startswith("gpu__time_duration"))
    totals = defaultdict(lambda: [0, 0.0])
    for row in rows:
        try:
            value = float(row[time_key].replace(",", ""))
        except ValueError:
            continue  # the units row
        # Units are ns by default (ncu's raw page); keep names short.
        name = re.sub(r"\s+", " ", row["Kernel Name"])[:110]
        totals[name][0] += 1
        totals[name][1] += value / 1e3
    grand = sum(t for _, t in totals.values())
    launches = sum(c for c, _ in totals.values())
    print(f"{launches} launches, {grand / 1e3:.3f} ms of kernel time")
    print("| kernel | launches | µs | share |")
    print("|---|---|---|---|")
    for name, (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| `{name}` | {count} | {us:.0f} | {100 * us / grand:.1f} % |")
    classes = defaultdict(lambda: [0, 0.0])
    for name, (count, us) in totals.items():
        c = classes[kernel_class(name)]
        c[0] += count
        c[1] += us
    print()
    print("| class | launches | ms | share |")
    print("|---|---|---|---|")
    for cls, (count, us) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
        print(f"| {cls} | {count} | {us / 1e3:.3f} | {100 * us / grand:.1f} % |")


if __name__ == "__main__":
    main()
