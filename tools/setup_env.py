"""Sets up the environment mmpvt runs in, says what it would do, and prepares offline installs.

    bash tools/setup_env.sh              # what `make setup` runs; idempotent
    bash tools/setup_env.sh --plan       # what it would do, one key=value per line; does nothing
    bash tools/setup_env.sh --download DIR [--python-version 3.12] [--target-freeze FILE]

The setup creates the virtual environment ``$VENV`` (default ``.venv``) holding torch, mmcv with
its compiled ops, mmengine, mmdet, mmsegmentation, timm, the test tools and mmpvt itself
(editable, with its C kernel). A second run checks each step and changes nothing.

**torch.** The interpreter ``$PYTHON`` (default ``python3``) makes the venv. When it already has
a torch in the supported range (a cluster module, a container), that torch is kept: the venv
sees the interpreter's packages (``--system-site-packages``, and its own site-packages where the
interpreter is itself a venv) and installs only what is missing. Otherwise torch 2.14.1 and
torchvision 0.29.1 are installed into the venv.

**mmcv 2.1.0.** PyPI has only its source, so it is compiled once and the wheel kept in
``$MMPVT_CACHE`` (default ``~/.cache/mmpvt``) under a key of mmcv's, torch's and Python's
versions and, for a CUDA build, nvcc's CUDA version and the architectures: later setups take
seconds. Its CUDA ops are built when torch is a CUDA build, nvcc is found (``$CUDA_HOME/bin``,
else ``PATH``), and a GPU is visible or ``MMPVT_CUDA=1`` asks for them; ``MMPVT_CUDA=0`` forces
the CPU build. The architectures are the visible GPUs', else ``TORCH_CUDA_ARCH_LIST``'s, else
``DEFAULT_CUDA_ARCH``. The source edits the build needs are ``MMCV_PATCHES``, each with its reason.

**Offline.** ``--download DIR`` writes every file the setup needs besides torch and torchvision
(mmcv's source, the stack and its dependencies as wheels for the target's Python and manylinux
x86_64, the build and test tools) and a manifest, ``wheelhouse.json``; with ``--target-freeze``
(the target's ``pip freeze``) what the target already has in a version that fits is left out.
``WHEELHOUSE=DIR`` makes the setup install only from DIR (``pip --no-index``), reusing the
interpreter's torch.

Standard library only: it runs before any package is installed, under any python3 >= 3.9.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROG = 'tools/setup_env.sh'

TORCH_VERSION = '2.14.1'
TORCHVISION_VERSION = '0.29.1'
# An interpreter's own torch is reused inside this range (inclusive): 2.14.1 is the suite's,
# 2.11 the GPU machines' (torch 2.11.0+cu130) that tools/device_check.sh runs on.
TORCH_SUPPORTED = ('2.11', '2.14.1')
MMCV_VERSION = '2.1.0'
# Without a visible GPU and without TORCH_CUDA_ARCH_LIST: A100 (8.0), the Ampere cards and,
# through binary compatibility, Ada (8.6), H100/H200 (9.0), and PTX that newer GPUs (Blackwell)
# compile at load time. CUDA 13 no longer targets anything older than Turing (7.5).
DEFAULT_CUDA_ARCH = '8.0;8.6;9.0+PTX'
# What mmcv's setup.py needs to build: pkg_resources (gone from setuptools >= 70's default
# install path for its setup.py), wheel, and ninja for a parallel build.
BUILD_REQUIREMENTS = ('setuptools>=60,<70', 'wheel', 'ninja')
# The stack beside torch, as requirements.txt pins it; mmcv's own runtime requirements are
# read from its source distribution.
REQUIREMENTS = ROOT / 'requirements.txt'
# Exporting (tools/deploy/export.py): installed by an online setup, left out of a wheelhouse
# (the GPU check does not export, and onnx and onnxruntime alone are some 35 MB of wheels).
DEPLOY_REQUIREMENTS = ROOT / 'requirements-deploy.txt'
# One compiler process of mmcv's CUDA build peaks at about 2.9 GB: no more parallel jobs
# than the memory holds.
GB_PER_BUILD_JOB = 3
MANIFEST = 'wheelhouse.json'
# Distributions that provide the same module (cv2): any of them satisfies the others.
ALIASES = [frozenset({'opencv-python', 'opencv-python-headless', 'opencv-contrib-python',
                      'opencv-contrib-python-headless'})]
# The target's own, never in a wheelhouse: the setup reuses the interpreter's.
TARGET_OWNS = ('torch', 'torchvision')


# Source edits mmcv 2.1.0 needs, applied to the unpacked source distribution before the
# build: (file, pattern, replacement, why). Each must match, or the build stops: a source
# that changed under a patch is not built half-patched.
MMCV_PATCHES = [
    ('setup.py', r'-std=c\+\+1[47]', '-std=c++20',
     "torch >= 2.10's headers require C++20 ('#error C++20 or later compatible compiler is "
     "required to use ATen'); mmcv 2.1.0 passes -std=c++14/17 to the C++ compiler and to nvcc"),
]


class SetupError(Exception):
    """A setup that cannot go on: the message says what is wrong and what to do."""


def say(message: str) -> None:
    print(f'\n==> [setup] {message}', flush=True)


def note(message: str) -> None:
    print(f'[setup] {message}', flush=True)


def run(cmd: Sequence[str | os.PathLike], env: dict | None = None, cwd: Path | None = None,
        quiet: bool = False) -> subprocess.CompletedProcess:
    """Runs ``cmd``; raises SetupError naming it when it fails (its output is above)."""
    cmd = [str(c) for c in cmd]
    done = subprocess.run(cmd, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None)
    if done.returncode != 0:
        shown = (done.stdout or '')[-4000:] if quiet else ''
        raise SetupError(f'{shlex.join(cmd)} failed (exit status {done.returncode})'
                         + (f':\n{shown}' if shown else '; its output is above'))
    return done


# -- versions ---------------------------------------------------------------------------------------
def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version, without pre/post/local parts: '2.11.0+cu130' -> (2, 11, 0)."""
    numbers = re.match(r'\d+(?:\.\d+)*', version)
    if numbers is None:
        raise ValueError(f'not a version: {version!r}')
    parts = tuple(int(n) for n in numbers[0].split('.'))
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def torch_supported(version: str) -> bool:
    """Whether an interpreter's torch ``version`` is in TORCH_SUPPORTED (inclusive)."""
    low, high = (release(v) for v in TORCH_SUPPORTED)
    return low <= release(version) <= high


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r'[-_.]+', '-', name).lower()


