"""tools/setup_env.sh: the CUDA decision, ``--plan``, the wheelhouse, and an offline install.

The decision and the wheelhouse's selection are pure functions, tested on tables. ``--plan``
runs for real against the suite's own venv (a CUDA build of torch) with a stand-in nvcc, so
that "with and without nvcc" does not depend on this machine's toolkit. The offline install
builds a wheelhouse from the package index for a stand-in GPU machine (an interpreter in a
venv of its own whose torch stack is the suite's), then sets up from it with the index
unreachable and no network, reusing that interpreter's torch and the cached mmcv wheel.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_device_check import load

from tooling import ROOT, TOOLS

setup_env = load('setup_env', TOOLS / 'setup_env.py')
Nvcc, decide_cuda = setup_env.Nvcc, setup_env.decide_cuda
SetupError = setup_env.SetupError
BASE_PYTHON = str(Path(sys.base_prefix) / 'bin' / 'python3')
NVCC13 = Nvcc('/opt/cuda/bin/nvcc', '13.0')


# -- the CUDA decision ------------------------------------------------------------------------------
@pytest.mark.parametrize('torch_cuda,gpus,nvcc,env,build,arch,why', [
    # a GPU machine: the visible GPUs' architectures, whatever TORCH_CUDA_ARCH_LIST says
    ('13.0', ['9.0'], NVCC13, {}, True, '9.0', 'a GPU is visible'),
    ('13.0', ['9.0', '8.0', '9.0'], NVCC13, {'TORCH_CUDA_ARCH_LIST': '7.5'}, True, '8.0;9.0', 'visible GPUs'),
    # no GPU: only when asked, for TORCH_CUDA_ARCH_LIST or the default
    ('13.0', [], NVCC13, {}, False, None, 'no GPU is visible; MMPVT_CUDA=1 builds'),
    ('13.0', [], NVCC13, {'MMPVT_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'}, True, '9.0',
     'TORCH_CUDA_ARCH_LIST'),
    ('13.0', [], NVCC13, {'MMPVT_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '8.0 9.0+PTX'}, True, '8.0;9.0+PTX', ''),
    ('13.0', [], NVCC13, {'MMPVT_CUDA': '1'}, True, setup_env.DEFAULT_CUDA_ARCH, 'from the default'),
    # MMPVT_CUDA=0 wins over a GPU
    ('13.0', ['9.0'], NVCC13, {'MMPVT_CUDA': '0'}, False, None, 'MMPVT_CUDA=0 asks for the CPU build'),
    # a CPU torch
    (None, ['9.0'], NVCC13, {}, False, None, 'is a CPU build'),
    # a GPU without (a matching) nvcc: the CPU build, with a warning
    ('13.0', ['9.0'], None, {}, False, None, 'no nvcc was found (none on PATH)'),
    ('13.0', ['9.0'], None, {'CUDA_HOME': '/opt/cuda-13'}, False, None,
     'CUDA_HOME=/opt/cuda-13 has no bin/nvcc'),
    ('13.0', ['9.0'], Nvcc('/usr/bin/nvcc', '12.4'), {}, False, None, 'refuses another major version'),
    # torch not installed yet: decided as for a CUDA build, said so
    ('unknown', [], NVCC13, {'MMPVT_CUDA': '1'}, True, setup_env.DEFAULT_CUDA_ARCH, 'yet to be installed'),
])
def test_cuda_decision(torch_cuda, gpus, nvcc, env, build, arch, why):
    decision = decide_cuda('2.14.1', torch_cuda, gpus, nvcc, env)
    assert (decision.build, decision.arch) == (build, arch)
    assert why in decision.why
    # only a GPU that will go without CUDA ops gets the one-line warning
    if gpus and torch_cuda and not build and env.get('MMPVT_CUDA') != '0':
        assert decision.warning.startswith('warning: a GPU is visible, but ')
        assert 'The CPU build of mmcv is used' in decision.warning and '\n' not in decision.warning
    else:
        assert decision.warning is None


@pytest.mark.parametrize('torch_cuda,nvcc,env,message', [
    (None, NVCC13, {'MMPVT_CUDA': '1'}, 'torch 2.14.1 is a CPU build'),
    ('13.0', None, {'MMPVT_CUDA': '1'},
     "no nvcc was found (none on PATH) to build for torch 2.14.1's CUDA 13.0: install the CUDA 13.0 toolkit"),
    ('13.0', Nvcc('/usr/bin/nvcc', '12.4'), {'MMPVT_CUDA': '1'}, 'nvcc /usr/bin/nvcc is CUDA 12.4'),
    ('13.0', NVCC13, {'MMPVT_CUDA': 'yes'}, "MMPVT_CUDA='yes': expected 1"),
])
def test_what_cannot_be_built_when_asked_stops_the_setup(torch_cuda, nvcc, env, message):
    with pytest.raises(SetupError) as info:
        decide_cuda('2.14.1', torch_cuda, [], nvcc, env)
    assert message in str(info.value)


def test_the_cache_key_tells_every_build_apart():
    cpu = decide_cuda('2.14.1', '13.0', [], NVCC13, {})
    sm90 = decide_cuda('2.14.1', '13.0', ['9.0'], NVCC13, {})
    sm80 = decide_cuda('2.14.1', '13.0', ['8.0'], NVCC13, {})
    default = decide_cuda('2.14.1', '13.0', [], NVCC13, {'MMPVT_CUDA': '1'})
    keys = [setup_env.mmcv_key('2.14.1+cu130', 'cp311', cpu, NVCC13),
            setup_env.mmcv_key('2.14.1+cu130', 'cp311', sm90, NVCC13),
            setup_env.mmcv_key('2.14.1+cu130', 'cp311', sm80, NVCC13),
            setup_env.mmcv_key('2.14.1+cu130', 'cp311', sm90, Nvcc('/x/nvcc', '13.1')),
            setup_env.mmcv_key('2.14.1+cu130', 'cp311', default, NVCC13),
            setup_env.mmcv_key('2.11.0+cu130', 'cp312', sm90, NVCC13)]
    assert len(set(keys)) == len(keys)
    assert keys[0] == 'mmcv-2.1.0-torch2.14.1+cu130-cp311-cpu'
    assert keys[1] == 'mmcv-2.1.0-torch2.14.1+cu130-cp311-cuda13.0-sm90'
    assert keys[4] == 'mmcv-2.1.0-torch2.14.1+cu130-cp311-cuda13.0-sm80-sm86-sm90+ptx'


@pytest.mark.parametrize('version,supported', [
    ('2.10.1', False), ('2.11.0', True), ('2.11.0+cu130', True), ('2.12.0a0+git1234', True),
    ('2.13.0+cpu', True), ('2.14.1', True), ('2.14.1+cu130', True), ('2.14.2', False), ('2.15.0', False),
    ('1.13.1', False)])
def test_the_supported_torch_range(version, supported):
    assert setup_env.torch_supported(version) is supported


def test_readme_states_the_supported_torch_range():
    low, high = setup_env.TORCH_SUPPORTED
    assert f'torch {low} to {high}' in (ROOT / 'docs' / 'installation.md').read_text()


def test_mmcv_patches_apply_or_stop(tmp_path):
    source = tmp_path / 'mmcv'
    source.mkdir()
    (source / 'setup.py').write_text("cxx = ['-std=c++14']\nnvcc = ['-std=c++17', '-O3']\n")
    setup_env.patch_mmcv(source)
    assert (source / 'setup.py').read_text() == "cxx = ['-std=c++20']\nnvcc = ['-std=c++20', '-O3']\n"
    with pytest.raises(SetupError) as info:
        setup_env.patch_mmcv(source)  # nothing left to patch: a changed source is refused
    message = str(info.value)
    assert message.startswith("mmcv 2.1.0's setup.py has no '-std=c") and '1[47]' in message
    assert "to patch (torch >= 2.10's headers require C++20" in message


# -- --plan -----------------------------------------------------------------------------------------
def fake_nvcc(directory: Path, release: str) -> Path:
    """An ``nvcc`` that answers ``--version`` as CUDA ``release``'s does."""
    directory.mkdir(parents=True)
    nvcc = directory / 'nvcc'
    nvcc.write_text('#!/bin/sh\necho "nvcc: NVIDIA (R) Cuda compiler driver"\n'
                    f'echo "Cuda compilation tools, release {release}, V{release}.88"\n')
    nvcc.chmod(0o755)
    return nvcc


