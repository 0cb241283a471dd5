"""tools/benchmark_zoo.py on the demo configs, with a model index of the test's own and its
weights served on the loopback: no network, the CPU only.

The index lists the demo RetinaNet three times (weights whose file name carries their own
hash; bytes that are not a checkpoint; a good checkpoint under a name whose hash is not its
own), a RetinaNet whose config is missing, the demo FPN segmentor, and a model without
weights, which is never benchmarked. The
weights are the demo models as built (untrained): an untrained RetinaNet still scores a few
boxes right on the synthetic shapes once every box is kept (score_thr=0), so the measured
values are not all zero and a comparison with tools/test.py's own can fail.
"""
import functools
import hashlib
import http.server
import importlib.util
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from mmpvt.apis import build_model
from mmpvt.cli import load_config, parse_metrics
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

BENCHMARK = TOOLS / 'benchmark_zoo.py'
KEEP_ALL = ['model.test_cfg.score_thr=0.0']  # an untrained detector scores under the default 0.05
DETECTORS = ['demo_retinanet', 'demo_retinanet_corrupt', 'demo_retinanet_bad_hash',
             'demo_retinanet_no_config']
MISSING_CONFIG = Path('/nonexistent/retinanet.py')


def load_tool():
    """tools/benchmark_zoo.py as a module, for its parsing functions."""
    spec = importlib.util.spec_from_file_location('benchmark_zoo', BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_demo_model(kind: str, path: Path) -> None:
    """The demo model as built from its config, saved as a release checkpoint."""
    torch.manual_seed(0)
    model = build_model(load_config(DEMO_CONFIGS[kind]))
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)


def entry(name: str, kind: str, task: str, metric: str, paper: float, weights: str | None = None,
          published: float | None = None, config: Path | None = None) -> dict:
    """One model of an OpenMMLab metafile, as configs/metafile.yml writes them."""
    results = [{'Task': task, 'Dataset': 'Synthetic', 'Metrics': {metric: paper}}]
    model = {'Name': name, 'In Collection': 'Demo', 'Config': str(config or DEMO_CONFIGS[kind]),
             'Metadata': {'Training Data': 'Synthetic', 'Epochs': 1}, 'Results': results}
    if weights:
        model['Weights'] = weights
    if published is not None:
        model['Metadata']['Weights Results'] = [{'Task': task, 'Dataset': 'Synthetic',
                                                 'Metrics': {metric: published}}]
        model['Metadata']['Weights Source'] = 'the test'
    return model


@pytest.fixture(scope='module')
def zoo(tmp_path_factory) -> dict:
    """The synthetic data, the weights on a loopback server, and an index naming them.

    ``requests`` lists the paths the server answered, so that a test sees what was downloaded.
    """
    root = tmp_path_factory.mktemp('benchmark_zoo')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    www = root / 'www'
    www.mkdir()
    save_demo_model('retinanet', www / 'retinanet.pth')
    digest = sha256(www / 'retinanet.pth')
    good = f'demo_retinanet_20240101_000000-{digest[:8]}.pth'
    (www / 'retinanet.pth').rename(www / good)
    wrong = ('1' if digest[0] == '0' else '0') + digest[1:8]  # differs from the file's hash
    shutil.copy(www / good, www / f'demo_retinanet_20240101_000000-{wrong}.pth')
    (www / 'demo_retinanet_corrupt.pth').write_bytes(b'<html>404 behind a proxy</html>\n')
    save_demo_model('fpn', www / 'fpn.pth')
    fpn = f'demo_fpn_20240101_000000-{sha256(www / "fpn.pth")[:8]}.pth'
    (www / 'fpn.pth').rename(www / fpn)

    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code='-', size='-'):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}'

    index = root / 'index'
    index.mkdir()
    (index / 'model-index.yml').write_text(yaml.safe_dump({'Import': ['metafile.yml']}))
    models = [
        entry('demo_retinanet', 'retinanet', 'Object Detection', 'box AP', 2.0, f'{url}/{good}',
              published=1.5),
        entry('demo_retinanet_corrupt', 'retinanet', 'Object Detection', 'box AP', 2.0,
              f'{url}/demo_retinanet_corrupt.pth'),
        entry('demo_retinanet_bad_hash', 'retinanet', 'Object Detection', 'box AP', 2.0,
              f'{url}/demo_retinanet_20240101_000000-{wrong}.pth'),
        entry('demo_retinanet_no_config', 'retinanet', 'Object Detection', 'box AP', 2.0, f'{url}/{good}',
              config=MISSING_CONFIG),
        entry('demo_fpn', 'fpn', 'Semantic Segmentation', 'mIoU', 20.0, f'{url}/{fpn}'),
        entry('demo_retinanet_no_weights', 'retinanet', 'Object Detection', 'box AP', 2.0),
    ]
    (index / 'metafile.yml').write_text(yaml.safe_dump(
        {'Collections': [{'Name': 'Demo', 'Metadata': {'Architecture': ['PVTv2']}}], 'Models': models},
        sort_keys=False))
    yield dict(root=root, www=www, index=index, url=url, requests=requests, good=good, wrong=wrong,
               digest=digest, coco=root / 'data' / 'synthetic' / 'coco',
               ade=root / 'data' / 'synthetic' / 'ade' / 'ADEChallengeData2016')
    server.shutdown()


