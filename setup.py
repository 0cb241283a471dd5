"""Installs mmpvt: Pyramid Vision Transformer backbones for MMDetection and MMSegmentation."""
import re
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'mmpvt' / 'version.py').read_text()).group(1)

# A plain C library (no Python or torch headers, so it builds in seconds), loaded through
# ctypes by mmpvt/ops/dwconv_gelu.py; without it the MLP runs PyTorch's layers.
# OpenMP's libgomp.so.1 resolves to the copy torch has already loaded.
DWCONV_GELU = Extension(
    'mmpvt.ops._dwconv_gelu',
    sources=['mmpvt/ops/csrc/dwconv_gelu.c'],
    depends=['mmpvt/ops/csrc/dwconv_gelu_rows.h', 'mmpvt/ops/csrc/dwconv_gelu_dtypes.h'],
    extra_compile_args=['-O3', '-std=c11', '-fopenmp', '-fno-math-errno', '-Wall'],
    extra_link_args=['-fopenmp'],
    optional=True,  # no C compiler: mmpvt installs and runs the PyTorch layers instead
)



class BuildPyWithZoo(build_py):
    """Copies the model zoo into the package's ``.mim`` folder, where an installed OpenMMLab
    package keeps it: ``.mim/configs/`` (configs/ as in the repository) and
    ``.mim/model-index.yml``, read by mmpvt.model_index, mmengine and openmim. An editable
    install reads them from the checkout instead."""

    def run(self) -> None:
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        mim = Path(self.build_lib) / 'mmpvt' / '.mim'
        shutil.rmtree(mim, ignore_errors=True)
        skip = shutil.ignore_patterns('__pycache__', '*.pyc')
        shutil.copytree(HERE / 'configs', mim / 'configs', ignore=skip)
        shutil.copy2(HERE / 'model-index.yml', mim / 'model-index.yml')


setup(
    name='mmpvt',
    version=VERSION,
    description='Pyramid Vision Transformer (v1, v2) backbones for MMDetection 3.x and MMSegmentation 1.x',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['mmpvt', 'mmpvt.*']),
    # mmcv must carry its compiled ops (nms, RoIAlign): PyPI has only its source, so
    # tools/setup_env.sh builds it; pip would otherwise build it without ops or fail.
    install_requires=[
        # mmengine 0.10 resolves the configs' 'mmdet::' / 'mmseg::' bases through
        # pkg_resources, which setuptools 81 removed (as requirements.txt pins it)
        'setuptools>=77.0.3,<81',
        'torch>=2.0',
        'torchvision',
        'mmengine>=0.10.0,<1.0.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'timm>=1.0',
        'pycocotools',
    ],
    extras_require={
        'det': ['mmdet>=3.0.0,<3.4.0'],
        'seg': ['mmsegmentation>=1.0.0,<1.3.0', 'ftfy', 'regex'],
        'all': ['mmdet>=3.0.0,<3.4.0', 'mmsegmentation>=1.0.0,<1.3.0', 'ftfy', 'regex', 'matplotlib'],
        'tests': ['pytest>=8', 'pytest-xdist>=3.5', 'ruff>=0.6'],
        # tools/deploy/export.py: ONNX export (torch's dynamo-based exporter) and its check
        'deploy': ['onnx>=1.17', 'onnxruntime>=1.20', 'onnxscript>=0.3'],
    },
    ext_modules=[DWCONV_GELU],
    cmdclass={'build_py': BuildPyWithZoo},
    zip_safe=False,
)
