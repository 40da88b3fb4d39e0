"""benchmarks/gpu_check.sh fits the device tool (one command ≤ 600 s, ~15 min of device time a session) and writes
its report as it goes: checked here without a GPU (syntax, the sum of its time limits, the no-CUDA exit)."""

import re
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses_and_its_time_limits_fit_one_device_command():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    sections = [int(s) for s in re.findall(r"section \w+ (\d+) ", text)]
    plain = [int(s) for s in re.findall(r"timeout --kill-after=5 (\d+) ", text)]  # setup steps
    assert len(sections) == 4 and len(plain) == 2
    grace = 5 * (len(sections) + len(plain))  # --kill-after=5 on each
    assert sum(sections) + sum(plain) + grace < 540, (sections, plain)


def test_gpu_check_without_cuda_leaves_a_report_saying_so(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# Accelerator check") and "No CUDA device" in report
