"""benchmarks/trace_summary.py on a real jax.profiler trace of a jitted function (CPU)."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "trace_summary.py")
_spec = importlib.util.spec_from_file_location("trace_summary", _PATH)
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)


def test_family_strips_numeric_suffixes():
    assert ts.family("fusion.12") == "fusion"
    assert ts.family("loop_add_fusion_3") == "loop_add_fusion"
    assert ts.family("gemm") == "gemm"
    assert ts.family("7") == "7"


def test_summary_of_a_profiled_run(tmp_path, capsys):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()  # compile outside the trace
    with jax.profiler.trace(str(tmp_path / "trace")):
        for _ in range(5):
            f(x).block_until_ready()
    out = tmp_path / "summary.json"
    assert ts.main([str(tmp_path / "trace"), "--top", "5", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    (proc,) = summary["processes"]  # no device process on CPU: the host's
    assert proc["busy_ms"] > 0 and proc["span_ms"] > 0 and 0 < len(proc["top"]) <= 5
    assert all(t["ms"] >= 0 and t["calls"] >= 1 for t in proc["top"])
    assert abs(sum(t["share"] for t in proc["families"]) - 1) < 1e-6 or len(proc["families"]) == 5
    # the 5 calls of f, looked up over every event name (the top 5 by time can be other host
    # frames: a loaded machine once spent 2 s in stop_trace, above everything else)
    (full,) = ts.summarize(ts.find_trace(str(tmp_path / "trace")), top=10_000)["processes"]
    assert any("PjitFunction" in t["name"] and t["calls"] >= 5 for t in full["top"])
    assert "| ms | share | calls |" in capsys.readouterr().out
    # 5 host-synchronised calls: the process idles between them, and the gaps say where
    assert 0 <= proc["idle_ms"] < proc["span_ms"]
    gaps = [g["ms"] for g in proc["gaps"]]
    assert gaps == sorted(gaps, reverse=True) and all(g > 0 for g in gaps)
    assert proc["gap_sizes"][">0.1 ms"]["count"] >= sum(g > 0.1 for g in gaps)


def test_idle_gaps_of_known_intervals():
    ev = [dict(ts=0, dur=10, name="a"), dict(ts=5, dur=10, name="b"),  # overlap: busy 0-15
          dict(ts=1015, dur=5, name="c"), dict(ts=3020, dur=1, name="d")]
    covered, top, sizes = ts.idle_gaps(ev, 5)
    assert covered == 15 + 5 + 1
    assert [(g["ms"], g["after"], g["before"]) for g in top] == [(2.0, "c", "d"),
                                                                  (1.0, "b", "c")]
    assert sizes[">1 ms"] == dict(count=1, ms=2.0) and sizes[">0.1 ms"]["count"] == 2


def test_stream_lines_only_when_the_trace_has_them(tmp_path):
    """A GPU-like trace: kernels on a Stream line, and a derived "XLA Ops" line spanning them
    (and the gap between them). Only the stream counts: busy = kernel time, the gap stays idle."""
    import gzip

    ev = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
          dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7(Compute)")),
          dict(ph="M", name="thread_name", pid=1, tid=2, args=dict(name="XLA Ops")),
          dict(ph="X", pid=1, tid=7, ts=0, dur=100, name="k1", args=dict(hlo_op="dot.1")),
          dict(ph="X", pid=1, tid=7, ts=600, dur=100, name="k2", args=dict(hlo_op="dot.2")),
          dict(ph="X", pid=1, tid=2, ts=0, dur=700, name="while.3")]
    f = tmp_path / "t.trace.json.gz"
    with gzip.open(f, "wt") as fh:
        json.dump(dict(traceEvents=ev), fh)
    (p,) = ts.summarize(str(f))["processes"]
    assert p["streams_only"] and p["lines"] == {"Stream #7(Compute)": 2, "XLA Ops": 1}
    assert p["busy_ms"] == 0.2 and p["span_ms"] == 0.7 and abs(p["idle_ms"] - 0.5) < 1e-9
    assert [t["name"] for t in p["top"]] == ["dot.1", "dot.2"]



def test_host_process_keeps_every_line(tmp_path):
    """A host (non-device) process keeps all its threads, even one named like a stream (the
    engine's streaming threads are): only GPU processes drop their derived lines."""
    import gzip

    ev = [dict(ph="M", name="process_name", pid=3, args=dict(name="/host:CPU")),
          dict(ph="M", name="thread_name", pid=3, tid=1, args=dict(name="python")),
          dict(ph="M", name="thread_name", pid=3, tid=2, args=dict(name="imp_jax-stream")),
          dict(ph="X", pid=3, tid=1, ts=0, dur=50, name="PjitFunction(f)"),
          dict(ph="X", pid=3, tid=2, ts=100, dur=20, name="step")]
    f = tmp_path / "h.trace.json.gz"
    with gzip.open(f, "wt") as fh:
        json.dump(dict(traceEvents=ev), fh)
    (p,) = ts.summarize(str(f))["processes"]
    assert not p["streams_only"] and {t["name"] for t in p["top"]} == {"PjitFunction(f)", "step"}


def test_host_events_in_a_gap_are_named_by_their_self_time():
    gaps = [dict(ms=2.0, ts=1000.0), dict(ms=0.5, ts=5000.0)]
    host = [dict(ts=0, dur=9000, name="generate", pid=1, tid=1),  # the outer frame
            dict(ts=900, dur=600, name="dispatch", pid=1, tid=1),  # 1000-1500 in the gap
            dict(ts=1800, dur=1000, name="schedule", pid=1, tid=1),  # 1800-2800
            dict(ts=1900, dur=300, name="hash", pid=1, tid=1),  # inside schedule
            dict(ts=1000, dur=2000, name="other thread", pid=1, tid=2),
            dict(ts=4000, dur=100, name="elsewhere", pid=1, tid=1)]  # in no gap
    ts.host_in_gaps(gaps, host)
    assert gaps[0]["host"][:2] == [("other thread", 2.0), ("schedule", 0.7)]
    assert dict(gaps[0]["host"][2:]) == {"dispatch": 0.5, "generate": 0.5, "hash": 0.3}
    assert gaps[1]["host"] == [("generate", 0.5)]
