#!/usr/bin/env bash
# Run the two ways a finished run used to abort at exit N times each and count the failures:
# the 2-rank resume test, and a 2-rank torchrun with gradient accumulation and async checkpoints.
# Not part of CI (minutes per 10 runs); run it after touching shutdown code:
#   scripts/stress_exit.sh 50
set -uo pipefail
cd "$(dirname "$0")/.."
N="${1:-20}"
PY=.venv/bin/python
LOGS="$(mktemp -d)"
test_failures=0
run_failures=0
for i in $(seq 1 "$N"); do
    if ! "$PY" -m pytest -q -p no:cacheprovider \
            "tests/test_checkpoint.py::test_resume_is_bitwise_identical[dp_shard2]" >"$LOGS/test-$i.log" 2>&1; then
        test_failures=$((test_failures + 1))
        echo "test run $i failed: $LOGS/test-$i.log"
    fi
    out="$LOGS/run-$i"
    if ! "$PY" -m torch.distributed.run --nproc_per_node=2 --rdzv_backend c10d --rdzv_endpoint localhost:0 \
            train.py --config configs/debug.toml --training.steps 4 --training.local_batch_size 2 \
            --training.global_batch_size 8 --training.seq_len 64 --checkpoint.enable --checkpoint.interval 2 \
            --checkpoint.async_mode async --metrics.enable_tensorboard --job.dump_folder "$out" \
            >"$out.log" 2>&1 || grep -q "terminate called" "$out.log"; then
        run_failures=$((run_failures + 1))
        echo "torchrun $i failed: $out.log"
    fi
    rm -rf "$out"
done
echo "stress_exit: $N runs each; test failures $test_failures, torchrun failures $run_failures (logs in $LOGS)"
[ "$test_failures" -eq 0 ] && [ "$run_failures" -eq 0 ]