def plan(env: dict, python: str = BASE_PYTHON, args=('--plan',)) -> tuple[int, dict[str, str], str]:
    """Runs ``--plan``; its exit status, key -> value, and stderr."""
    unset = ('MMPVT_CUDA', 'TORCH_CUDA_ARCH_LIST', 'CUDA_HOME', 'CUDA_PATH', 'WHEELHOUSE', 'PYTHON')
    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(env)
    done = subprocess.run([python, str(TOOLS / 'setup_env.py'), *args], capture_output=True, text=True,
                          env=full)
    lines = dict(line.split('=', 1) for line in done.stdout.splitlines() if '=' in line)
    return done.returncode, lines, done.stderr


PLAN_KEYS = ['python', 'venv', 'torch', 'torch_cuda', 'mmcv_cuda', 'cuda_arch', 'nvcc', 'wheelhouse',
             'mmcv_wheel']


@pytest.mark.parametrize('with_nvcc', [True, False], ids=['nvcc', 'no-nvcc'])
@pytest.mark.parametrize('asked', [None, '1', '0'], ids=['unset', 'MMPVT_CUDA=1', 'MMPVT_CUDA=0'])
def test_plan_for_a_cuda_torch(with_nvcc, asked, tmp_path):
    """The suite's venv holds a CUDA build of torch and this machine shows no GPU."""
    import torch
    assert torch.version.cuda, 'the suite runs on a CUDA build of torch'
    bin_dir = tmp_path / 'bin'
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'VENV': str(ROOT / '.venv'),
           'MMPVT_CACHE': str(tmp_path / 'cache')}
    if with_nvcc:
        fake_nvcc(bin_dir, '13.0')
    if asked is not None:
        env['MMPVT_CUDA'] = asked
    code, lines, stderr = plan(env)
    assert list(lines)[:len(PLAN_KEYS)] == PLAN_KEYS, lines
    assert lines['python'].startswith(f'{BASE_PYTHON} (')
    assert lines['torch'].startswith(f'{torch.__version__} (present in {ROOT / ".venv"}; '
                                     'supported 2.11 to 2.14.1)')
    assert lines['torch_cuda'] == torch.version.cuda
    assert lines['nvcc'] == (f'{bin_dir / "nvcc"} (CUDA 13.0)' if with_nvcc else 'none')
    assert lines['wheelhouse'] == 'none'
    assert lines['mmcv_wheel'].startswith(f'build (into {tmp_path / "cache" / "wheels" / "mmcv-2.1.0-torch"}')
    if asked == '1' and with_nvcc:
        assert code == 0 and lines['mmcv_cuda'].startswith('1 (MMPVT_CUDA=1 asks for them')
        assert lines['cuda_arch'] == setup_env.DEFAULT_CUDA_ARCH
        assert lines['mmcv_wheel'].endswith('-cuda13.0-sm80-sm86-sm90+ptx)')
    elif asked == '1':
        assert code == 1 and lines['mmcv_cuda'].startswith('0 ')
        assert lines['error'].startswith("MMPVT_CUDA=1 asks for mmcv's CUDA ops, but no nvcc was found")
    else:
        assert code == 0 and lines['mmcv_cuda'].startswith('0 (')
        assert lines['cuda_arch'] == 'none' and lines['mmcv_wheel'].endswith('-cpu)')
        assert ('MMPVT_CUDA=0' if asked == '0' else 'no GPU is visible') in lines['mmcv_cuda']
    if asked == '1' and with_nvcc:
        with_arch = plan({**env, 'TORCH_CUDA_ARCH_LIST': '9.0'})[1]
        assert with_arch['cuda_arch'] == '9.0' and with_arch['mmcv_wheel'].endswith('-cuda13.0-sm90)')


