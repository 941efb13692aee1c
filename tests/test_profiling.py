"""[profiling]: traces of every N-th step (training/profiling.py) and their summary (scripts/trace_summary.py)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.trace_summary import idle_gaps, kind_of, summarize
from tests.dist_utils import run_distributed
from train import train
from training.recipe import load_recipe


def _train(rank, world_size, argv):
    train(load_recipe(argv))


def test_every_nth_step_is_traced_and_summarized(tmp_path):
    # In a process of its own, as every in-process run here: the process group it starts must not
    # leak its environment (MASTER_PORT, WORLD_SIZE) into later tests' subprocesses.
    argv = [
        "--config",
        "configs/debug.toml",
        "--training.steps",
        "5",
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--job.dump_folder",
        str(tmp_path),
        "--profiling.enable_profiling",
        "--profiling.profile_freq",
        "2",
    ]
    run_distributed(_train, 1, argv, timeout_s=300)
    traces = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("profile_traces/*/*.json"))
    assert traces == ["profile_traces/iteration_2/rank0_trace.json", "profile_traces/iteration_4/rank0_trace.json"]
    events = json.loads((tmp_path / traces[1]).read_text())["traceEvents"]
    names = {str(e.get("name")) for e in events}
    # torch labels the step's span by the steps done before it
    assert "ProfilerStep#3" in names and names & {"aten::mm", "aten::addmm", "aten::bmm"}
    assert summarize(events)["wall_us"] > 0


# Foreach kernels as torch's templates name them (ForeachBinaryOpList.cu, ForeachReduceOp.cu): the functor that
# tells them apart comes after some 130 characters of namespaces.
FOREACH = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
FOREACH_CAST = (
    FOREACH + "TensorListMetadata<2>, at::native::(anonymous namespace)::CopyFunctor<c10::BFloat16, float, 2, 1, 1>, "
    "at::native::Copy<c10::BFloat16, float> >(at::native::(anonymous namespace)::TensorListMetadata<2>)"
)


def test_summary_merges_overlapping_kernels_and_sorts_them_by_kind():
    kernels = [
        ("sm90_xmma_gemm_bf16bf16", 0, 10),
        ("ncclDevKernel_AllGather_RING_LL", 5, 20),
        ("flash_fwd_kernel", 30, 5),
        ("triton_poi_fused_add_0", 40, 2),
        ("vectorized_elementwise", 50, 1),
    ]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": dur} for n, ts, dur in kernels]
    events.append({"cat": "cpu_op", "name": "ProfilerStep#7", "ts": 0, "dur": 100})
    s = summarize(events)
    assert s["wall_us"] == 100 and s["busy_us"] == 25 + 5 + 2 + 1  # [0, 25) merged from the gemm and nccl
    assert s["by_kind"] == {"matmul": 10, "communication": 20, "attention": 5, "triton": 2, "other": 1}
    assert kind_of("multi_tensor_apply_kernel<AdamFunctor>") == "optimizer"
    # FSDP's casts of the parameters and its gradient concatenation, as an H100 trace names them
    assert (
        kind_of("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(") == "casts"
    )
    assert kind_of("void at::native::detail::chunk_cat_cuda_kernel<float, c10::BFloat16>(") == "casts"
    # torch._foreach_copy_ from fp32 into bf16 (one rank's copies cast again) and the gradient norm's _foreach_norm
    assert kind_of(FOREACH_CAST) == "casts"
    norm = FOREACH + "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<c10::BFloat16, "
    assert kind_of(norm + "(at::native::NormType)1, float, 1, 1, 0>, float*, int>(") == "optimizer"


def test_idle_gaps_are_named_by_their_kernels_and_the_host_op_that_ended_them():
    def kernel(name: str, ts: int, dur: int, correlation: int) -> dict:
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    events = [
        kernel("gemm", 0, 10, 1),
        kernel("nccl_all_gather", 5, 20, 2),  # overlaps: no gap until 25
        kernel("triton_a", 27, 3, 3),  # 2 us after
        kernel("adam", 60, 5, 4),  # 30 us after: the host was busy in the optimizer's Python
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 58, "dur": 1, "tid": 7, "args": {"correlation": 4}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 26, "dur": 1, "tid": 7, "args": {"correlation": 3}},
        {"cat": "user_annotation", "name": "Optimizer.step", "ts": 31, "dur": 40, "tid": 7},
        {"cat": "cpu_op", "name": "aten::_fused_adamw_", "ts": 57, "dur": 5, "tid": 7},
        {"cat": "cpu_op", "name": "elsewhere", "ts": 50, "dur": 20, "tid": 8},  # another thread
    ]
    assert idle_gaps(events, top=5) == [
        {"us": 30, "before": "triton_a", "after": "adam", "launched_by": "Optimizer.step > aten::_fused_adamw_"},
        {"us": 2, "before": "nccl_all_gather", "after": "triton_a", "launched_by": "?"},
    ]
    assert len(idle_gaps(events, top=1)) == 1


ROOT = Path(__file__).resolve().parents[1]


def _summary(trace: Path) -> subprocess.CompletedProcess:
    """``scripts/trace_summary.py`` on ``trace``, as a user runs it."""
    return subprocess.run(
        [sys.executable, "scripts/trace_summary.py", str(trace)], cwd=ROOT, capture_output=True, text=True
    )


def test_the_longest_kernels_are_printed_with_their_kind_past_their_namespaces(tmp_path):
    events = [
        {"cat": "cpu_op", "name": "ProfilerStep#10", "ts": 0, "dur": 100},
        {"cat": "kernel", "name": FOREACH_CAST, "ts": 0, "dur": 30},
        {"cat": "kernel", "name": "_adamw_kernel", "ts": 40, "dur": 20},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 70, "dur": 10},
    ]
    (tmp_path / "trace.json").write_text(json.dumps({"traceEvents": events}))
    result = _summary(tmp_path / "trace.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.endswith("kernel"))
    listed = lines[header + 1 : header + 4]
    assert [line.split()[2] for line in listed] == ["casts", "optimizer", "copies"], listed
    assert (
        listed[0]
        .split(None, 3)[3]
        .startswith("multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor<BFloat16, float, 2, 1, 1>")
    ), listed
    gap = lines[next(i for i, line in enumerate(lines) if line.endswith("launched by (host op)")) + 1]
    assert gap.split(None, 1)[1].startswith("multi_tensor_apply_kernel<TensorListMetadata<2>, C -> _adamw_kernel"), gap


BAD_TRACES = {  # file name, its bytes (None: no file), what the line says after "<path>: "
    "missing": ("rank0_trace.json", None, "cannot be read (No such file or directory)"),
    "not_json": ("rank0_trace.json", b"<html>", "not a JSON trace (Expecting value"),
    "another_json": ("rank0_trace.json", b'{"loss": 1.0}', "no traceEvents list, so no profiler trace"),
    "cut_gzip": ("rank0_trace.json.gz", gzip.compress(b'{"traceEvents": []}' * 50)[:30], "cannot be read (Compressed"),
}


@pytest.mark.parametrize("bad", list(BAD_TRACES))
def test_summary_of_a_missing_or_foreign_file_is_one_line(tmp_path, bad):
    name, content, says = BAD_TRACES[bad]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = _summary(tmp_path / name)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"trace_summary: {tmp_path / name}: {says}") and result.stderr.count("\n") == 1
    assert result.stderr.endswith("wrote under <dump_folder>/profile_traces/iteration_<N>/\n")
