"""Where a profiled run spent its device time, as text: the top ops/kernels of a jax.profiler trace.

    python3 -m imp_jax.cli bench throughput ... --profile $OUT/trace     # any jax.profiler.trace dir
    python3 benchmarks/trace_summary.py $OUT/trace --top 25 [--gaps 10] [--json $OUT/summary.json]

A trace directory holds `plugins/profile/<run>/<host>.trace.json.gz` (Chrome trace format): one
process per device or host ("/device:GPU:0", "/host:CPU", ...), complete events ("ph": "X")
with microsecond durations. Device traces are tens to hundreds of MB, too big to bring back from
the GPU machine; this prints, per process (device processes only when there are any), the busy
time, the wall span, and the top events by total duration, also rolled up by "family" (the
name without its numeric suffixes, so fusion.12 and fusion.40 add up). Kernel names tell GEMM
algorithms and Pallas kernels apart; `hlo_op` (when the trace records it) names the XLA op.

GPU traces also carry lines derived from the kernels ("XLA Ops", "XLA Modules", "Steps": one
event spans many kernels). When a device process has "Stream" lines, only those count, so busy
time is kernel time; the other lines are listed with their event counts. (Host processes keep
every line: their threads may have "stream" in their names too. Summaries made before this
rule, session 4's, summed every line: their busy time is an upper bound.)

Idle time: the span minus the union of the process's events (over all its streams), and the
`--gaps` longest idle gaps with the events on either side, so a host-bound run shows where the
device waited (a gap after each step's last kernel: the host's turn).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import heapq
import json
import os
import re
import sys

_SUFFIX = re.compile(r"([._-]?\d+)+$")


def family(name: str) -> str:
    """fusion.12 -> fusion, loop_add_fusion_3 -> loop_add_fusion, gemm -> gemm."""
    return _SUFFIX.sub("", name) or name


def find_trace(path: str) -> str:
    """The trace file itself, or the newest one under a jax.profiler.trace directory."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
    if not found:
        raise SystemExit(f"no *.trace.json.gz under {path!r} (a jax.profiler.trace directory?)")
    return found[-1]  # the newest run (directories are named by time)


def idle_gaps(events: list[dict], n: int) -> tuple[float, list[dict], dict]:
    """(busy union in us, the n longest gaps, gap counts by size) of one process's events."""
    iv = sorted((e["ts"], e["ts"] + e["dur"], _name(e)) for e in events)
    covered, gaps = 0.0, []
    seg_start, cur_end, cur_name = iv[0]
    for start, end, name in iv[1:]:
        if start > cur_end:
            gaps.append((start - cur_end, cur_end, cur_name, name))
            covered += cur_end - seg_start
            seg_start = start
        if end > cur_end:
            cur_end, cur_name = end, name
    covered += cur_end - seg_start
    sizes = {f">{lim} ms": dict(count=sum(g[0] > lim * 1e3 for g in gaps),
                                ms=sum(g[0] for g in gaps if g[0] > lim * 1e3) / 1e3)
             for lim in (0.1, 1, 10)}
    top = [dict(ms=d / 1e3, at_ms=(ts - iv[0][0]) / 1e3, after=a, before=b, ts=ts)
           for d, ts, a, b in heapq.nlargest(n, gaps)]
    return covered, top, sizes


def host_in_gaps(gaps: list[dict], host: list[dict], n: int = 5) -> None:
    """Name, per gap, what the host was doing while the device waited: `gap["host"]` holds the
    n event names with the most *self* time inside the gap (an event's overlap with the gap
    minus its nested children's, per thread), so the Python tracer's outer frames (generate,
    step) do not hide the function that actually ran."""
    host = sorted(host, key=lambda e: (e["ts"], -e["dur"]))
    starts = [e["ts"] for e in host]
    longest = max((e["dur"] for e in host), default=0)
    for g in gaps:
        lo, hi = g["ts"], g["ts"] + g["ms"] * 1e3
        selft = collections.Counter()
        stacks: dict = {}  # (pid, tid) -> open events [(end, name)]
        for e in host[bisect.bisect_left(starts, lo - longest):bisect.bisect_right(starts, hi)]:
            end = e["ts"] + e["dur"]
            o = min(hi, end) - max(lo, e["ts"])
            if o <= 0:
                continue
            stack = stacks.setdefault((e["pid"], e.get("tid")), [])
            while stack and stack[-1][0] <= e["ts"]:
                stack.pop()  # ended before this one began: not its parent
            if stack:
                selft[stack[-1][1]] -= o  # the parent's time here is this child's
            name = e["name"][:40]
            selft[name] += o
            stack.append((end, name))
        g["host"] = [(name, t / 1e3) for name, t in selft.most_common(n) if t > 0]


def _name(e: dict) -> str:
    return e.get("args", {}).get("hlo_op") or e["name"]