def test_plan_changes_nothing(tmp_path):
    venv = tmp_path / 'venv'
    code, lines, _ = plan({'VENV': str(venv), 'MMPVT_CACHE': str(tmp_path / 'cache')})
    assert code == 0
    assert lines['venv'] == f'{venv} (to be created)'
    assert not venv.exists() and not (tmp_path / 'cache').exists()


def test_plan_and_setup_refuse_a_directory_that_is_no_wheelhouse(tmp_path):
    code, _, stderr = plan({'WHEELHOUSE': str(tmp_path), 'VENV': str(tmp_path / 'venv')})
    assert code == 1
    assert stderr.strip() == (f'error: WHEELHOUSE={tmp_path} is not a wheelhouse: it has no wheelhouse.json '
                              '(make one with: bash tools/setup_env.sh --download DIR)')


# -- the wheelhouse's selection ---------------------------------------------------------------------
def meta(name: str, version: str, *requires: str) -> dict:
    return dict(name=name, version=version, requires_dist=list(requires))


RESOLVED = [
    meta('mmdet', '3.3.0', 'numpy', 'scipy', 'shapely', 'pycocotools', 'pytest; extra == "tests"'),
    meta('mmengine', '0.10.7', 'numpy', 'opencv-python>=3', 'addict', 'rich'),
    meta('timm', '1.0.31', 'torch', 'torchvision', 'pyyaml'),
    meta('numpy', '2.4.6'), meta('scipy', '1.17.1', 'numpy<2.6,>=1.26.4'),
    meta('shapely', '2.2.0', 'numpy>=1.21'),
    meta('pycocotools', '2.0.11', 'numpy', 'matplotlib>=2.1.0; python_version < "3.0"'),
    meta('opencv-python', '4.12.0.88', 'numpy<2.3,>=2'), meta('addict', '2.4.0'),
    meta('rich', '14.0', 'pygments'), meta('pygments', '2.21.0'), meta('pyyaml', '6.0.3'),
    meta('torch', '2.11.0', 'sympy', 'nvidia-cublas; platform_system == "Linux"'), meta('sympy', '1.14'),
    meta('nvidia-cublas', '13.0'), meta('torchvision', '0.26.0', 'torch==2.11.0', 'pillow'),
    meta('pillow', '12.0'),
]
ROOTS = ['mmdet==3.3.0', 'mmengine==0.10.7', 'timm>=1.0,<2']


