#!/usr/bin/env python3
"""receiver-node fed by ../shared/bench/spark/line_server.py: the same source, the same bytes, the
same way as the Spark Streaming anchor (`run_spark_bench.sh`).

Starts line_server.py (N lines of 100 bytes), starts receiver-node (release build) with a socket
receiver in connect mode and a `discard` output that reads every record of every batch back
(as the Spark job's per-batch JVM-side count does), polls /metrics until all N records are in
completed batches, then stops the node with SIGTERM. Prints one JSON object:

  records/s and MB/s as the Spark anchor computes them (all records over the span from the first
  to the last data batch completed; also from the first record stored), batch total
  delay p50/p95 (scheduling + processing, sampled per completed batch), peak RSS (VmHWM).

Usage: python3 tools/bench/benches/node_socket_bench.py --lines 24000000 [--fsync always|never] [--port 19998]
(`cargo build --release --bins` first; tools/bench/benches/compare_spark.sh runs it beside Spark.)
"""
import argparse, json, os, pathlib, signal, subprocess, sys, tempfile, time, urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the workspace root (tools/bench/benches -> .)
LINE_SERVER = ROOT.parent / "shared" / "bench" / "spark" / "line_server.py"


def metrics(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def vm_hwm(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=24_000_000)
    ap.add_argument("--port", type=int, default=19998)
    ap.add_argument("--metrics-port", type=int, default=19897)
    ap.add_argument("--fsync", default="always")
    ap.add_argument("--node", default=str(ROOT / "target" / "release" / "receiver-node"))
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    if not pathlib.Path(a.node).exists():
        sys.exit(f"{a.node} not found: run `cargo build --release --bins` first")
    if not LINE_SERVER.exists():
        sys.exit(f"{LINE_SERVER} not found (the shared bench directory)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="weir-node-bench-", dir=os.environ.get("WEIR_BENCH_DIR")))
    cfg = work / "node.toml"
    cfg.write_text(
        f'data_dir = "{work / "data"}"\n\n[engine.wal]\nfsync = "{a.fsync}"\n\n'
        f'[[receiver]]\nname = "source"\ntype = "socket"\nmode = "connect"\naddress = "127.0.0.1:{a.port}"\n\n'
        f'[[output]]\ntype = "discard"\n\n[metrics]\naddress = "127.0.0.1:{a.metrics_port}"\n\n[log]\nlevel = "warn"\n'
    )
    server = subprocess.Popen(
        [sys.executable, str(LINE_SERVER), "--port", str(a.port), "--lines", str(a.lines), "--summary", str(work / "server.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    node = subprocess.Popen([a.node, "run", "--config", str(cfg)], stderr=open(work / "node.log", "w"))
    t_start = None
    t_first_batch = None
    t_end = None
    delays = []
    last_batches = 0
    deadline = time.time() + a.timeout
    try:
        while time.time() < deadline:
            m = metrics(a.metrics_port)
            now = time.time()
            if m:
                stored = m.get('weir_receiver_records_stored_total{receiver="source"}', 0)
                batched = m.get("weir_batch_records_total", 0)
                batches = m.get("weir_batches_completed_total", 0)
                if stored > 0 and t_start is None:
                    t_start = now
                if batched > 0 and t_first_batch is None:
                    t_first_batch = now
                if batches > last_batches and batched > 0:
                    delays.append(m.get("weir_batch_total_delay_ms", 0))
                    last_batches = batches
                if batched >= a.lines:
                    t_end = now
                    break
            if node.poll() is not None:
                sys.exit(f"receiver-node exited early ({node.returncode}); see {work / 'node.log'}")
            time.sleep(0.1)
        rss = vm_hwm(node.pid)
        m = metrics(a.metrics_port) or {}
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            rc = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            rc = "killed"
        server.wait(timeout=30)
    if t_end is None or t_start is None:
        sys.exit(f"not all records reached batches within {a.timeout} s; see {work / 'node.log'}")
    secs = t_end - t_start
    span = max(t_end - t_first_batch, 1e-3)
    res = {
        "system": "weir receiver-node",
        "fsync": a.fsync,
        "lines": a.lines,
        "seconds": round(secs, 2),
        # As the Spark anchor computes it: all records over first..last data batch completed.
        "records_per_s": round(a.lines / span),
        "mb_per_s": round(a.lines * 100 / span / 1e6, 1),
        # Stricter: from the first record stored to the last batch completed.
        "records_per_s_from_first_store": round(a.lines / secs),
        "batch_delay_p50_ms": pct(delays, 50),
        "batch_delay_p95_ms": pct(delays, 95),
        "batches_sampled": len(delays),
        "peak_rss_mib": round(rss / 2**20, 1),
        "wal_fsyncs": m.get("weir_wal_fsyncs_total"),
        "exit": rc,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