def summarize(trace_file: str, top: int = 25, gaps: int = 10) -> dict:
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): str(e["args"].get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and "args" in e}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = {pid for pid, n in procs.items() if "/device:" in n}
    keep = device or set(procs) or {e["pid"] for e in spans}
    out = {"trace": trace_file, "processes": []}
    for pid in sorted(keep):
        mine = [e for e in spans if e["pid"] == pid]
        if not mine:
            continue
        lines = collections.Counter(threads.get((pid, e.get("tid")), str(e.get("tid")))
                                    for e in mine)
        streams = set() if pid not in device else {  # GPU processes only (host threads too
            tid for (p, tid), n in threads.items()      # may carry "stream" in their names)
            if p == pid and "stream" in n.lower()}
        if streams:  # kernels only: derived op / module lines would count them twice
            mine = [e for e in mine if e.get("tid") in streams]
        by_name, by_family = collections.Counter(), collections.Counter()
        calls = collections.Counter()
        for e in mine:
            name = _name(e)
            by_name[name] += e["dur"]
            by_family[family(name)] += e["dur"]
            calls[name] += 1
        busy = sum(by_name.values())
        start = min(e["ts"] for e in mine)
        end = max(e["ts"] + e["dur"] for e in mine)
        covered, longest, sizes = idle_gaps(mine, gaps)
        host = [e for e in spans if e["pid"] not in device]
        if pid in device and host:
            host_in_gaps(longest, host)
        out["processes"].append({
            "process": procs.get(pid, str(pid)), "events": len(mine),
            "lines": dict(lines), "streams_only": bool(streams),
            "busy_ms": busy / 1e3, "span_ms": (end - start) / 1e3,
            "idle_ms": (end - start - covered) / 1e3, "gaps": longest, "gap_sizes": sizes,
            "top": [{"name": n, "ms": d / 1e3, "calls": calls[n], "share": d / busy}
                    for n, d in by_name.most_common(top)],
            "families": [{"family": n, "ms": d / 1e3, "share": d / busy}
                         for n, d in by_family.most_common(top)],
        })
    return out


def device_time(fn, args, calls: int, path: str) -> tuple[float, float] | None:
    """fn(*args) once more (warm: no compile in the trace), then once under jax.profiler into
    `path`: (kernel time, span) per call in us on the first GPU, or None without a GPU trace or
    when profiling fails (printed; the caller keeps its wall-clock figures). Kernel time is the
    union of the stream's kernel intervals (session 17's figures summed durations, which
    counts overlapping kernels twice: the deprecated decode kernel's spans ran up to 2% below
    their sums). Wall-clock loops also hold the run's host side (dispatching its arguments and
    launches), which short kernels do not hide (session 17)."""
    import jax

    try:
        jax.block_until_ready(fn(*args))
        with jax.profiler.trace(path):
            jax.block_until_ready(fn(*args))
        gpus = [p for p in summarize(find_trace(path))["processes"] if "GPU" in p["process"]]
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- a profiler failure costs the figure only
        print(f"  device_time: profiling failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    if not gpus:
        return None
    busy = gpus[0]["span_ms"] - gpus[0]["idle_ms"]
    return busy * 1e3 / calls, gpus[0]["span_ms"] * 1e3 / calls


def render(summary: dict) -> str:
    lines = [f"trace: {summary['trace']}"]
    for p in summary["processes"]:
        what = "its stream lines" if p["streams_only"] else "all its lines"
        lines.append(f"\n## {p['process']}: {p['events']} events, busy {p['busy_ms']:.1f} ms "
                     f"(summed over {what}) in a span of {p['span_ms']:.1f} ms")
        lines.append("lines (events): " + ", ".join(f"{n} ({c})" for n, c in p["lines"].items()))
        lines.append("| ms | share | calls | op / kernel |\n| --- | --- | --- | --- |")
        lines += [f"| {t['ms']:.2f} | {100 * t['share']:.1f}% | {t['calls']} | {t['name'][:110]} |"
                  for t in p["top"]]
        lines.append("\n| ms | share | family |\n| --- | --- | --- |")
        lines += [f"| {t['ms']:.2f} | {100 * t['share']:.1f}% | {t['family'][:110]} |"
                  for t in p["families"]]
        sizes = ", ".join(f"{k}: {v['count']} ({v['ms']:.1f} ms)"
                          for k, v in p["gap_sizes"].items())
        lines.append(f"\nidle {p['idle_ms']:.1f} ms of the span (no event on any stream); "
                     f"gaps {sizes}")
        if p["gaps"]:
            lines.append("| gap ms | at ms | after | before | host events in the gap (ms) |\n"
                         "| --- | --- | --- | --- | --- |")
            lines += [f"| {g['ms']:.2f} | {g['at_ms']:.1f} | {g['after'][:50]} | "
                      f"{g['before'][:50]} | "
                      + "; ".join(f"{n} {ms:.1f}" for n, ms in g.get("host", [])) + " |"
                      for g in p["gaps"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a jax.profiler.trace directory or one .trace.json.gz file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gaps", type=int, default=10, help="list this many longest idle gaps")
    ap.add_argument("--json", default=None, help="also save the summary here")
    args = ap.parse_args(argv)
    summary = summarize(find_trace(args.trace), args.top, args.gaps)
    print(render(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