def test_the_wheelhouse_carries_what_the_target_lacks():
    present = setup_env.read_freeze_lines([
        'numpy==1.19.0', 'scipy', 'opencv-python-headless==4.10.0.84', 'rich==13.9', 'torch==2.11.0+cu130',
        '# a comment', '-e git+https://x/y#egg=z', 'pyyaml @ file:///wheels/PyYAML-6.0.3.whl'])
    keep, left_out = setup_env.needed(ROOTS, RESOLVED, present, '3.12')
    names = [m['name'] for m in keep]
    # numpy 1.19.0 is below shapely's >=1.21 (shapely is carried): the target's does not fit
    assert 'numpy' in names
    # the headless OpenCV satisfies opencv-python (the same cv2); a bare name is any version
    assert 'opencv-python' not in names and left_out['opencv-python'] == '4.10.0.84'
    assert 'scipy' not in names and left_out['scipy'] == 'any' and 'pyyaml' not in names
    # present and fitting: left out, and nothing behind it is walked into (rich -> pygments)
    assert left_out['rich'] == '13.9' and 'pygments' not in names
    # torch and torchvision are the target's own, with everything behind them
    assert not {'torch', 'torchvision', 'sympy', 'nvidia-cublas', 'pillow'} & set(names)
    assert left_out['torch'] == '2.11.0+cu130' and left_out['torchvision'] == "the target's"
    # markers: an extra and an old Python's requirement are not followed
    assert 'pytest' not in names and 'matplotlib' not in names
    assert sorted(names) == ['addict', 'mmdet', 'mmengine', 'numpy', 'pycocotools', 'shapely', 'timm']


def test_without_a_freeze_everything_but_torch_is_carried():
    keep, left_out = setup_env.needed(ROOTS, RESOLVED, {}, '3.12')
    assert {m['name'] for m in keep} == {'mmdet', 'mmengine', 'timm', 'numpy', 'scipy', 'shapely',
                                         'pycocotools', 'opencv-python', 'addict', 'rich', 'pygments',
                                         'pyyaml'}
    assert set(left_out) == {'torch', 'torchvision'}


def test_a_left_out_distribution_is_present_when_any_alias_is_installed():
    """The GPU machines have OpenCV's headless build; a wheelhouse made for them leaves out
    opencv-python, which the headless build provides."""
    found = {'opencv-python': None, 'opencv-python-headless': '5.1.0', 'opencv-contrib-python': None,
             'opencv-contrib-python-headless': None, 'numpy': '2.5.5', 'rich': None}
    assert setup_env.absent_names(['opencv-python', 'numpy', 'rich'], found) == ['rich']
    assert setup_env.aliases_of('numpy') == {'numpy'}
    assert 'opencv-python-headless' in setup_env.aliases_of('opencv-python')


