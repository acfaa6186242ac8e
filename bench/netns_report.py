#!/usr/bin/env python3
"""Renders the namespace rig's RESULT lines (bench/netns) as Markdown tables on stdout.

usage: netns_report.py RAW_FILE

A measurement taken when the machine was more than MAX_BACKGROUND_PCT busy just before it
(another process at work: bench/netns waits up to --quiet-wait for quiet, then goes on and
records how busy it was) is left out of every median, and the report says how many.

Per subject and offered rate, the median over rounds of: whole-machine CPU µs per relayed
packet, the marginal µs over the routed baseline (each round against the routed step of
the same round and rate, then the median), the subject process's µs per packet and CPU %,
loss, what the generator really offered; then the fast path's ratios, each subject's
highest loss-free rate, and issue 15's targets. Standard library only.
"""

import statistics
import sys

SUBJECTS = ["routed", "floor", "coturn", "turnstone", "fastpath"]
NAMES = {
    "routed": "routed (kernel forwarding only)",
    "floor": "floor forwarder",
    "coturn": "coturn",
    "turnstone": "turnstone userspace",
    "fastpath": "turnstone fast path",
}
# A step is loss-free when fewer than this % of its packets were lost (0.01%: a few
# packets in tens of thousands, what one scheduler hiccup of the generator costs).
LOSS_FREE_PCT = 0.01
# A measurement preceded by more background load than this (% of the machine) is left out.
MAX_BACKGROUND_PCT = 10.0
# "Near zero": the server process's own CPU under load, % of one core.
NEAR_ZERO_PCT = 5.0


def parse(path):
    meta, loads, unavailable, failed = {}, [], {}, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("META "):
                k, _, v = line[5:].partition("=")
                meta[k] = v
                continue
            if not line.startswith("RESULT "):
                continue
            head, _, text = line.partition(" text=")
            parts = head.split()
            kind = parts[1]
            kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
            if kind == "load":
                loads.append(kv)
            elif kind == "unavailable":
                unavailable.setdefault(kv["subject"], text)
            elif kind == "failed":
                failed.append((kv.get("subject"), kv.get("rate"), text))
    return meta, loads, unavailable, failed


def num(kv, k):
    try:
        return float(kv[k])
    except (KeyError, ValueError):
        return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2, suffix=""):
    return "-" if x is None else f"{x:.{nd}f}{suffix}"