def benchmark(zoo: dict, out: Path, *args, cfg_options=KEEP_ALL):
    """Runs the tool on the test's index, with the weights cached under the test's folder."""
    options = ['--cfg-options', *cfg_options] if cfg_options else []
    return run([BENCHMARK, '--index-root', zoo['index'], '--cache-dir', zoo['root'] / 'cache',
                '--out-dir', out, *args, *options], cwd=zoo['root'])


def rows_by_model(out: Path) -> dict[str, list[dict]]:
    rows = {}
    for row in json.loads((out / 'benchmark.json').read_text())['rows']:
        rows.setdefault(row['model'], []).append(row)
    return rows


@pytest.fixture(scope='module')
def detection_run(zoo) -> dict:
    """tools/test.py on the good RetinaNet weights, then the tool over the three detectors."""
    reference = run([TOOLS / 'test.py', DEMO_CONFIGS['retinanet'], zoo['www'] / zoo['good'],
                     '--work-dir', zoo['root'] / 'reference', '--cfg-options', *KEEP_ALL], cwd=zoo['root'])
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = zoo['root'] / 'out'
    result = benchmark(zoo, out, '--data-root', zoo['coco'], '--task', 'detection')
    return dict(out=out, result=result, rows=rows_by_model(out), reference=parse_metrics(reference.stdout),
                requests=list(zoo['requests']))


@pytest.mark.slow
def test_measured_map_is_test_py_own_and_bad_downloads_fail_alone(zoo, detection_run):
    result, rows = detection_run['result'], detection_run['rows']
    assert result.returncode == 1, result.stderr[-3000:]  # three of four failed
    assert 'Traceback' not in result.stderr
    assert set(rows) == set(DETECTORS)  # the model without weights is not benchmarked

    [good] = rows['demo_retinanet']
    reference = detection_run['reference']
    assert good['status'] == 'ok'
    assert good['test_metrics'] == reference
    assert reference['coco/bbox_mAP'] > 0  # the comparison below is not 0 == 0
    assert good['measured'] == pytest.approx(100 * reference['coco/bbox_mAP'])  # the index's percent
    assert (good['published'], good['published_from']) == (1.5, 'weights')
    assert good['difference'] == pytest.approx(good['measured'] - 1.5)
    assert good['images'] == 2 and good['images_per_s'] > 0 and good['timing'] == 'test loop'
    assert good['peak_memory_mb'] > 100 and good['memory'] == 'peak RSS'  # torch alone takes more

    [corrupt] = rows['demo_retinanet_corrupt']
    assert corrupt['status'].startswith('failed: ')
    assert 'demo_retinanet_corrupt.pth is not a readable checkpoint' in corrupt['status']
    assert (corrupt['published'], corrupt['published_from']) == (2.0, 'paper') and corrupt['measured'] is None

    [bad_hash] = rows['demo_retinanet_bad_hash']
    name = f'demo_retinanet_20240101_000000-{zoo["wrong"]}.pth'
    assert bad_hash['status'] == (f'failed: checksum mismatch: {zoo["root"] / "cache" / name}: expected '
                                  f'{zoo["wrong"]}..., got {zoo["digest"][:8]}...; delete it and re-run')
    assert not (detection_run['out'] / 'demo_retinanet_bad_hash' / 'test.log').exists()  # never evaluated

    [no_config] = rows['demo_retinanet_no_config']
    assert no_config['status'] == f'failed: config not found: {MISSING_CONFIG} (listed in the model index)'

    # One progress line per model, the table printed at the end and written as benchmark.md.
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith('[')]
    assert [line.split(':')[0] for line in progress] == [f'[{k}/4] {m}' for k, m in enumerate(DETECTORS, 1)]
    assert all(line.endswith(')') and '(ETA ' in line for line in progress)
    measured = f'{good["measured"]:.2f}'
    assert progress[0].startswith(f'[1/4] demo_retinanet: ok, box AP {measured} (published 1.50, ')
    table = (detection_run['out'] / 'benchmark.md').read_text()
    assert table.strip() in result.stdout
    assert f'| demo_retinanet | {DEMO_CONFIGS["retinanet"]} | box AP | 1.50 | {measured} |' in table
    assert '| demo_retinanet_corrupt |' in table and '| 2.00 (paper) | - | - |' in table
    assert table.count('failed: ') == 3


