"""What the tests of the command-line tools share: paths, running a tool as a user does, a free port.

Tools run as subprocesses with one OpenMP thread each: on a machine whose cores are busy with
other work a process's threads keep waiting for each other, and one thread is then several
times faster (a two-iteration run: 14 s against 50 s). Every run of a comparison uses the
same setting, so results stay comparable. OMP_NUM_THREADS in the environment overrides it.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'
DEMO = ROOT / 'configs' / 'demo'
DEMO_CONFIGS = {
    'retinanet': DEMO / 'retinanet_pvt_v2_b0_synthetic.py',
    'mask_rcnn': DEMO / 'mask_rcnn_pvt_v2_b0_synthetic.py',
    'fpn': DEMO / 'fpn_pvt_v2_b0_synthetic.py',
}


def run_tool(args: list, cwd: Path, env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``tools/...`` with the tests' interpreter (``.sh`` scripts with bash), output captured.

    tests/ is on PYTHONPATH so that configs can import test-only hooks (tests/crash_hook.py).
    """
    cmd = ['bash' if str(args[0]).endswith('.sh') else sys.executable, *map(str, args)]
    full_env = {**os.environ, 'PYTHON': sys.executable, 'PYTHONPATH': str(Path(__file__).parent),
                'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
