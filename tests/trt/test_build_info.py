"""build_info.json: engines refuse, in one line, another TensorRT version or another GPU."""

import pytest

from dllm_trt.errors import DllmError
from dllm_trt.trt.build_info import check_compatible, read_build_info, write_build_info
from dllm_trt.trt.gpu import GpuInfo

INFO = dict(tensorrt_version="11.3.0", gpu=dict(name="NVIDIA H100 80GB HBM3", compute_capability=[9, 0]))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 79.6)


def test_round_trip_and_a_matching_machine_passes(tmp_path):
    write_build_info(tmp_path, INFO)
    info = read_build_info(tmp_path)
    check_compatible(info, "11.3.0", H100)
    check_compatible(info, "11.3.0", GpuInfo("NVIDIA H200", (9, 0), 139.8))  # same sm_90: the engine runs


@pytest.mark.parametrize(
    "version, gpu, message",
    [
        ("11.4.0", H100, "built with TensorRT 11.3.0, this process has TensorRT 11.4.0"),
        ("11.3.0", GpuInfo("NVIDIA B200", (10, 0), 179.0), r"built for NVIDIA H100 80GB HBM3 \(sm_90\); .* \(sm_100\)"),
        ("11.3.0", None, "no CUDA GPU visible"),
    ],
)
def test_mismatches_are_refused(version, gpu, message):
    with pytest.raises(DllmError, match=message):
        check_compatible(INFO, version, gpu)


def test_a_directory_without_build_info_is_refused(tmp_path):
    with pytest.raises(DllmError, match="no build_info.json; pass a directory written by 'dllm-trt build'"):
        read_build_info(tmp_path)