@pytest.mark.slow
def test_resume_skips_the_models_done_and_downloads_nothing_again(zoo, detection_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(detection_run['out'], out)
    done_log = out / 'demo_retinanet' / 'test.log'
    before = done_log.read_text()
    runs_before = sorted(p.name for p in (out / 'demo_retinanet').iterdir())
    result = benchmark(zoo, out, '--data-root', zoo['coco'], '--task', 'detection', '--resume')
    assert result.returncode == 1, result.stderr[-3000:]  # the corrupt downloads still fail
    assert '[1/4] demo_retinanet: skipped: ok in' in result.stdout
    assert '[2/4] demo_retinanet_corrupt: failed: ' in result.stdout  # failures run again
    # Not run again: mmengine would have added a timestamped work dir and rewritten the log.
    assert sorted(p.name for p in (out / 'demo_retinanet').iterdir()) == runs_before
    assert done_log.read_text() == before
    rows = rows_by_model(out)
    assert rows['demo_retinanet'] == detection_run['rows']['demo_retinanet']
    # Each file was fetched once, by the first run; the resumed one read the cache.
    bad_hash = f'demo_retinanet_20240101_000000-{zoo["wrong"]}.pth'
    for name in (zoo['good'], 'demo_retinanet_corrupt.pth', bad_hash):
        assert zoo['requests'].count(f'/{name}') == 1, zoo['requests']


@pytest.mark.slow
def test_segmentor_miou_is_test_py_own(zoo):
    fpn = next(zoo['www'].glob('demo_fpn_*.pth'))
    reference = run([TOOLS / 'test.py', DEMO_CONFIGS['fpn'], fpn, '--work-dir',
                     zoo['root'] / 'reference_fpn'], cwd=zoo['root'])
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = parse_metrics(reference.stdout)
    assert expected['mIoU'] > 0
    out = zoo['root'] / 'out_fpn'
    result = benchmark(zoo, out, '--data-root', zoo['ade'], '--models', 'demo_fpn*', cfg_options=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [row] = rows_by_model(out)['demo_fpn']
    assert row['status'] == 'ok' and row['metric'] == 'mIoU'
    assert row['measured'] == pytest.approx(expected['mIoU'])  # mmseg reports percent already
    assert (row['published'], row['published_from']) == (20.0, 'paper')
    assert row['difference'] == pytest.approx(expected['mIoU'] - 20.0)
    assert '[1/1] demo_fpn: ok, mIoU ' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--models', 'nope*'], 'error: no model of the index matches models='),
    ([], 'error: the selection holds detectors (demo_retinanet, '),  # COCO and ADE20K under one root
    (['--task', 'detection', '--cfg-options', 'test_dataloader.batch_sise=2'],
     'error: demo_retinanet: unknown --cfg-options key test_dataloader.batch_sise'),
])
def test_bad_command_line_is_one_error_line_before_any_download(zoo, tmp_path, args, message):
    downloads = len(zoo['requests'])
    result = benchmark(zoo, tmp_path / 'out', '--data-root', zoo['coco'], *args, cfg_options=None)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith(message), result.stderr
    assert len(zoo['requests']) == downloads and not (tmp_path / 'out').exists()


def test_missing_data_is_one_error_line(zoo, tmp_path):
    result = benchmark(zoo, tmp_path / 'out', '--data-root', tmp_path / 'coco', '--task', 'detection')
    assert result.returncode == 1
    assert result.stderr.strip() == (f'error: --data-root not found: {tmp_path / "coco"} (the dataset '
                                     "folder: COCO's with annotations/ and val2017/, or "
                                     'ADEChallengeData2016/)')
    (tmp_path / 'coco').mkdir()  # there, but empty: tools/test.py's own check names what is missing
    result = benchmark(zoo, tmp_path / 'out', '--data-root', tmp_path / 'coco', '--task', 'detection')
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        f'error: demo_retinanet: dataset path not found: {tmp_path / "coco" / "annotations"}'), result.stderr
    assert '(2 more models miss their data too); is --data-root' in result.stderr
    assert not (tmp_path / 'out').exists()


def test_timing_and_cuda_memory_are_read_from_mmengine_lines():
    """The CUDA lines, as mmengine logs them on a GPU (not produced on the CPU runs above)."""
    tool = load_tool()
    log = '\n'.join([
        '01/01 10:00:00 - mmengine - INFO - Iter(test) [ 50/100]    eta: 0:00:05  time: 0.1200  '
        'data_time: 0.0100  memory: 812  ',
        '01/01 10:00:05 - mmengine - INFO - Iter(test) [100/100]    eta: 0:00:00  time: 0.1100  '
        'data_time: 0.0100  memory: 1024  ',
        '01/01 10:00:09 - mmengine - INFO - Epoch(test) [100/100]    coco/bbox_mAP: 0.3670  '
        'data_time: 0.0102  time: 0.1150',
        'training memory: 99999 (not a test line)',
    ])
    assert tool.test_loop_timing(log) == (100, 0.1150)  # the epoch's mean, not the last window's
    assert tool.cuda_peak_memory(log) == 1024
    assert tool.cuda_peak_memory('Epoch(test) [2/2]  mIoU: 18.6200  data_time: 0.0069  time: 0.0562') is None
    release = 'retinanet_pvt-t_fpn_1x_coco_20210831_103110-17b566bd.pth'
    assert tool.HASH_SUFFIX.search(release).group(1) == '17b566bd'
    assert tool.HASH_SUFFIX.search('pvt_v2_b0.pth') is None
