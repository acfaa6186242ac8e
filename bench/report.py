#!/usr/bin/env python3
"""Helpers for bench/run (standard library only).

  report.py uclient FILE        parse turnutils_uclient output -> key=value line
  report.py render RAW OUTDIR   RAW (RESULT lines + META lines) -> OUTDIR/latest.md,
                                OUTDIR/latest.svg, the table on stdout, and the
                                "latest results" section of bench/README.md refreshed
"""
import math
import os
import re
import statistics
import sys

# ---------------------------------------------------------------- uclient parsing

LINE = re.compile(r"^(\d+): .*start_mclient: msz=\d+, tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
FINAL = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
LOST = re.compile(r"Total lost packets (\d+) \(([\d.]+)%\)")


def parse_uclient(path):
    """Counters of one uclient run.

    rate_pps: relayed packets/s at full load = 2 x the mean of the once-a-second
    tot_recv_msgs increments that reach at least 90% of the largest increment (uclient
    starts its clients 1-6 s apart, so the first and last seconds are ramps).
    """
    samples = []
    sent = recv = None
    lost_pct = None
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if m:
                samples.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
                continue
            m = FINAL.search(line)
            if m:
                sent, recv = int(m.group(1)), int(m.group(2))
                continue
            m = LOST.search(line)
            if m:
                lost_pct = float(m.group(2))
    if sent is None and samples:
        sent, recv = samples[-1][1], samples[-1][2]
    deltas = []
    for (t0, _, r0), (t1, _, r1) in zip(samples, samples[1:]):
        if t1 > t0:
            deltas.append((r1 - r0) / (t1 - t0))
    rate = 0.0
    if deltas and max(deltas) > 0:
        top = max(deltas)
        rate = 2 * statistics.mean([d for d in deltas if d >= 0.9 * top])
    out = {
        "sent": sent if sent is not None else 0,
        "recv": recv if recv is not None else 0,
        "rate_pps": round(rate),
        "peak_pps": round(2 * max(deltas)) if deltas else 0,
    }
    out["complete"] = 1 if sent is not None and lost_pct is not None else 0
    if lost_pct is None:
        lost_pct = 100.0 * (out["sent"] - out["recv"]) / out["sent"] if out["sent"] else 100.0
    out["loss_pct"] = lost_pct
    return out


# ---------------------------------------------------------------- raw file

def read_raw(path):
    results, meta = [], {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("META "):
                k, _, v = line[5:].partition("=")
                meta[k] = v
            elif line.startswith("RESULT "):
                parts = line.split()
                d = {"tool": parts[1]}
                for p in parts[2:]:
                    k, _, v = p.partition("=")
                    d[k] = v
                results.append(d)
    return results, meta


def num(x, default=None):
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}x"


def find(results, tool, **kw):
    """The matching result; when a step ran several times (--repeat), one result whose
    every numeric field is the median of the runs', with "runs" (how many) and
    "all_<field>" (each run's value, in run order)."""
    return median_of([r for r in results if r["tool"] == tool and all(r.get(k) == v for k, v in kw.items())])


def median_of(rows):
    """None for no rows, the row itself for one, else the medians (see find)."""
    if not rows:
        return None
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    out["runs"] = str(len(rows))
    for k in rows[0]:
        vals = [num(r.get(k)) for r in rows]
        if all(v is not None for v in vals):
            med = statistics.median(vals)
            out[k] = f"{med:g}" if k.endswith("_us") else f"{med:.6g}"
            out["all_" + k] = vals
    return out


def runs_note(label, c, t, field, digits=2, ratios=True):
    """A line listing each run's value of `field` for coturn and turnstone (and the
    per-round ratios) when the step ran more than once; None otherwise."""
    if not c or not t or "all_" + field not in c or "all_" + field not in t:
        return None
    cs, ts = c["all_" + field], t["all_" + field]
    line = (f"- {label}: median of {len(ts)} runs (servers alternating). coturn "
            + ", ".join(fmt(v, digits) for v in cs) + "; turnstone "
            + ", ".join(fmt(v, digits) for v in ts))
    if ratios:
        line += "; ratio per round " + ", ".join(f"{b / a:.2f}x" if a else "-" for a, b in zip(cs, ts))
    return line + "."


def drop_pct(r, role):
    """Datagrams dropped at `role`'s sockets as % of those uclient sent; None if unknown."""
    d, sent = num(r.get("drops_" + role)), num(r.get("sent"))
    return 100.0 * d / sent if d is not None and sent else None


def drops_cell(r):
    vals = [drop_pct(r, role) for role in ("server", "peer", "uclient")]
    return " / ".join(fmt(v, 3) for v in vals) if any(v is not None for v in vals) else "-"


def lg_find(rows, server, rate, mode):
    """The loadgen row (medians when it ran more than once) of `server` at `rate` in
    `mode` (channel, send or floor)."""
    return median_of([r for r in rows if r.get("server") == server and r.get("mode") == mode
                      and int(num(r.get("offered_pps"), 0)) == rate])


# ---------------------------------------------------------------- markdown

def render_md(results, meta):
    out = []
    w = out.append
    w("# turnstone vs coturn: benchmark results")
    w("")
    w(f"- date: {meta.get('date', '?')}")
    w(f"- machine: {meta.get('machine', '?')}")
    w(f"- turnstone commit: {meta.get('commit', '?')}")
    w(f"- turnstone binary: {meta.get('turnstone_binary', '?')}")
    w(f"- coturn: {meta.get('coturn', '?')}")
    w(f"- mode: {meta.get('mode', 'full')}; command: `{meta.get('command', 'bash bench/run')}`")
    w("- client, peer and server share this machine's cores; compare within one run, "
      "runs vary by ±10-15%.")
    w("")

    # uclient table
    w("## turnutils_uclient loads (payload 170 B, `-c -X -g`)")
    w("")
    w(f"`turnutils_uclient -u bench -w bench -e 127.0.0.1 -r 3680 -l 170 -c -X -g <load> -p 3678 127.0.0.1` "
      "against `turnutils_peer -L 127.0.0.1 -p 3680`; each server freshly started for each row.")
    w("pkt/s: relayed packets/s at full load; loss: uclient's lost %; µs/pkt: server CPU "
      "(utime+stime) over the whole uclient run / (2 × round trips completed).")
    w("")
    w("| load | coturn pkt/s | coturn loss % | coturn µs/pkt | turnstone pkt/s | turnstone loss % | turnstone µs/pkt | pkt/s ratio | µs/pkt ratio |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    loads = []
    for r in results:
        if r["tool"] == "uclient" and r.get("load") not in loads:
            loads.append(r.get("load"))
    for load in loads:
        c = find(results, "uclient", load=load, server="coturn") or {}
        t = find(results, "uclient", load=load, server="turnstone") or {}
        cr, tr = num(c.get("rate_pps")), num(t.get("rate_pps"))
        cc, tc = num(c.get("cpu_us_per_pkt")), num(t.get("cpu_us_per_pkt"))
        w(f"| `{load.replace('_', ' ')}` | {fmt(cr)} | {fmt(num(c.get('loss_pct')), 3)} | {fmt(cc)} "
          f"| {fmt(tr)} | {fmt(num(t.get('loss_pct')), 3)} | {fmt(tc)} | {ratio(tr, cr)} | {ratio(tc, cc)} |")
    w("")
    spread = [r for r in results if r["tool"] == "uclient" and r.get("stream_conns_per_worker")]
    if spread:
        w("turnstone's TCP/TLS client connections per worker 9 s into each stream row "
          "(`turnstone_worker_stream_connections`, worker 0 / 1 / ...): "
          + "; ".join(f"`{r['load'].replace('_', ' ')}` {r['stream_conns_per_worker']}" for r in spread) + ".")
        w("")
    if any("drops_server" in r for r in results if r["tool"] == "uclient"):
        w("Where the lost datagrams were dropped, % of datagrams sent: the kernel's per-socket "
          "drop counters (`/proc/net/udp`, a datagram arriving at a full receive buffer) of the "
          "server's sockets, `turnutils_peer`'s and uclient's, sampled every 0.5 s "
          "(`bench/udpdrops.py`); what no socket counted is in none of them.")
        w("")
        w("| load | coturn: server / peer / uclient | turnstone: server / peer / uclient |")
        w("|---|---:|---:|")
        for load in loads:
            c = find(results, "uclient", load=load, server="coturn") or {}
            t = find(results, "uclient", load=load, server="turnstone") or {}
            w(f"| `{load.replace('_', ' ')}` | {drops_cell(c)} | {drops_cell(t)} |")
        w("")
    for load in loads:
        c = find(results, "uclient", load=load, server="coturn")
        t = find(results, "uclient", load=load, server="turnstone")
        note = runs_note(f"`{load.replace('_', ' ')}` µs/pkt", c, t, "cpu_us_per_pkt")
        if note:
            w(note)
            w(runs_note(f"`{load.replace('_', ' ')}` loss %", c, t, "loss_pct", 3, ratios=False))
            w("")

    # TLS handshakes
    if any(r["tool"] == "handshake" for r in results):
        w("## TLS full handshakes (`openssl s_time -connect 127.0.0.1:3679 -new`, two clients at once)")
        w("")
        w("Each connection is a full handshake (no session reuse), ECDSA P-256 certificate; "
          "µs/handshake: server CPU (utime+stime) over the run / handshakes completed.")
        w("")
        w("| version | coturn /s | coturn µs/handshake | turnstone /s | turnstone µs/handshake | rate ratio | µs ratio |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        for v in ("tls1_3", "tls1_2"):
            c = find(results, "handshake", version=v, server="coturn") or {}
            t = find(results, "handshake", version=v, server="turnstone") or {}
            cr, tr = num(c.get("per_s")), num(t.get("per_s"))
            cc, tc = num(c.get("cpu_us_per_handshake")), num(t.get("cpu_us_per_handshake"))
            if c.get("refused") == "1":
                cr = None
            w(f"| {v.replace('tls1_', 'TLS 1.')} | {'refused' if c.get('refused') == '1' else fmt(cr)} | {fmt(cc, 1)} "
              f"| {'refused' if t.get('refused') == '1' else fmt(tr)} | {fmt(tc, 1)} "
              f"| {ratio(tr, cr)} | {ratio(tc, cc)} |")
        w("")

    # loadgen table
    w("## Paced load generator (`loadgen load`, 50 allocations, ChannelData unless noted)")
    w("")
    w("offered: relayed packets/s asked for (half sent by the generator, half echoed back); "
      "achieved: what the generator really offered; pkt/s: relayed packets/s that completed "
      "the round trip; µs/pkt: server CPU during the measurement phase / relayed packets; "
      "floor: the minimal one-packet-per-syscall UDP forwarder (`loadgen floor`).")
    w("")
    w("| offered pkt/s | target | achieved | pkt/s | loss % | server CPU % | µs/pkt | vs floor | vs coturn | RTT p50 / p99 µs |")
    w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = [r for r in results if r["tool"] == "load"]
    keys = []
    for r in rows:
        k = (int(num(r.get("offered_pps"), 0)), r.get("mode"))
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (k[1] != "channel", k[0]))
    repeated = []
    for rate, mode in keys:
        fl = lg_find(rows, "floor", rate, "floor")
        co = lg_find(rows, "coturn", rate, mode)
        for server in ("floor", "coturn", "turnstone"):
            r = lg_find(rows, server, rate, "floor" if server == "floor" else mode)
            if r is None:
                continue
            if "runs" in r and server == "turnstone":
                repeated.append((rate, mode, fl, co, r))
            name = server if mode == "channel" or server == "floor" else f"{server} ({mode} ind.)"
            if server == "floor" and mode != "channel":
                continue
            cpu = num(r.get("cpu_us_per_pkt"))
            vs_floor = ratio(cpu, num(fl.get("cpu_us_per_pkt"))) if fl and server != "floor" else "-"
            vs_co = ratio(cpu, num(co.get("cpu_us_per_pkt"))) if co and server == "turnstone" else "-"
            w(f"| {fmt(float(rate))} | {name} | {fmt(num(r.get('achieved_offered_pps')))} | {fmt(num(r.get('relayed_pps')))} "
              f"| {fmt(num(r.get('loss_pct')), 3)} | {fmt(num(r.get('server_cpu_pct')), 1)} | {fmt(cpu)} | {vs_floor} | {vs_co} "
              f"| {r.get('rtt_p50_us', '-')} / {r.get('rtt_p99_us', '-')} |")
    w("")
    for rate, mode, fl, co, t in repeated:
        parts = []
        for label, r in (("floor", fl), ("coturn", co), ("turnstone", t)):
            if r and "all_cpu_us_per_pkt" in r:
                parts.append(f"{label} " + ", ".join(fmt(v) for v in r["all_cpu_us_per_pkt"]))
        line = (f"- {fmt(float(rate))} pkt/s µs/pkt: median of {t['runs']} runs (floor, coturn and "
                f"turnstone alternating). " + "; ".join(parts))
        if fl and "all_cpu_us_per_pkt" in fl:
            line += "; turnstone/floor per round " + ", ".join(
                f"{b / a:.2f}x" if a else "-" for a, b in zip(fl["all_cpu_us_per_pkt"], t["all_cpu_us_per_pkt"]))
        w(line + ".")
    if repeated:
        w("")

    # rtt
    w("## Round trip through the relay (`loadgen rtt`: one channel, 100 B every 10 ms)")
    w("")
    w("| condition | coturn p50 µs | coturn p99 µs | turnstone p50 µs | turnstone p99 µs | p50 ratio | p99 ratio | floor p50 / p99 µs |")
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    for cond, desc in (("idle", "idle"), ("m100z1", "under `-m 100 -z 1` uclient load")):
        c = find(results, "rtt", server="coturn", cond=cond) or {}
        t = find(results, "rtt", server="turnstone", cond=cond) or {}
        f = find(results, "rtt", server="floor", cond=cond) or {}
        floor_txt = f"{f.get('p50_us')} / {f.get('p99_us')}" if f else "-"
        w(f"| {desc} | {c.get('p50_us', '-')} | {c.get('p99_us', '-')} | {t.get('p50_us', '-')} | {t.get('p99_us', '-')} "
          f"| {ratio(num(t.get('p50_us')), num(c.get('p50_us')))} | {ratio(num(t.get('p99_us')), num(c.get('p99_us')))} | {floor_txt} |")
    w("")
    for cond, desc in (("idle", "idle"), ("m100z1", "under load")):
        c = find(results, "rtt", server="coturn", cond=cond)
        t = find(results, "rtt", server="turnstone", cond=cond)
        for field in ("p50_us", "p99_us"):
            note = runs_note(f"{desc} {field.split('_')[0]} µs", c, t, field, 0)
            if note:
                w(note)
    w("")

    # allocrate
    w("## Allocation rate (`loadgen allocrate`: 401 round trip + authenticated Allocate + Refresh 0)")
    w("")
    w("| server | allocations/s | server CPU % | CPU µs/allocation | errors | timeouts |")
    w("|---|---:|---:|---:|---|---:|")
    for s in ("coturn", "turnstone"):
        r = find(results, "allocrate", server=s) or {}
        w(f"| {s} | {fmt(num(r.get('allocs_per_s')))} | {fmt(num(r.get('server_cpu_pct')), 1)} | {fmt(num(r.get('cpu_us_per_alloc')), 1)} "
          f"| {r.get('errors', '-')} | {r.get('timeouts', '-')} |")
    c, t = find(results, "allocrate", server="coturn") or {}, find(results, "allocrate", server="turnstone") or {}
    w(f"| ratio | {ratio(num(t.get('allocs_per_s')), num(c.get('allocs_per_s')))} | | | | |")
    w("")

    # mem
    w("## Memory (`loadgen mem`: VmRSS at 0 allocations, at N idle allocations, after deleting them)")
    w("")
    w("| server | allocations | RSS at 0 KiB | RSS at N KiB | KiB / allocation | RSS after delete KiB | fds at 0 / N / after |")
    w("|---|---:|---:|---:|---:|---:|---|")
    for s in ("coturn", "turnstone"):
        r = find(results, "mem", server=s) or {}
        w(f"| {s} | {r.get('allocations', '-')} | {fmt(num(r.get('rss0_kib')))} | {fmt(num(r.get('rss_full_kib')))} "
          f"| {fmt(num(r.get('per_alloc_kib')))} | {fmt(num(r.get('rss_after_kib')))} "
          f"| {r.get('fd0', '-')} / {r.get('fd_full', '-')} / {r.get('fd_after', '-')} |")
    w("")

    # targets
    w("## Issue 3 targets, this run (medians where a row ran more than once)")
    w("")
    w("| target | value | met |")
    w("|---|---|---|")

    def target(name, value, ok):
        w(f"| {name} | {value} | {'-' if ok is None else ('yes' if ok else '**no**')} |")

    c = find(results, "uclient", load="-m_100_-z_1", server="coturn") or {}
    t = find(results, "uclient", load="-m_100_-z_1", server="turnstone") or {}
    cc, tc = num(c.get("cpu_us_per_pkt")), num(t.get("cpu_us_per_pkt"))
    target("CPU/pkt at `-m 100 -z 1` ≤ 0.75x coturn", ratio(tc, cc), (tc / cc <= 0.75) if cc and tc else None)
    tl = lg_find(rows, "turnstone", 100000, "channel")
    fl = lg_find(rows, "floor", 100000, "floor")
    a, b = (num(tl.get("cpu_us_per_pkt")) if tl else None), (num(fl.get("cpu_us_per_pkt")) if fl else None)
    target("loadgen 100k pkt/s: CPU/pkt ≤ 1.15x floor", ratio(a, b), (a / b <= 1.15) if a and b else None)
    t150 = find(results, "uclient", load="-m_150_-z_1", server="turnstone") or {}
    l150 = num(t150.get("loss_pct"))
    target("loss at `-m 150 -z 1` < 0.1%", f"{fmt(l150, 3)} %", (l150 < 0.1) if l150 is not None else None)
    s150 = drop_pct(t150, "server")
    if s150 is not None:
        target("of which dropped at turnstone's own sockets < 0.1% (the rest: at the test tools' sockets)",
               f"{fmt(s150, 3)} % (peer {fmt(drop_pct(t150, 'peer'), 3)} %, uclient {fmt(drop_pct(t150, 'uclient'), 3)} %)",
               s150 < 0.1)
    ci, ti = find(results, "rtt", server="coturn", cond="idle") or {}, find(results, "rtt", server="turnstone", cond="idle") or {}
    a, b = num(ti.get("p50_us")), num(ci.get("p50_us"))
    target("idle RTT p50 ≤ coturn's", f"{ti.get('p50_us', '-')} vs {ci.get('p50_us', '-')} µs", (a <= b) if a and b else None)
    cl, tl2 = find(results, "rtt", server="coturn", cond="m100z1") or {}, find(results, "rtt", server="turnstone", cond="m100z1") or {}
    a, b = num(tl2.get("p99_us")), num(cl.get("p99_us"))
    target("RTT p99 under `-m 100 -z 1` ≤ 1/5 of coturn's", f"{tl2.get('p99_us', '-')} vs {cl.get('p99_us', '-')} µs",
           (a <= b / 5) if a is not None and b else None)
    ca, ta = find(results, "allocrate", server="coturn") or {}, find(results, "allocrate", server="turnstone") or {}
    a, b = num(ta.get("allocs_per_s")), num(ca.get("allocs_per_s"))
    target("allocation rate ≥ 3x coturn's", ratio(a, b), (a / b >= 3) if a and b else None)
    tm = find(results, "mem", server="turnstone") or {}
    pa = num(tm.get("per_alloc_kib"))
    target("≤ 4 KiB RSS per idle allocation", f"{fmt(pa)} KiB", (pa <= 4) if pa is not None else None)
    r0, r1, r2 = num(tm.get("rss0_kib")), num(tm.get("rss_full_kib")), num(tm.get("rss_after_kib"))
    if None not in (r0, r1, r2):
        back = r2 - r0 <= max(0.1 * (r1 - r0), 1024)
        target("RSS back near start after deleting (≤ start + max(10% of growth, 1 MiB))",
               f"{fmt(r0)} → {fmt(r1)} → {fmt(r2)} KiB", back)
    w("")
    cmds = meta.get("commands")
    if cmds:
        w("## Commands")
        w("")
        w("```")
        for c in cmds.split(" ;; "):
            w(c)
        w("```")
        w("")
    return "\n".join(out)


# ---------------------------------------------------------------- svg

def nice_ceil(x):
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above x (for axis ranges)."""
    if x <= 0:
        return 1.0
    k = math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10 ** k >= x:
            return m * 10 ** k
    return 10 ** (k + 1)


COLORS = {"coturn": "#d62728", "turnstone": "#1f77b4", "floor": "#2ca02c"}


def svg_plot(results):
    width, height = 1000, 430
    panels = [("server CPU µs per relayed packet", "cpu_us_per_pkt", False),
              ("loss %", "loss_pct", False)]
    series = {}  # (server, kind) -> [(x, y)]
    for r in results:
        if r["tool"] == "load" and r.get("mode") in ("channel", "floor"):
            x = num(r.get("offered_pps"))
            for _, key, _ in panels:
                y = num(r.get(key))
                if x is not None and y is not None:
                    series.setdefault((r["server"], "loadgen", key), []).append((x, y))
        if r["tool"] == "uclient" and r.get("kind") == "channel":
            x = num(r.get("offered_pps"))
            for _, key, _ in panels:
                y = num(r.get(key))
                if x is not None and y is not None:
                    series.setdefault((r["server"], "uclient", key), []).append((x, y))
    # A row that ran several times (--repeat) is plotted at its median.
    for k, pts in series.items():
        xs = sorted({x for x, _ in pts})
        series[k] = [(x, statistics.median([y for xx, y in pts if xx == x])) for x in xs]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    pw, ph = 400, 300
    for pi, (title, key, _) in enumerate(panels):
        ox, oy = 70 + pi * 490, 40
        pts = [p for (s, k, kk), v in series.items() if kk == key for p in v]
        if not pts:
            continue
        xmax = nice_ceil(max(p[0] for p in pts) * 1.02)
        ymax = nice_ceil(max(max(p[1] for p in pts) * 1.05, 0.1 if key == "loss_pct" else 1.0))

        def X(x):
            return ox + pw * x / xmax

        def Y(y):
            return oy + ph - ph * y / ymax
        parts.append(f'<text x="{ox + pw / 2}" y="{oy - 15}" text-anchor="middle" font-size="14">{title}</text>')
        parts.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        for i in range(6):
            yv = ymax * i / 5
            yy = Y(yv)
            parts.append(f'<line x1="{ox}" y1="{yy:.1f}" x2="{ox + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
            parts.append(f'<text x="{ox - 6}" y="{yy + 4:.1f}" text-anchor="end">{yv:g}</text>')
            xv = xmax * i / 5
            xx = X(xv)
            parts.append(f'<text x="{xx:.1f}" y="{oy + ph + 16}" text-anchor="middle">{xv / 1000:.0f}k</text>')
        parts.append(f'<text x="{ox + pw / 2}" y="{oy + ph + 34}" text-anchor="middle">offered relayed packets/s</text>')
        for (server, kind, kk), v in sorted(series.items()):
            if kk != key:
                continue
            v = sorted(v)
            color = COLORS.get(server, "#000")
            dash = ' stroke-dasharray="6,4"' if kind == "uclient" else ""
            d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in v)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for x, y in v:
                shape = (f'<rect x="{X(x) - 3.5:.1f}" y="{Y(y) - 3.5:.1f}" width="7" height="7" fill="{color}"/>'
                         if kind == "uclient" else f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{color}"/>')
                parts.append(shape)
    # legend
    lx, ly = 70, height - 30
    items = [("coturn", "loadgen", "coturn (loadgen)"), ("turnstone", "loadgen", "turnstone (loadgen)"),
             ("floor", "loadgen", "floor forwarder (loadgen)"), ("coturn", "uclient", "coturn (uclient)"),
             ("turnstone", "uclient", "turnstone (uclient)")]
    for i, (server, kind, label) in enumerate(items):
        x = lx + i * 180
        dash = ' stroke-dasharray="6,4"' if kind == "uclient" else ""
        parts.append(f'<line x1="{x}" y1="{ly}" x2="{x + 30}" y2="{ly}" stroke="{COLORS[server]}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{x + 36}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------- main

def update_readme(readme, md):
    begin, end = "<!-- latest-results:begin -->", "<!-- latest-results:end -->"
    try:
        text = open(readme).read()
    except OSError:
        return
    if begin not in text or end not in text:
        return
    body = md.split("\n", 2)[2] if md.startswith("# ") else md
    body = body.replace("\n## ", "\n### ")
    new = text[: text.index(begin) + len(begin)] + "\n" + body.strip() + "\n" + text[text.index(end):]
    with open(readme, "w") as f:
        f.write(new)


def main(argv):
    if len(argv) >= 3 and argv[1] == "uclient":
        d = parse_uclient(argv[2])
        print(" ".join(f"{k}={v}" for k, v in d.items()))
        return 0
    if len(argv) >= 4 and argv[1] == "render":
        results, meta = read_raw(argv[2])
        outdir = argv[3]
        md = render_md(results, meta)
        with open(os.path.join(outdir, "latest.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(outdir, "latest.svg"), "w") as f:
            f.write(svg_plot(results) + "\n")
        if len(argv) >= 5:
            update_readme(argv[4], md)
        print(md)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