# -- what an interpreter has ------------------------------------------------------------------------
# Run by an interpreter: its Python, its torch (and what torch sees), torchvision, mmcv.
PROBE = r'''
import json, os, site, sys
import importlib.metadata as md
info = dict(executable=sys.executable, version='%d.%d.%d' % sys.version_info[:3],
            tag='cp%d%d' % sys.version_info[:2], in_venv=sys.prefix != sys.base_prefix,
            site_packages=[p for p in site.getsitepackages() if p.startswith(sys.prefix)])
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
info.update(torchvision=version('torchvision'), mmcv=version('mmcv'), torch=None, torch_cuda=None, gpus=[])
try:
    import torch
except Exception as exc:
    info['torch_error'] = f'{type(exc).__name__}: {exc}'
else:
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                torch_dir=os.path.dirname(torch.__file__))
    try:
        if torch.cuda.is_available():
            info['gpus'] = ['%d.%d' % torch.cuda.get_device_capability(i)
                            for i in range(torch.cuda.device_count())]
    except Exception as exc:
        info['gpu_error'] = f'{type(exc).__name__}: {exc}'
print(json.dumps(info))
'''


def probe(python: str | Path) -> dict:
    """What ``python`` has (PROBE); raises SetupError when it does not run."""
    try:
        done = subprocess.run([str(python), '-c', PROBE], capture_output=True, text=True)
    except OSError as exc:
        raise SetupError(f'cannot run the interpreter {python}: {exc}') from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ['no output'])[-1]
        raise SetupError(f'the interpreter {python} does not run: {last}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def visible_gpus_without_torch() -> list[str]:
    """Compute capabilities of the GPUs nvidia-smi lists (for a machine whose torch is not
    installed yet)."""
    if not shutil.which('nvidia-smi'):
        return []
    done = subprocess.run(['nvidia-smi', '--query-gpu=compute_cap', '--format=csv,noheader'],
                          capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if re.fullmatch(r'\d+\.\d+', line.strip())] \
        if done.returncode == 0 else []


@dataclass(frozen=True)
class Nvcc:
    path: str
    version: str  # e.g. '13.0'


def find_nvcc(env: dict) -> Nvcc | None:
    """nvcc in ``$CUDA_HOME/bin`` when CUDA_HOME is set, else on PATH; None if neither has one."""
    home = env.get('CUDA_HOME') or env.get('CUDA_PATH')
    if home:
        candidate = Path(home) / 'bin' / 'nvcc'
        path = str(candidate) if os.access(candidate, os.X_OK) else None
    else:
        path = shutil.which('nvcc', path=env.get('PATH', ''))
    if path is None:
        return None
    done = subprocess.run([path, '--version'], capture_output=True, text=True)
    found = re.search(r'release (\d+\.\d+)', done.stdout)
    return Nvcc(path, found[1]) if done.returncode == 0 and found else None


def toolkit_root(nvcc_path: str) -> Path:
    """The root of the CUDA toolkit an nvcc belongs to: the directory above its own, unless that
    nvcc is a wrapper elsewhere (a script in /usr/local/bin that execs the toolkit's nvcc, as on
    this project's build machines), then the root nvcc itself reports (``TOP`` in ``nvcc
    --dryrun``). torch's extension builder takes CUDA_HOME's include directory for the C++
    files that include CUDA's headers: /usr/local's fails with "crt/host_defines.h: No such
    file or directory"."""
    root = Path(nvcc_path).resolve().parents[1]
    if (root / 'include' / 'cuda_runtime_api.h').is_file():
        return root
    try:
        done = subprocess.run([nvcc_path, '--dryrun', '-x', 'cu', '-c', os.devnull, '-o', os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return root
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith('#$ TOP='):
            return Path(line.split('=', 1)[1].strip().strip('"')).resolve()
    return root


def cuda_include_path(nvcc: Nvcc, torch_dir: str | None) -> str | None:
    """Where the cuBLAS/cuSPARSE/cuSOLVER headers torch's ATen includes lie, when the
    toolkit's include directory lacks them (a toolkit installed without its math libraries'
    headers; torch's pip packages carry them): the directory for CUDA_INC_PATH, which torch's
    extension builder adds to the include path, or None when the toolkit has them."""
    headers = ('cusparse.h', 'cublas_v2.h', 'cusolverDn.h')
    toolkit = toolkit_root(nvcc.path) / 'include'
    if all((toolkit / h).is_file() for h in headers):
        return None
    if torch_dir:
        major = nvcc.version.split('.')[0]
        for candidate in [Path(torch_dir).parent / 'nvidia' / f'cu{major}' / 'include',
                          *sorted((Path(torch_dir).parent / 'nvidia').glob('cu*/include'))]:
            if all((candidate / h).is_file() for h in headers):
                return str(candidate)
    missing = [h for h in headers if not (toolkit / h).is_file()]
    raise SetupError(f'the CUDA toolkit of {nvcc.path} has no {", ".join(missing)} (torch\'s headers include '
                     f'them) and torch\'s nvidia packages do not carry them either: install the toolkit\'s '
                     'cuBLAS, cuSPARSE and cuSOLVER development headers, or build without CUDA ops '
                     '(MMPVT_CUDA=0)')


# -- the CUDA decision ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CudaDecision:
    build: bool          # build mmcv's CUDA ops
    why: str             # one sentence
    arch: str | None = None
    warning: str | None = None  # one line the setup prints (a GPU that will not get CUDA ops)


def decide_cuda(torch_version: str | None, torch_cuda: str | None, gpus: Sequence[str], nvcc: Nvcc | None,
                env: dict) -> CudaDecision:
    """Whether mmcv gets its CUDA ops, and for which architectures.

    ``torch_cuda`` is torch's CUDA version (None: a CPU build; 'unknown': torch is yet to be
    installed); ``gpus`` the visible GPUs' compute capabilities. Raises SetupError where
    ``MMPVT_CUDA=1`` asks for what cannot be built.
    """
    asked = env.get('MMPVT_CUDA', '')
    if asked not in ('', '0', '1'):
        raise SetupError(f'MMPVT_CUDA={asked!r}: expected 1 (build mmcv\'s CUDA ops), 0 (the CPU build) '
                         'or unset')
    if asked == '0':
        return CudaDecision(False, 'MMPVT_CUDA=0 asks for the CPU build')
    if torch_cuda is None:
        if asked == '1':
            raise SetupError(f'MMPVT_CUDA=1 asks for mmcv\'s CUDA ops, but torch {torch_version} is a CPU '
                             'build: use a CUDA build of torch, or unset MMPVT_CUDA')
        return CudaDecision(False, f'torch {torch_version} is a CPU build')
    if not gpus and asked != '1':
        return CudaDecision(False, 'no GPU is visible; MMPVT_CUDA=1 builds the CUDA ops anyway (e.g. on a '
                                   'login node, for the GPU nodes)')
    problem = None
    if nvcc is None:
        where = f'CUDA_HOME={env["CUDA_HOME"]} has no bin/nvcc' if env.get('CUDA_HOME') else 'none on PATH'
        problem = (f'no nvcc was found ({where}) to build for torch {torch_version}\'s CUDA {torch_cuda}: '
                   f'install the CUDA {torch_cuda} toolkit (or load its module) and set CUDA_HOME to it')
    elif torch_cuda != 'unknown' and nvcc.version.split('.')[0] != torch_cuda.split('.')[0]:
        problem = (f'nvcc {nvcc.path} is CUDA {nvcc.version} and torch {torch_version} is built for CUDA '
                   f"{torch_cuda} (torch's extension builder refuses another major version): set CUDA_HOME "
                   f'to a CUDA {torch_cuda.split(".")[0]}.x toolkit')
    if problem:
        if asked == '1':
            raise SetupError(f'MMPVT_CUDA=1 asks for mmcv\'s CUDA ops, but {problem}')
        return CudaDecision(False, problem, warning=(
            f'warning: a GPU is visible, but {problem}. The CPU build of mmcv is used: mmdet\'s detectors '
            '(NMS, RoIAlign, the focal loss) will not run on the GPU'))
    if gpus:
        arch, source = ';'.join(sorted(set(gpus), key=release)), 'the visible GPUs'
    elif env.get('TORCH_CUDA_ARCH_LIST'):
        arch, source = env['TORCH_CUDA_ARCH_LIST'], 'TORCH_CUDA_ARCH_LIST'
    else:
        arch, source = DEFAULT_CUDA_ARCH, 'the default'
    arch = ';'.join(arch.replace(',', ' ').replace(';', ' ').split())
    reason = 'a GPU is visible' if gpus else 'MMPVT_CUDA=1 asks for them'
    unknown = ' (if torch, yet to be installed, is a CUDA build)' if torch_cuda == 'unknown' else ''
    return CudaDecision(True, f'{reason}{unknown}; architectures {arch} from {source}', arch)


def mmcv_key(torch_version: str, python_tag: str, cuda: CudaDecision, nvcc: Nvcc | None) -> str:
    """The wheel cache's key: what makes one mmcv build differ from another."""
    key = f'mmcv-{MMCV_VERSION}-torch{torch_version}-{python_tag}'
    if not cuda.build:
        return f'{key}-cpu'
    arch = '-'.join('sm' + a.lower().replace('.', '').replace('+ptx', '+ptx') for a in cuda.arch.split(';'))
    return f'{key}-cuda{nvcc.version}-{arch}'


# -- the plan ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    python: str
    python_version: str
    python_tag: str
    venv: Path
    torch: str
    torch_source: str    # 'present' (in the venv), 'reused' (the interpreter's) or 'installed'
    torch_cuda: str | None
    torch_dir: str | None
    cuda: CudaDecision
    nvcc: Nvcc | None
    wheelhouse: Path | None
    cache: Path
    key: str
    system_site: bool = False
    chain: list[str] = field(default_factory=list)   # the interpreter's site-packages, when it is a venv
    venv_info: dict | None = None
    error: str | None = None   # why the setup would stop
    torch_note: str = ''       # why the interpreter's torch is not reused

    @property
    def wheel_dir(self) -> Path:
        return self.cache / 'wheels' / self.key

    def cached_wheel(self) -> Path | None:
        wheels = sorted(self.wheel_dir.glob('mmcv-*.whl'))
        return wheels[0] if wheels else None

    def lines(self) -> list[str]:
        """The ``--plan`` output: one key=value per line; a value's first word is the answer."""
        where = {'present': f'present in {self.venv}', 'reused': f'reused from {self.python}',
                 'installed': 'installed from the package index'}
        nvcc = f'{self.nvcc.path} (CUDA {self.nvcc.version})' if self.nvcc else 'none'
        wheel = self.cached_wheel()
        return [
            f'python={self.python} ({self.python_version})',
            f'venv={self.venv} ({"exists" if self.venv_info else "to be created"}'
            + (', with the interpreter\'s packages' if self.system_site and not self.venv_info else '') + ')',
            f'torch={self.torch} ({where[self.torch_source]}; supported {TORCH_SUPPORTED[0]} to '
            f'{TORCH_SUPPORTED[1]}{self.torch_note})',
            f'torch_cuda={self.torch_cuda or "none"}',
            f'mmcv_cuda={int(self.cuda.build)} ({self.cuda.why})',
            f'cuda_arch={self.cuda.arch or "none"}',
            f'nvcc={nvcc}',
            f'wheelhouse={self.wheelhouse or "none"}',
            f'mmcv_wheel={wheel or "build"}' + ('' if wheel else f' (into {self.wheel_dir})'),
            *([f'error={self.error}'] if self.error else []),
        ]


def make_plan(env: dict) -> Plan:
    """What the setup would do here, decided without changing anything."""
    python = sys.executable
    venv = Path(env.get('VENV') or ROOT / '.venv').absolute()
    cache_home = Path(env.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    cache = Path(env.get('MMPVT_CACHE') or cache_home / 'mmpvt')
    wheelhouse = Path(env['WHEELHOUSE']).absolute() if env.get('WHEELHOUSE') else None
    if wheelhouse is not None and not (wheelhouse / MANIFEST).is_file():
        raise SetupError(f'WHEELHOUSE={wheelhouse} is not a wheelhouse: it has no {MANIFEST} '
                         f'(make one with: bash {PROG} --download DIR)')
    base = probe(python)
    venv_python = venv / 'bin' / 'python'
    venv_info = probe(venv_python) if venv_python.exists() else None
    system_site, chain, torch_note = False, [], ''
    if venv_info and venv_info['torch']:
        source, info = 'present', venv_info
    elif not venv_info and base['torch'] and torch_supported(base['torch']):
        source, info, system_site = 'reused', base, True
        chain = base['site_packages'] if base['in_venv'] else []
        if not base['torchvision']:
            raise SetupError(f'{python} has torch {base["torch"]} but no torchvision, which timm needs: '
                             f'install the torchvision release made for torch {base["torch"]} beside it')
    elif wheelhouse is not None:
        have = (f'torch {base["torch"]}, outside the supported {TORCH_SUPPORTED[0]} to {TORCH_SUPPORTED[1]}'
                if base['torch'] else 'no torch')
        raise SetupError(f'a wheelhouse holds no torch: the setup reuses the interpreter\'s, and {python} '
                         f'has {have} (set PYTHON to an interpreter with a supported torch)')
    else:
        if base['torch'] and not venv_info:
            torch_note = f'; {python}\'s torch {base["torch"]} is outside that range'
        source, info = 'installed', None
    if info is not None:
        torch_version, torch_cuda = info['torch'], info['torch_cuda']
        gpus, torch_dir = info['gpus'], info['torch_dir']
    else:
        torch_version, torch_cuda, torch_dir = TORCH_VERSION, 'unknown', None
        gpus = visible_gpus_without_torch()
    nvcc = find_nvcc(env)
    try:
        cuda, error = decide_cuda(torch_version, torch_cuda, gpus, nvcc, env), None
    except SetupError as exc:  # --plan still answers; the setup stops with it
        cuda, error = CudaDecision(False, 'the setup stops: see error'), str(exc)
    tag = (venv_info or base)['tag']
    return Plan(python=python, python_version=base['version'], python_tag=tag, venv=venv, torch=torch_version,
                torch_source=source, torch_cuda=torch_cuda, torch_dir=torch_dir, cuda=cuda, nvcc=nvcc,
                wheelhouse=wheelhouse, cache=cache, key=mmcv_key(torch_version, tag, cuda, nvcc),
                system_site=system_site, chain=chain, venv_info=venv_info, error=error, torch_note=torch_note)


# -- the setup --------------------------------------------------------------------------------------
def pip(plan: Plan) -> list[str]:
    return [str(plan.venv / 'bin' / 'python'), '-m', 'pip', '--disable-pip-version-check']


def offline(plan: Plan) -> list[str]:
    """pip install's options that keep it to the wheelhouse."""
    return ['--no-index', '--find-links', str(plan.wheelhouse)] if plan.wheelhouse else []


def create_venv(plan: Plan) -> None:
    if plan.venv_info:
        return
    reuse = f' (with the packages of {plan.python}: its torch {plan.torch} is reused)'
    say(f'create the virtual environment {plan.venv}' + (reuse if plan.system_site else ''))
    run([plan.python, '-m', 'venv', *(['--system-site-packages'] if plan.system_site else []), plan.venv])
    if plan.chain:
        # An interpreter that is itself a venv: --system-site-packages reaches only its base
        # installation, so its own site-packages are added after the venv's (their .pth files
        # processed too, as site does for a site directory).
        site_dir = Path(probe(plan.venv / 'bin' / 'python')['site_packages'][0])
        lines = [f'import site; site.addsitedir({path!r})' for path in plan.chain]
        (site_dir / '_mmpvt_base_interpreter.pth').write_text('\n'.join(lines) + '\n')
    plan.venv_info = probe(plan.venv / 'bin' / 'python')


def install_torch(plan: Plan) -> None:
    if plan.torch_source != 'installed':
        return
    say(f'torch {TORCH_VERSION} + torchvision {TORCHVISION_VERSION} (about 1 minute)' + plan.torch_note)
    run([*pip(plan), 'install', '-q', f'torch=={TORCH_VERSION}', f'torchvision=={TORCHVISION_VERSION}'])
    info = probe(plan.venv / 'bin' / 'python')
    plan.venv_info, plan.torch, plan.torch_cuda = info, info['torch'], info['torch_cuda']
    plan.torch_dir = info['torch_dir']
    plan.torch_source = 'present'
    plan.cuda = decide_cuda(plan.torch, plan.torch_cuda, info['gpus'], plan.nvcc, dict(os.environ))
    plan.key = mmcv_key(plan.torch, plan.python_tag, plan.cuda, plan.nvcc)


def build_jobs(env: dict) -> int:
    """MAX_JOBS, else one job per core, no more than the memory holds."""
    if env.get('MAX_JOBS'):
        if not env['MAX_JOBS'].isdigit() or int(env['MAX_JOBS']) < 1:
            raise SetupError(f'MAX_JOBS={env["MAX_JOBS"]!r}: expected a number of compiler processes, '
                             'at least 1')
        return int(env['MAX_JOBS'])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    try:
        meminfo = Path('/proc/meminfo').read_text()
        available = int(re.search(r'MemAvailable:\s+(\d+) kB', meminfo)[1]) / 2 ** 20
    except (OSError, TypeError):
        return cores
    return max(1, min(cores, int(available // GB_PER_BUILD_JOB)))


def patch_mmcv(source: Path) -> None:
    """Applies MMCV_PATCHES to an unpacked mmcv source distribution."""
    for name, pattern, replacement, why in MMCV_PATCHES:
        path = source / name
        text, count = re.subn(pattern, replacement, path.read_text())
        if count == 0:
            raise SetupError(f'mmcv {MMCV_VERSION}\'s {name} has no {pattern!r} to patch ({why}): '
                             'the source is not the one this setup was written for')
        path.write_text(text)
        note(f'patched {name}: {count} x {pattern!r} -> {replacement!r} ({why})')


def mmcv_sdist(plan: Plan, into: Path) -> Path:
    """mmcv's source distribution: the wheelhouse's, or downloaded from the package index."""
    if plan.wheelhouse:
        return wheelhouse_file(plan.wheelhouse, lambda f: f['role'] == 'mmcv-source')
    # pip prepares the metadata of what it downloads: mmcv's setup.py needs the build
    # requirements installed in the venv (no isolation) to do so.
    run([*pip(plan), 'download', '-q', '--no-deps', '--no-build-isolation', '--no-binary', ':all:',
         f'mmcv=={MMCV_VERSION}', '-d', into])
    return next(into.glob(f'mmcv-{MMCV_VERSION}.tar.gz'))


def build_mmcv(plan: Plan) -> Path:
    """Compiles mmcv into the cache; returns the wheel."""
    what = (f'with CUDA {plan.nvcc.version} ops for {plan.cuda.arch}' if plan.cuda.build else 'CPU ops only')
    jobs = build_jobs(os.environ)
    say(f'mmcv {MMCV_VERSION} ({what}): compiling from its source into {plan.wheel_dir} with {jobs} jobs '
        '(CPU: about 10 minutes on 2 cores; CUDA: about 4,300 CPU-seconds per architecture; later setups '
        'reuse the wheel)')
    run([*pip(plan), 'install', '-q', *offline(plan), *BUILD_REQUIREMENTS])
    env = {**os.environ, 'MMCV_WITH_OPS': '1', 'MAX_JOBS': str(jobs), 'FORCE_CUDA': str(int(plan.cuda.build))}
    if plan.cuda.build:
        env.update(TORCH_CUDA_ARCH_LIST=plan.cuda.arch,
                   CUDA_HOME=str(toolkit_root(plan.nvcc.path)))
        include = cuda_include_path(plan.nvcc, plan.torch_dir)
        if include:
            env['CUDA_INC_PATH'] = include
            note(f'CUDA_INC_PATH={include} (the toolkit lacks the cuBLAS/cuSPARSE/cuSOLVER headers torch '
                 'includes)')
    else:
        # mmcv's setup.py takes the CUDA path whenever torch sees a GPU, whatever FORCE_CUDA
        # says: hide the GPUs from the build.
        env['CUDA_VISIBLE_DEVICES'] = ''
    with tempfile.TemporaryDirectory(prefix='mmcv-build-') as tmp:
        sdist = mmcv_sdist(plan, Path(tmp))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp)
        source = Path(tmp) / f'mmcv-{MMCV_VERSION}'
        patch_mmcv(source)
        partial = plan.wheel_dir.with_name(plan.wheel_dir.name + '.partial')
        shutil.rmtree(partial, ignore_errors=True)
        start = time.monotonic()
        run([*pip(plan), 'wheel', '--no-deps', '--no-build-isolation', *offline(plan), '.', '-w', partial],
            env=env, cwd=source)
        minutes, seconds = divmod(round(time.monotonic() - start), 60)
        plan.wheel_dir.mkdir(parents=True, exist_ok=True)
        wheel = next(partial.glob('mmcv-*.whl'))
        shutil.move(str(wheel), plan.wheel_dir / wheel.name)
        shutil.rmtree(partial)
    note(f'mmcv built in {minutes} min {seconds} s ({jobs} jobs): {plan.wheel_dir / wheel.name}')
    return plan.wheel_dir / wheel.name


MMCV_CHECK = '''
import sys, mmcv
from mmcv.ops import nms, RoIAlign, get_compiling_cuda_version
print(get_compiling_cuda_version())
sys.exit(mmcv.__version__ != sys.argv[1])
'''


def install_mmcv(plan: Plan) -> None:
    marker = plan.venv / 'mmpvt-mmcv-build'   # the key of the installed build
    python = str(plan.venv / 'bin' / 'python')
    installed = marker.is_file() and marker.read_text().strip() == plan.key
    if installed and subprocess.run([python, '-c', MMCV_CHECK, MMCV_VERSION],
                                    capture_output=True).returncode == 0:
        return
    if plan.cuda.warning:
        print(plan.cuda.warning, flush=True)
    wheel = plan.cached_wheel() or build_mmcv(plan)
    say(f'mmcv {MMCV_VERSION}: installing {wheel}')
    run([*pip(plan), 'install', '-q', '--no-deps', '--force-reinstall', *offline(plan), wheel])
    marker.write_text(plan.key + '\n')


STACK_CHECK = '''
import importlib.metadata as m, sys
want = {'mmengine': '0.10.7', 'mmdet': '3.3.0', 'mmsegmentation': '1.2.2'}
sys.exit(any(m.version(k) != v for k, v in want.items())
         or not 77 <= int(m.version('setuptools').split('.')[0]) < 81)
import timm, ftfy, regex, pycocotools, pytest, xdist, matplotlib, pkg_resources
'''
DEPLOY_CHECK = 'import onnx, onnxruntime, onnxscript\n'


def install_stack(plan: Plan) -> None:
    python = str(plan.venv / 'bin' / 'python')
    check = STACK_CHECK if plan.wheelhouse else STACK_CHECK + DEPLOY_CHECK
    if subprocess.run([python, '-c', check], capture_output=True).returncode == 0:
        return
    say('the OpenMMLab stack, timm, the test tools' + ('' if plan.wheelhouse else ' and the exporters'))
    if plan.wheelhouse:
        install_from_wheelhouse(plan)
    else:
        run([*pip(plan), 'install', '-q', '-r', REQUIREMENTS, '-r', DEPLOY_REQUIREMENTS])


# Whether mmpvt is installed from this checkout with its kernel built from the current
# sources (checked from outside the repository: the working directory would shadow a missing
# install).
MMPVT_CHECK = '''
import sys
from pathlib import Path
import mmpvt
from mmpvt.ops import dwconv_gelu
built = sorted(Path(dwconv_gelu.__file__).parent.glob("_dwconv_gelu*.so"))
sources = Path(sys.argv[1], "mmpvt", "ops", "csrc").iterdir()
sys.exit(not mmpvt.__file__.startswith(sys.argv[1]) or not dwconv_gelu.available()
         or max(p.stat().st_mtime for p in sources) > built[0].stat().st_mtime)
'''


def install_mmpvt(plan: Plan) -> None:
    python = str(plan.venv / 'bin' / 'python')
    if subprocess.run([python, '-c', MMPVT_CHECK, str(ROOT)], capture_output=True, cwd='/').returncode == 0:
        return
    say('mmpvt in editable mode, with its compiled kernel')
    run([*pip(plan), 'install', '-q', '--no-deps', '--no-build-isolation', *offline(plan), '-e', ROOT])


FINAL_CHECK = '''
import torch, mmcv, mmengine, mmdet, mmseg, timm, mmpvt
from mmcv.ops import nms, RoIAlign, get_compiling_cuda_version
cuda = get_compiling_cuda_version()
ops = f'CUDA {cuda} ops' if cuda not in ('not available', '') else 'CPU ops only (no CUDA ops)'
print(f'[setup] ready: torch {torch.__version__} (CUDA {torch.version.cuda or "none"}), '
      f'mmcv {mmcv.__version__} with {ops}, mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, '
      f'mmseg {mmseg.__version__}, '
      f'timm {timm.__version__}, mmpvt {mmpvt.__version__}')
'''


def setup(env: dict) -> None:
    plan = make_plan(env)
    if plan.error:
        raise SetupError(plan.error)
    if plan.wheelhouse:
        check_wheelhouse(plan)
    create_venv(plan)
    install_torch(plan)
    install_mmcv(plan)
    install_stack(plan)
    install_mmpvt(plan)
    done = subprocess.run([str(plan.venv / 'bin' / 'python'), '-c', FINAL_CHECK], cwd='/', text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise SetupError(f'the final check failed:\n{done.stderr.strip()[-3000:]}')
    print(done.stdout.strip().splitlines()[-1], flush=True)


# -- the wheelhouse ---------------------------------------------------------------------------------
def _packaging():
    """packaging's requirements and versions: the interpreter's, else the copy pip carries."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def read_freeze(path: Path) -> dict[str, str | None]:
    """A ``pip freeze`` file: canonical name -> version (None: present, version unknown)."""
    return read_freeze_lines(path.read_text().splitlines(), str(path))


def read_freeze_lines(lines: Sequence[str], source: str = 'freeze') -> dict[str, str | None]:
    """``pip freeze`` lines (``name==version``, a bare name, ``name @ url``; comments and
    ``-e`` lines skipped): canonical name -> version (None: present, version unknown)."""
    present: dict[str, str | None] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split('#', 1)[0].strip()
        if not line or line.startswith('-'):
            continue
        if m := re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)\s*===?\s*(\S+)', line):
            present[canonical(m[1])] = m[2]
        elif m := re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)(\s*@.*)?', line):
            present[canonical(m[1])] = None
        else:
            raise SetupError(f'{source}:{number}: {raw!r} is neither name==version nor a bare name')
    for group in ALIASES:  # one of them present: all are
        found = [name for name in group if name in present]
        for name in group - set(found):
            if found:
                present[name] = present[found[0]]
    return present


def target_environment(python_version: str) -> dict:
    """The marker environment of a CPython ``python_version`` on Linux x86_64."""
    major_minor = '.'.join(python_version.split('.')[:2])
    return dict(python_version=major_minor, python_full_version=f'{major_minor}.0', os_name='posix',
                sys_platform='linux', platform_system='Linux', platform_machine='x86_64',
                platform_python_implementation='CPython', implementation_name='cpython',
                implementation_version=f'{major_minor}.0', platform_release='', platform_version='', extra='')


def platform_tags(glibc: str) -> list[str]:
    """pip's --platform tags for manylinux x86_64 wheels up to glibc ``glibc``."""
    top = int(glibc.split('.')[1])
    tags = [f'manylinux_2_{minor}_x86_64' for minor in range(top, 4, -1)]
    return tags + ['manylinux2014_x86_64', 'manylinux2010_x86_64', 'manylinux1_x86_64', 'linux_x86_64']


def resolve(requirements: Sequence[str], python_version: str, glibc: str, work: Path) -> list[dict]:
    """What pip would install for ``requirements`` on the target: the report's entries
    (name, version, requires_dist, url), resolved without downloading the distributions."""
    report = work / 'report.json'
    requirements_file = work / 'requirements.txt'
    requirements_file.write_text('\n'.join(requirements) + '\n')
    cmd = [sys.executable, '-m', 'pip', '--disable-pip-version-check', 'install', '--dry-run', '--quiet',
           '--ignore-installed', '--only-binary=:all:', '--implementation', 'cp',
           '--python-version', python_version,
           *[arg for tag in platform_tags(glibc) for arg in ('--platform', tag)],
           '--target', str(work / 'target'), '--report', str(report), '-r', str(requirements_file)]
    run(cmd, quiet=True)
    return [item['metadata'] for item in json.loads(report.read_text())['install']]


def needed(roots: Sequence[str], resolved: Sequence[dict], present: dict[str, str | None],
           python_version: str) -> tuple[list[dict], dict[str, str]]:
    """What the wheelhouse must carry: the resolved distributions reachable from ``roots``,
    not walking into TARGET_OWNS nor into what the target already has in a version that every
    requirement of the installed set accepts (what stays on the target keeps its own
    dependencies). Returns them and the left-out ones (name -> the target's version)."""
    Requirement, Version = _packaging()
    environment = target_environment(python_version)
    by_name = {canonical(meta['name']): meta for meta in resolved}
    requires: dict[str, list] = {}
    for name, meta in by_name.items():
        for text in meta.get('requires_dist') or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                requires.setdefault(name, []).append(requirement)
    root_requirements = [Requirement(text) for text in roots]

    def walk(installed: set[str]) -> tuple[list[dict], dict[str, str]]:
        specifiers: dict[str, list] = {}
        for requirement in root_requirements + [r for n in installed for r in requires.get(n, [])]:
            specifiers.setdefault(canonical(requirement.name), []).append(requirement.specifier)

        def fits(name: str) -> bool:
            if name not in present:
                return False
            version = present[name]
            return version is None or all(spec.contains(Version(version), prereleases=True)
                                          for spec in specifiers.get(name, []))

        keep, left_out, seen = [], {}, set()
        stack = [canonical(r.name) for r in root_requirements]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in TARGET_OWNS or fits(name):
                left_out[name] = present.get(name) or ("the target's" if name in TARGET_OWNS else 'any')
                continue
            if name not in by_name:
                raise SetupError(f'{name} is required but pip resolved no distribution for it')
            keep.append(by_name[name])
            stack.extend(canonical(r.name) for r in requires.get(name, []))
        return keep, left_out

    # Each carried distribution's requirements can make a present one unfit: walk again until
    # the carried set stays the same (it only grows, so this ends).
    installed: set[str] = set()
    while True:
        keep, left_out = walk(installed)
        names = {canonical(m['name']) for m in keep}
        if names == installed:
            return sorted(keep, key=lambda m: canonical(m['name'])), dict(sorted(left_out.items()))
        installed = names


def mmcv_runtime_requirements(sdist: Path) -> list[str]:
    """mmcv's runtime requirements, from its source (its setup.py chooses opencv-python or the
    headless build by what is installed; either satisfies it, see ALIASES)."""
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(f'mmcv-{MMCV_VERSION}/requirements/runtime.txt')
        lines = member.read().decode().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith('#')]
    return requirements + ['opencv-python>=3']


def download(plan_args: argparse.Namespace) -> None:
    """``--download DIR``: the wheelhouse for an offline setup, and its manifest."""
    out = Path(plan_args.download).absolute()
    out.mkdir(parents=True, exist_ok=True)
    python_version = plan_args.python_version
    present = read_freeze(Path(plan_args.target_freeze)) if plan_args.target_freeze else {}
    pins = [f'{name}=={release_text(present[name])}' for name in TARGET_OWNS if present.get(name)]
    pip_download = [sys.executable, '-m', 'pip', '--disable-pip-version-check', 'download', '--quiet',
                    '--no-deps', '-d', str(out)]
    binary = ['--only-binary=:all:', '--implementation', 'cp', '--python-version', python_version,
              *[arg for tag in platform_tags(plan_args.glibc) for arg in ('--platform', tag)]]
    files = []
    with tempfile.TemporaryDirectory(prefix='wheelhouse-') as tmp:
        work = Path(tmp)
        say(f'resolving the build tools for CPython {python_version}')
        build_roots = list(BUILD_REQUIREMENTS)
        build_meta, _ = needed(build_roots, resolve(build_roots, python_version, plan_args.glibc, work),
                               present, python_version)
        # mmcv's source: pip prepares its metadata, which needs setuptools < 70 (pkg_resources)
        # where the download runs; it gets one of its own.
        say(f'mmcv {MMCV_VERSION}\'s source distribution')
        tools = work / 'build-tools'
        run([sys.executable, '-m', 'pip', '--disable-pip-version-check', 'install', '--quiet',
             '--target', tools, 'setuptools>=60,<70', 'wheel'], quiet=True)
        run([*pip_download, '--no-binary', ':all:', '--no-build-isolation', f'mmcv=={MMCV_VERSION}'],
            env={**os.environ, 'PYTHONPATH': str(tools)}, quiet=True)
        sdist = out / f'mmcv-{MMCV_VERSION}.tar.gz'
        files.append(dict(file=sdist.name, name='mmcv', version=MMCV_VERSION, role='mmcv-source'))
        roots = [line.split('#', 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
        roots = [r for r in roots if r] + mmcv_runtime_requirements(sdist)
        say(f'resolving the stack for CPython {python_version}'
            + (f' beside the target\'s {", ".join(pins)}' if pins else ''))
        runtime_meta, left_out = needed(roots, resolve(roots + pins, python_version, plan_args.glibc, work),
                                        present, python_version)
        for role, metas in (('build', build_meta), ('runtime', runtime_meta)):
            say(f'downloading {len(metas)} {role} distributions into {out}')
            run([*pip_download, *binary, *[f'{m["name"]}=={m["version"]}' for m in metas]], quiet=True)
            for meta in metas:
                wheel = find_wheel(out, meta['name'], meta['version'])
                files.append(dict(file=wheel.name, name=canonical(meta['name']), version=meta['version'],
                                  role=role))
    for entry in files:
        entry['sha256'] = hashlib.sha256((out / entry['file']).read_bytes()).hexdigest()
    size = sum((out / name).stat().st_size for name in {f['file'] for f in files})
    manifest = dict(python_version=python_version, glibc=plan_args.glibc,
                    target_freeze=plan_args.target_freeze, bytes=size, files=files, left_out=left_out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
    note(f'wheelhouse {out}: {len(files)} files, {size / 2 ** 20:.1f} MiB; left out (the target has them): '
         + ', '.join(f'{k} {v}' for k, v in left_out.items()))
    note(f'on the target: WHEELHOUSE={out} PYTHON=/path/to/python3 make setup')


def release_text(version: str) -> str:
    """A version without its local part ('2.11.0+cu130' -> '2.11.0'): what an index holds."""
    return version.split('+', 1)[0]


def find_wheel(directory: Path, name: str, version: str) -> Path:
    stem = re.sub(r'[-_.]+', '_', name).lower()
    for path in directory.iterdir():
        parts = path.name.split('-')
        if path.suffix == '.whl' and len(parts) > 2 and re.sub(r'[-_.]+', '_', parts[0]).lower() == stem \
                and parts[1] == version:
            return path
    raise SetupError(f'pip downloaded no wheel of {name} {version} into {directory}')


def wheelhouse_file(directory: Path, choose) -> Path:
    manifest = json.loads((directory / MANIFEST).read_text())
    entry = next(f for f in manifest['files'] if choose(f))
    path = directory / entry['file']
    if not path.is_file():
        raise SetupError(f'the wheelhouse {directory} lacks {entry["file"]} (listed in its {MANIFEST})')
    return path


PRESENT_CHECK = '''
import importlib.metadata as m, json, sys
names = json.loads(sys.argv[1])
found = {}
for name in names:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
'''


def check_wheelhouse(plan: Plan) -> None:
    """Stops before anything is installed when the wheelhouse does not fit this machine: made
    for another Python, a file missing, or something it leaves out (the target had it) absent."""
    directory = plan.wheelhouse
    manifest = json.loads((directory / MANIFEST).read_text())
    ours = '.'.join(plan.python_version.split('.')[:2])
    if manifest['python_version'] != ours:
        raise SetupError(f'the wheelhouse {directory} was made for Python {manifest["python_version"]}, this '
                         f'interpreter is {ours}: make it with --python-version {ours}')
    wanted = [f for f in manifest['files'] if f['role'] != 'mmcv-source' or plan.cached_wheel() is None]
    missing = [f['file'] for f in wanted if not (directory / f['file']).is_file()]
    if missing:
        raise SetupError(f'the wheelhouse {directory} lacks {missing[0]} (listed in its {MANIFEST})'
                         + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
    expected = [name for name in manifest['left_out'] if name not in TARGET_OWNS]
    python = plan.venv / 'bin' / 'python' if plan.venv_info else plan.python
    asked = sorted({member for name in expected for member in aliases_of(name)})
    done = run([str(python), '-c', PRESENT_CHECK, json.dumps(asked)], quiet=True)
    absent = absent_names(expected, json.loads(done.stdout.strip().splitlines()[-1]))
    if absent:
        raise SetupError(f'the wheelhouse {directory} leaves out {", ".join(absent)} (its target had them), '
                         f'but {python} has none: make the wheelhouse with this machine\'s `pip freeze` as '
                         '--target-freeze')


def aliases_of(name: str) -> frozenset[str]:
    """``name`` and the distributions that provide the same module (ALIASES)."""
    return next((group for group in ALIASES if name in group), frozenset({name}))


def absent_names(expected: Sequence[str], found: dict[str, str | None]) -> list[str]:
    """Those of ``expected`` that no installed distribution provides (``found``: name ->
    installed version or None, for every alias of every expected name)."""
    return [name for name in expected if not any(found.get(member) for member in aliases_of(name))]


def install_from_wheelhouse(plan: Plan) -> None:
    """Installs the wheelhouse's runtime files: no index and no resolution, the manifest is the
    resolution made for this target (check_wheelhouse has checked that it fits)."""
    manifest = json.loads((plan.wheelhouse / MANIFEST).read_text())
    runtime = [plan.wheelhouse / f['file'] for f in manifest['files'] if f['role'] == 'runtime']
    run([*pip(plan), 'install', '-q', '--no-deps', *offline(plan), *runtime])


# -- the command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description='Sets up .venv with the OpenMMLab stack mmpvt runs on (what `make setup` '
        'runs). Environment: PYTHON, VENV, MMPVT_CACHE, MMPVT_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, '
        'WHEELHOUSE, MAX_JOBS.')
    parser.add_argument('--plan', action='store_true',
                        help='print what the setup would do, one key=value per line, and do nothing')
    parser.add_argument('--download', metavar='DIR', help='write a wheelhouse for an offline setup into DIR')
    parser.add_argument('--python-version', default='{}.{}'.format(*sys.version_info[:2]), metavar='X.Y',
                        help='with --download: the target\'s Python (default: this one\'s)')
    parser.add_argument('--target-freeze', metavar='FILE',
                        help='with --download: the target\'s `pip freeze`; what it has in a version that '
                        'fits is left out')
    parser.add_argument('--glibc', default='2.28', metavar='2.N',
                        help='with --download: the target\'s glibc (manylinux wheels up to it; default 2.28)')
    args = parser.parse_args(argv)
    if args.download is None and (args.target_freeze or '--python-version' in (argv or sys.argv)):
        parser.error('--python-version and --target-freeze go with --download')
    if not re.fullmatch(r'3\.\d+', args.python_version):
        parser.error(f'--python-version: expected 3.N, got {args.python_version!r}')
    if not re.fullmatch(r'2\.\d+', args.glibc):
        parser.error(f'--glibc: expected 2.N, got {args.glibc!r}')
    if args.target_freeze and not Path(args.target_freeze).is_file():
        parser.error(f'--target-freeze: no such file: {args.target_freeze}')
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        if args.download:
            download(args)
        elif args.plan:
            plan = make_plan(env)
            print('\n'.join(plan.lines()))
            return int(plan.error is not None)
        else:
            setup(env)
    except SetupError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