def test_a_malformed_freeze_line_is_named(tmp_path):
    freeze = tmp_path / 'freeze.txt'
    freeze.write_text('numpy==2.0\nnot a requirement line\n')
    with pytest.raises(SetupError, match=r"freeze.txt:2: 'not a requirement line' is neither name==version"):
        setup_env.read_freeze(freeze)


# -- the offline install ----------------------------------------------------------------------------
# What the stand-in GPU machine has besides torch: the list, as far as the suite's
# venv holds them (their versions are the suite's, so they fit).
MACHINE_HAS = ['numpy', 'scipy', 'opencv-python', 'matplotlib', 'pillow', 'timm', 'pyyaml', 'requests',
               'rich', 'tqdm']


def closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` and everything they require (markers that hold
    here), from the suite's environment."""
    from packaging.requirements import Requirement
    found, todo = {}, list(names)
    while todo:
        name = setup_env.canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
                todo.append(requirement.name)
    return list(found.values())


def stand_in_machine(root: Path) -> Path:
    """An interpreter in a venv of its own (as on the GPU machines: /opt/torch/.venv) that has
    the suite's torch stack and MACHINE_HAS through a .pth file, and nothing else. Returns it."""
    stack = root / 'stack'
    stack.mkdir(parents=True)
    for dist in closure(['torch', 'torchvision', *MACHINE_HAS]):
        base = Path(dist.locate_file(''))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith('..')}
        for top in tops:
            if (base / top).exists() and not (stack / top).exists():
                (stack / top).symlink_to(base / top)
    subprocess.run([BASE_PYTHON, '-m', 'venv', root / 'machine'], check=True)
    python = root / 'machine' / 'bin' / 'python'
    code = 'import json, site; print(json.dumps(site.getsitepackages()))'
    site = json.loads(subprocess.run([python, '-c', code], capture_output=True, text=True,
                                     check=True).stdout)[0]
    Path(site, 'torch_stack.pth').write_text(f'{stack}\n')
    return python


def checkout_copy(into: Path) -> Path:
    """The repository's files (tracked and new) in ``into``: the setup installs mmpvt from
    there, leaving the suite's own build untouched."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def offline_env(**extra) -> dict:
    """No index, no pip configuration (its find-links included), no network where unshare works."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('PIP_', 'MMPVT_CUDA', 'TORCH_CUDA_ARCH_LIST', 'VIRTUAL_ENV', 'PYTHONPATH'))}
    env.update(PIP_NO_INDEX='1', PIP_CONFIG_FILE=os.devnull, **extra)
    return env


def no_network() -> list[str]:
    return ['unshare', '-n'] if shutil.which('unshare') and \
        subprocess.run(['unshare', '-n', 'true'], capture_output=True).returncode == 0 else []


@pytest.mark.slow
def test_offline_setup_from_a_wheelhouse_reuses_the_machines_torch(tmp_path):
    import torch
    machine = stand_in_machine(tmp_path)
    freeze = tmp_path / 'freeze.txt'
    freeze.write_text(subprocess.run([machine, '-m', 'pip', 'freeze'], capture_output=True, text=True,
                                     check=True).stdout)
    assert 'torch==' in freeze.read_text()

    # 1. the wheelhouse, from the package index, for this machine
    wheelhouse = tmp_path / 'wheelhouse'
    start = time.monotonic()
    done = subprocess.run([BASE_PYTHON, TOOLS / 'setup_env.py', '--download', wheelhouse,
                           '--target-freeze', freeze], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    download_s = time.monotonic() - start
    manifest = json.loads((wheelhouse / 'wheelhouse.json').read_text())
    carried = {f['name'] for f in manifest['files']}
    assert {'mmcv', 'mmengine', 'mmdet', 'mmsegmentation', 'pytest-xdist', 'setuptools'} <= carried
    assert not {'torch', 'torchvision', 'numpy', 'timm', 'opencv-python', 'matplotlib'} & carried
    assert manifest['bytes'] < 40 * 2 ** 20, manifest['bytes']
    assert all(len(f['sha256']) == 64 for f in manifest['files'])

    # 2. the setup from it: no index, no network, the machine's torch, the cached mmcv wheel
    repo = checkout_copy(tmp_path / 'repo')
    venv = tmp_path / 'venv'
    env = offline_env(WHEELHOUSE=str(wheelhouse), PYTHON=str(machine), VENV=str(venv))
    code, lines, stderr = plan(env, python=str(machine))
    assert code == 0, stderr
    assert lines["torch"].startswith(f"{torch.__version__} (reused from {machine}")
    assert lines['wheelhouse'] == str(wheelhouse)
    assert Path(lines['mmcv_wheel']).is_file(), 'make setup caches the wheel this test reuses'
    start = time.monotonic()
    setup = [*no_network(), 'bash', repo / 'tools' / 'setup_env.sh']
    done = subprocess.run(setup, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    install_s = time.monotonic() - start
    assert done.stdout.strip().splitlines()[-1].startswith('[setup] ready: torch ')
    assert 'mmcv 2.1.0 with CPU ops only' in done.stdout
    code = ('import torch, mmcv, mmdet, mmpvt; print(torch.__file__); print(mmpvt.__file__); '
            'from mmcv.ops import nms')
    where = subprocess.run([venv / 'bin' / 'python', '-c', code], capture_output=True, text=True, cwd='/')
    assert where.returncode == 0, where.stderr
    torch_file, mmpvt_file = where.stdout.split()
    assert torch_file.startswith(str(tmp_path / 'stack')), torch_file  # reused, not installed
    assert mmpvt_file.startswith(str(repo))
    assert not list(venv.glob('lib/python*/site-packages/torch'))
    print(f'wheelhouse {manifest["bytes"] / 2 ** 20:.1f} MiB in {download_s:.0f} s; '
          f'offline setup {install_s:.0f} s')

    # 3. a second run changes nothing
    again = subprocess.run(setup, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and '==> [setup]' not in again.stdout, again.stdout

    # 4. a wheelhouse missing a file, or made for another Python, stops before anything is made
    broken = tmp_path / 'broken'
    shutil.copytree(wheelhouse, broken)
    lost = next(f['file'] for f in manifest['files'] if f['name'] == 'mmdet')
    (broken / lost).unlink()
    other = offline_env(WHEELHOUSE=str(broken), PYTHON=str(machine), VENV=str(tmp_path / 'venv2'))
    failed = subprocess.run(setup, capture_output=True, text=True, env=other)
    assert failed.returncode == 1
    assert failed.stderr.strip() == (f'error: the wheelhouse {broken} lacks {lost} (listed in its '
                                     'wheelhouse.json)')
    assert not (tmp_path / 'venv2').exists()
    (broken / 'wheelhouse.json').write_text(json.dumps({**manifest, 'python_version': '3.99'}))
    failed = subprocess.run(setup, capture_output=True, text=True, env=other)
    assert 'was made for Python 3.99, this interpreter is 3.' in failed.stderr and failed.returncode == 1


def test_toolkit_root_sees_through_an_nvcc_wrapper(tmp_path):
    """A wrapper script on PATH (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) is not the
    toolkit: CUDA_HOME must be the root nvcc reports, whose include directory the C++ files
    need. An nvcc inside its toolkit is taken as is."""
    toolkit = tmp_path / 'cuda-13.0'
    (toolkit / 'include').mkdir(parents=True)
    (toolkit / 'include' / 'cuda_runtime_api.h').write_text('')
    real = fake_nvcc(toolkit / 'bin', '13.0')
    wrapper = fake_nvcc(tmp_path / 'usr' / 'bin', '13.0')
    wrapper.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    assert setup_env.toolkit_root(str(real)) == toolkit
    assert setup_env.toolkit_root(str(wrapper)) == toolkit.resolve()


def test_the_package_declares_the_setuptools_its_configs_need():
    """`pip install .` alone must not pull a setuptools without pkg_resources (81 and later),
    which mmengine needs to read the configs' mmdet:: and mmseg:: bases: setup.py asks for
    the same range as requirements.txt."""
    import ast
    lines = (ROOT / 'requirements.txt').read_text().splitlines()
    requirement = next(line.split('#')[0].strip() for line in lines if line.startswith('setuptools'))
    calls = [node for node in ast.walk(ast.parse((ROOT / 'setup.py').read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'setup']
    install_requires = next(k.value for k in calls[0].keywords if k.arg == 'install_requires')
    assert requirement in [element.value for element in install_requires.elts]
