#!/usr/bin/env python3
"""Paired ratios of CPU per request between targets of one ../shared/bench
suite: for each scenario and pair A/B, the median over rounds of
(A's proxy_cpu_us_req / B's in the same round), the ratio of the medians,
and the same for proxy/upstream CPU (which cancels host-wide slowdowns).

    pair_ratio.py RESULTS/runs.jsonl SUITE mesh-res/mesh-bare envoy-res/envoy-bare ...
"""

import json
import statistics
import sys


def main() -> None:
    path, suite, *pairs = sys.argv[1:]
    runs = [r for r in map(json.loads, open(path)) if r["suite"] == suite and r["status"] == "ok"]
    cell = {(r["mode"], r["body"], r["target"], r["round"]): r for r in runs}
    scenarios = sorted({(r["mode"], r["body"]) for r in runs})
    print("| scenario | pair | rounds | median of per-round CPU ratios | ratio of median CPU µs/req "
          "| median of per-round proxy/upstream ratios |")
    print("|---|---|---|---|---|---|")
    for mode, body in scenarios:
        for pair in pairs:
            a, b = pair.split("/")
            rounds = sorted({k[3] for k in cell if k[:3] == (mode, body, a)}
                            & {k[3] for k in cell if k[:3] == (mode, body, b)})
            if not rounds:
                continue
            ra = [cell[(mode, body, a, n)] for n in rounds]
            rb = [cell[(mode, body, b, n)] for n in rounds]
            per_round = statistics.median(x["proxy_cpu_us_req"] / y["proxy_cpu_us_req"] for x, y in zip(ra, rb))
            of_medians = (statistics.median(x["proxy_cpu_us_req"] for x in ra)
                          / statistics.median(y["proxy_cpu_us_req"] for y in rb))
            rel = statistics.median((x["proxy_cpu_us_req"] / x["upstream_cpu_us_req"])
                                    / (y["proxy_cpu_us_req"] / y["upstream_cpu_us_req"]) for x, y in zip(ra, rb))
            print(f"| {mode} {body} | {a} / {b} | {len(rounds)} | {per_round:.3f} | {of_medians:.3f} | {rel:.3f} |")


if __name__ == "__main__":
    main()
