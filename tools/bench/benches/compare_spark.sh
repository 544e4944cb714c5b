#!/usr/bin/env bash
# receiver-node beside Spark Streaming with its receiver WAL, in one sitting, fed the same way by
# ../shared/bench/spark/line_server.py (N lines of 100 bytes over one TCP connection).
# Usage: tools/bench/benches/compare_spark.sh [LINES] [SPARK_DRIVER_MEMORY]      (defaults: 24000000, 4g)
# Needs: cargo, python3, Java 17; ../shared/bench/spark/setup.sh installs PySpark (BENCH_WORK).
set -euo pipefail
LINES=${1:-24000000}; DMEM=${2:-4g}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
SPARK=$ROOT/../shared/bench/spark
export BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/spark-anchor}
"$SPARK/setup.sh" >/dev/null
rm -rf "$BENCH_WORK/results/spark"
(cd "$ROOT" && cargo build --release --bins -q)
echo "== weir receiver-node, fsync always ($LINES lines)"
python3 "$HERE/node_socket_bench.py" --lines "$LINES" --fsync always | tee "$BENCH_WORK/weir-always.json"
sync; sleep 3
echo "== weir receiver-node, fsync never (what Spark's WAL does: it never fsyncs)"
python3 "$HERE/node_socket_bench.py" --lines "$LINES" --fsync never | tee "$BENCH_WORK/weir-never.json"
sync; sleep 3
echo "== Spark Streaming, receiver WAL on, driver memory $DMEM"
"$SPARK/run_spark_bench.sh" wal "$LINES" r1 "$DMEM"
echo "== Spark summary"
python3 "$SPARK/summarize_spark.py" "$BENCH_WORK/results/spark" 2>/dev/null | tail -20 || true
