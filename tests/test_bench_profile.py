"""scripts/bench_forward.device_time_by_kernel: a profiler trace summed per kernel and per kind of kernel."""

import gzip
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "scripts"))
from bench_forward import device_time_by_kernel  # noqa: E402


def test_kernels_are_summed_by_name_and_by_kind(tmp_path):
    trace = tmp_path / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]

    def kernel(name, dur, pid=2):
        return {"ph": "X", "pid": pid, "name": name, "dur": dur, "args": {"hlo_op": name}}

    events = meta + [kernel("gemm_fusion_dot_611", 10), kernel("gemm_fusion_dot_611", 10),
                     kernel("gemm_fusion_dot_7", 5), kernel("nvjet_sm90_tst_64x8", 4), kernel("host_work", 100, pid=1)]
    with gzip.open(trace / "x.trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    hlo = "  %gemm_fusion_dot.611 = f32[8,1,3840]{2,1,0} fusion(%a, %b), kind=kCustom\n"
    got = device_time_by_kernel(str(tmp_path), hlo)
    assert got["device_busy_us"] == 29 and got["kernels_run"] == 4              # the host's event is not counted
    assert [(k["kernel"], k["us"], k["calls"]) for k in got["top"]] == [
        ("gemm_fusion_dot_611", 20, 2), ("gemm_fusion_dot_7", 5, 1), ("nvjet_sm90_tst_64x8", 4, 1)]
    assert got["top"][0]["hlo"].startswith("  %gemm_fusion_dot.611 = f32[8,1,3840]")
    assert got["top"][0]["args"] == {"hlo_op": "gemm_fusion_dot_611"}
    assert [(k["kind"], k["us"], k["calls"]) for k in got["by_kind"]] == [("gemm_fusion_dot", 25, 3),
                                                                        ("nvjet_sm90_tst_64x8", 4, 1)]
