"""Turn pytest-benchmark JSON into a markdown table: time, GB/s, speed-up vs baselines.

Usage: python bench/report.py RESULTS.json [--out TABLE.md]
Speed-ups compare medians measured in the same run (>1: fastema faster).
"""
import argparse
import json
import platform
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)            # (group, case) -> impl -> stats
    order = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        key = (b["group"], info["case"])
        if key not in rows:
            order.append(key)
        rows[key][info["impl"]] = dict(median=b["stats"]["median"], min=b["stats"]["min"],
                                       bytes=info.get("bytes") or 0)
    return data, rows, order


def fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def table(data, rows, order):
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')[:19]}",
             "", "| scenario | case | implementation | median | GB/s | fastema speed-up |",
             "|---|---|---|---|---|---|"]
    for group, case in order:
        impls = rows[(group, case)]
        ours = impls.get("fastema")
        for impl, st in impls.items():
            gbs = f"{st['bytes'] / st['median'] / 1e9:.1f}" if st["bytes"] else "-"
            speed = "" if impl == "fastema" or ours is None else f"{st['median'] / ours['median']:.2f}x"
            lines.append(f"| {group} | {case} | {impl} | {fmt_time(st['median'])} | {gbs} | {speed} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out")
    args = ap.parse_args()
    text = table(*load(args.json))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