def main():
    meta, loads, unavailable, failed = parse(sys.argv[1])
    noisy = [kv for kv in loads if (num(kv, "background_busy_pct") or 0.0) > MAX_BACKGROUND_PCT]
    loads = [kv for kv in loads if kv not in noisy]
    rates = sorted({int(kv["rate"]) for kv in loads} | {int(r) for r in meta.get("rates", "").split(",") if r})
    by = {}
    for kv in loads:
        by.setdefault((kv["subject"], int(kv["rate"])), []).append(kv)
    routed = {(int(kv["rate"]), kv["round"]): num(kv, "machine_us_per_pkt")
              for kv in loads if kv["subject"] == "routed"}

    def stats(s, r):
        rows = by.get((s, r), [])
        if not rows:
            return None
        marg = []
        for kv in rows:
            base = routed.get((r, kv["round"]))
            m = num(kv, "machine_us_per_pkt")
            if base is not None and m is not None and s != "routed":
                marg.append(m - base)
        return {
            "n": len(rows),
            "machine": med(num(kv, "machine_us_per_pkt") for kv in rows),
            "marginal": med(marg) if s != "routed" else 0.0,
            "server": med(num(kv, "cpu_us_per_pkt") for kv in rows),
            "server_pct": med(num(kv, "server_cpu_pct") for kv in rows),
            "loss": med(num(kv, "loss_pct") for kv in rows),
            "achieved": med(num(kv, "achieved_offered_pps") for kv in rows),
            "relayed": med(num(kv, "relayed_pps") for kv in rows),
            "gen": med(num(kv, "gen_cpu_pct") for kv in rows),
            "busy": med(num(kv, "machine_busy_pct") for kv in rows),
            "bg": med(num(kv, "background_busy_pct") for kv in rows),
        }

    S = {(s, r): stats(s, r) for s in SUBJECTS for r in rates}
    out = []
    out.append("## Namespace rig (issue 15)\n")
    for k in ("date", "machine", "commit", "coturn", "repeat", "command"):
        if k in meta:
            out.append(f"- {k}: {meta[k]}")
    out.append(f"- medians of {meta.get('repeat', '?')} round(s); marginal = subject − routed, same round and rate")
    if noisy:
        which = ", ".join(f"{kv['subject']} {kv['rate']} round {kv['round']}" for kv in noisy)
        out.append(f"- left out: {len(noisy)} measurement(s) taken when the machine was more than "
                   f"{MAX_BACKGROUND_PCT:.0f}% busy just before (another process at work): {which}")
    out.append("- whole-machine CPU = wall × CPUs − idle − iowait (/proc/stat) over the measurement window, "
               "per relayed packet (client→peer and peer→client each count once)\n")
    out.append("| subject | offered pkt/s | achieved | relayed pkt/s | machine µs/pkt | marginal µs/pkt | "
               "server µs/pkt | server CPU % | loss % | machine busy % | idle-machine busy % | gen CPU % |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in SUBJECTS:
        if s in unavailable and not any(S[(s, r)] for r in rates):
            why = unavailable[s].replace("|", "/")
            out.append(f"| {NAMES[s]} | all | unavailable: {why} | - | - | - | - | - | - | - | - | - |")
            continue
        for r in rates:
            x = S[(s, r)]
            if x is None:
                continue
            out.append(
                f"| {NAMES[s]} | {r} | {fmt(x['achieved'], 0)} | {fmt(x['relayed'], 0)} | {fmt(x['machine'])} | "
                f"{'(baseline)' if s == 'routed' else fmt(x['marginal'])} | {fmt(x['server'])} | "
                f"{fmt(x['server_pct'], 1)} | {fmt(x['loss'], 3)} | {fmt(x['busy'], 1)} | {fmt(x['bg'], 1)} | "
                f"{fmt(x['gen'], 1)} |")
    for s, r, t in failed:
        out.append(f"\nFAILED: {s} at {r}: {t}")

    out.append("\n### Fast path ratios (marginal CPU per relayed packet)\n")
    out.append("| offered pkt/s | fast path / floor (target ≤ 0.25) | fast path / coturn (target ≤ 0.2) |")
    out.append("|---:|---:|---:|")

    def ratio(a, b):
        if not a or not b:
            return None
        am, bm = a.get("marginal"), b.get("marginal")
        if am is None or bm is None or bm <= 0:
            return None
        return am / bm

    ratios = {}
    for r in rates:
        fp, fl, co = S[("fastpath", r)], S[("floor", r)], S[("coturn", r)]
        ratios[r] = (ratio(fp, fl) if fp and fl else None, ratio(fp, co) if fp and co else None)
        if "fastpath" in unavailable and not fp:
            out.append(f"| {r} | unavailable | unavailable |")
        else:
            out.append(f"| {r} | {fmt(ratios[r][0])} | {fmt(ratios[r][1])} |")

    out.append(f"\n### Highest loss-free rate (median loss < {LOSS_FREE_PCT}%)\n")
    out.append("| subject | highest loss-free offered pkt/s | first lossy rate: what limited it |")
    out.append("|---|---:|---|")
    for s in SUBJECTS:
        if not any(S[(s, r)] for r in rates):
            out.append(f"| {NAMES[s]} | {'unavailable' if s in unavailable else 'not run'} | |")
            continue
        best, why = None, "no loss at any rate tried"
        for r in rates:
            x = S[(s, r)]
            if x is None or x["loss"] is None:
                continue
            if x["loss"] < LOSS_FREE_PCT:
                best = r
            else:
                gen_short = x["achieved"] is not None and x["achieved"] < 0.95 * r
                base = S[("routed", r)]
                rig_lossy = base is not None and base["loss"] is not None and base["loss"] >= LOSS_FREE_PCT
                if rig_lossy:
                    verdict = f"rig-bound: routing alone loses {base['loss']:.3f}% here"
                elif gen_short:
                    verdict = "the generator could not offer the rate: rig-bound"
                else:
                    verdict = "the generator kept pace: the subject's limit"
                why = (f"{r}: loss {x['loss']:.3f}%, generator offered {fmt(x['achieved'], 0)}; {verdict} "
                       f"(machine {fmt(x['busy'], 0)}% busy, generator {fmt(x['gen'], 0)}% of a core)")
                break
        out.append(f"| {NAMES[s]} | {best if best is not None else 'none'} | {why} |")

    out.append("\n### Issue 15 targets, this run\n")
    if "fastpath" in unavailable and not any(S[("fastpath", r)] for r in rates):
        out.append(f"- fast path unavailable: {unavailable['fastpath']}: no target can be checked.")
    else:
        for r in rates:
            a, b = ratios[r]
            out.append(f"- {r} pkt/s: fast path / floor marginal {fmt(a)} "
                       f"({'met' if a is not None and a <= 0.25 else 'NOT met'}), "
                       f"fast path / coturn marginal {fmt(b)} ({'met' if b is not None and b <= 0.2 else 'NOT met'})")
        bad = [r for r in rates if S[("floor", r)] and S[("fastpath", r)]
               and S[("floor", r)]["loss"] is not None and S[("floor", r)]["loss"] < LOSS_FREE_PCT
               and (S[("fastpath", r)]["loss"] is None or S[("fastpath", r)]["loss"] >= LOSS_FREE_PCT)]
        out.append(f"- loss-free wherever the floor is: {'met' if not bad else 'NOT met at ' + ', '.join(map(str, bad))}")
        pcts = [S[("fastpath", r)]["server_pct"] for r in rates if S[("fastpath", r)]]
        mx = max((p for p in pcts if p is not None), default=None)
        out.append(f"- server process CPU under load: at most {fmt(mx, 1)}% of a core "
                   f"({'near zero' if mx is not None and mx < NEAR_ZERO_PCT else 'NOT near zero'}, threshold {NEAR_ZERO_PCT}%)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
