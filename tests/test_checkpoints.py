"""Loading every checkpoint layout a user brings, checked against independent implementations.

timm's pvt_v2 and mmdet's built-in PyramidVisionTransformer(V2) are the references: their
randomly initialised weights are written in each layout, loaded through the backbone's
``init_cfg`` and the features compared.
"""
import functools
import http.server
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest
import timm
import torch
from mmengine.logging import MMLogger

from mmpvt import PVT, PVTv2
from mmpvt.checkpoint import CheckpointError

from layouts import (
    MANIFEST_DIR,
    bilinear_resize,
    logged_messages,
    mmdet_source,
    mmpvt_v1_to_official,
    official_source,
    read_manifest,
    timm_source,
    timm_v2_to_official,
)

V2_ARCHS = ['b0', 'b1', 'b2', 'b2_li', 'b3', 'b4', 'b5']
AWKWARD = (1, 3, 225, 290)

ROOT_DIR = Path(__file__).resolve().parents[1]


def load_through_init_cfg(cls, arch, path, **kwargs):
    model = cls(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def features(model, x):
    with torch.no_grad():
        return [o.float() for o in model(x)]


def max_abs_diff(outs, refs):
    return max(float((o - r).abs().max()) for o, r in zip(outs, refs))


def max_rel_diff(outs, refs):
    """The largest difference relative to each map's scale (v1 maps reach ~10)."""
    return max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs))


@functools.cache
def timm_reference(arch):
    """timm's pvt_v2 with random weights: its state dict, an input, its maps in float32 and
    in float64."""
    torch.manual_seed(1)
    model = timm.create_model(f'pvt_v2_{arch}', pretrained=False).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(AWKWARD)
    with torch.no_grad():
        refs = model.forward_intermediates(x, intermediates_only=True)
        refs64 = model.double().forward_intermediates(x.double(), intermediates_only=True)
    return state, x, refs, refs64


@pytest.mark.parametrize('arch', V2_ARCHS)
@pytest.mark.parametrize('layout', ['official', 'timm'])
def test_v2_matches_timm_through_every_layout(arch, layout, tmp_path):
    """Loaded from each layout, PVTv2 computes timm's function: in float64 to its rounding
    (4e-15 of each map's scale measured), and in float32, where mmpvt's fused MLP kernel and
    the other summation orders of another CPU's kernels leave rounding differences (2-3e-6
    measured on an AVX2 machine; 1e-5 absolute at maps of scale ~5 on an AVX-512 one)."""
    state, x, refs, refs64 = timm_reference(arch)
    if layout == 'official':
        state = timm_v2_to_official(state)
        assert 'block1.0.mlp.dwconv.dwconv.weight' in state and 'head.weight' in state
    assert PVTv2.checkpoint_format.layout(state) == layout
    torch.save(state, tmp_path / f'pvt_v2_{arch}.pth')
    model = load_through_init_cfg(PVTv2, arch, tmp_path / f'pvt_v2_{arch}.pth')
    assert max_rel_diff(features(model, x), refs) <= 1e-5
    with torch.no_grad():
        outs64 = model.double()(x.double())
    assert max_rel_diff(outs64, refs64) <= 1e-12


def mmdet_pvt(cls_name, arch_kwargs, eps=None):
    """mmdet's built-in backbone, randomly initialised; optionally with mmpvt's eps."""
    from mmdet.models.backbones import pvt as mmdet_pvt_module
    model = getattr(mmdet_pvt_module, cls_name)(**arch_kwargs, drop_path_rate=0.)
    model.init_weights()
    if eps is not None:
        # mmdet uses 1e-6 everywhere; the authors' patch-embedding and reduction norms use 1e-5.
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm) and (name.endswith('.0.norm') or name.endswith('attn.norm')):
                m.eps = eps
    return model.eval()


MMDET_CASES = {
    'b0': ('PyramidVisionTransformerV2', dict(embed_dims=32, num_layers=[2, 2, 2, 2])),
    'b2': ('PyramidVisionTransformerV2', dict(embed_dims=64, num_layers=[3, 4, 6, 3])),
    'tiny': ('PyramidVisionTransformer', dict(embed_dims=64, num_layers=[2, 2, 2, 2])),
    'small': ('PyramidVisionTransformer', dict(embed_dims=64, num_layers=[3, 4, 6, 3])),
}


@pytest.mark.parametrize('arch', list(MMDET_CASES))
@pytest.mark.parametrize('wrapped', [False, True], ids=['backbone', 'detector'])
def test_matches_mmdet_builtin_backbone(arch, wrapped, tmp_path):
    cls_name, kwargs = MMDET_CASES[arch]
    cls = PVT if cls_name == 'PyramidVisionTransformer' else PVTv2
    torch.manual_seed(2)
    aligned = mmdet_pvt(cls_name, kwargs, eps=1e-5)
    state = aligned.state_dict()
    if wrapped:  # a whole mmdet detector checkpoint
        detector = {f'backbone.{k}': v for k, v in state.items()}
        detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
        state = {'meta': {'epoch': 12}, 'state_dict': detector}
    assert PVTv2.checkpoint_format.layout(PVTv2.convert_state_dict(state)) == 'mmpvt'
    torch.save(state, tmp_path / 'mmdet.pth')
    model = load_through_init_cfg(cls, arch, tmp_path / 'mmdet.pth', drop_path_rate=0.)
    x = torch.randn(AWKWARD)
    ours = features(model, x)
    # Same weights and the same eps: the same function, up to fp32 summation order
    # (mmdet runs its linears as 1x1 convolutions and attention through nn.MultiheadAttention).
    assert max_rel_diff(ours, features(aligned, x)) <= 1e-5
    # mmdet's own eps (1e-6 in the two embedding norms) moves features by far less than
    # their scale; measured about 1e-5 relative here, bounded at 1e-3.
    for m in aligned.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    assert max_rel_diff(ours, features(aligned, x)) <= 1e-3


def test_v1_official_release_layout(tmp_path):
    torch.manual_seed(3)
    source = PVT(arch='small', drop_path_rate=0.).eval()
    official = mmpvt_v1_to_official(source.state_dict())
    assert official['pos_embed4'].shape == (1, 50, 512)  # 1 class-token slot + 7 * 7
    assert PVTv2.checkpoint_format.layout(official) == 'official'
    torch.save(official, tmp_path / 'pvt_small.pth')
    model = load_through_init_cfg(PVT, 'small', tmp_path / 'pvt_small.pth', drop_path_rate=0.)
    x = torch.randn(AWKWARD)
    assert max_abs_diff(features(model, x), features(source, x)) == 0


@pytest.mark.parametrize('layout', ['official', 'timm', 'mmdet', 'mmpvt'])
def test_conversion_is_pure_and_idempotent(layout):
    if layout in ('official', 'timm'):
        state = timm_reference('b0')[0]
        state = timm_v2_to_official(state) if layout == 'official' else state
    elif layout == 'mmdet':
        state = mmdet_pvt(*MMDET_CASES['tiny']).state_dict()
    else:
        state = PVTv2(arch='b0').state_dict()
    before = {k: v.clone() for k, v in state.items()}
    once = PVTv2.convert_state_dict(state)
    twice = PVTv2.convert_state_dict(once)
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert not any(k.startswith(('head', 'cls_token', 'norm.')) for k in once)


def test_state_dict_round_trip():
    model = PVT(arch='tiny')
    converted = PVTv2.convert_state_dict(model.state_dict())
    fresh = PVT(arch='tiny')
    fresh.load_state_dict(converted, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_reference_resize_is_mmdets(tmp_path):
    """The tests' bilinear resize is the one mmdet's built-in PVT applies to its embeddings."""
    from mmdet.models.backbones.pvt import AbsolutePositionEmbedding
    embedding = AbsolutePositionEmbedding(pos_shape=14, pos_dim=8)
    embedding.init_weights()
    pos = embedding.pos_embed.detach()
    for hw in ((7, 7), (28, 28), (7, 10), (20, 9)):
        assert torch.equal(bilinear_resize(pos, 14, hw), embedding.resize_pos_embed(pos, hw))


@functools.cache
def pvt_tiny_448():
    """A PVT-Tiny state dict whose position embeddings were learned at 448x448."""
    torch.manual_seed(4)
    return PVT(arch='tiny', pretrain_img_size=448).state_dict()


# A non-square target grid catches height and width swapped.
@pytest.mark.parametrize('layout, size', [('mmpvt', 224), ('official', (224, 320))],
                         ids=['mmpvt-224', 'official-224x320'])
def test_v1_position_embeddings_from_another_pretraining_size_are_resized(layout, size, tmp_path):
    """Embeddings learned at 448 load into a 224 (or 224x320) model resized bilinearly, each logged."""
    source = pvt_tiny_448()
    # The authors' files carry the class token's slot in front of the last stage's embedding.
    torch.save(mmpvt_v1_to_official(source) if layout == 'official' else source, tmp_path / 'pvt_448.pth')
    with logged_messages() as messages:
        model = load_through_init_cfg(PVT, 'tiny', tmp_path / 'pvt_448.pth', pretrain_img_size=size)
    h, w = (size, size) if isinstance(size, int) else size
    for i, stride in enumerate((4, 8, 16, 32)):
        key, side, hw = f'stages.{i}.pos_embed', 448 // stride, (h // stride, w // stride)
        loaded = model.state_dict()[key]
        expected = bilinear_resize(source[key], side, hw)
        # The same interpolation on another memory layout: equal up to float rounding.
        torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-7,
                                   msg=lambda detail, key=key: f'{key} is not the bilinear resize: {detail}')
        assert (f"{key}: fitted the checkpoint's {tuple(source[key].shape)} "
                f"to the model's {tuple(loaded.shape)}") in messages


def test_other_variant_is_refused_with_key_and_shapes(tmp_path):
    torch.save(PVTv2(arch='b2').state_dict(), tmp_path / 'b2.pth')
    with pytest.raises(CheckpointError, match=r'stages\.0\.patch_embed\.proj\.weight has shape '
                                              r'\(64, 3, 7, 7\) in the checkpoint and \(32, 3, 7, 7\)'):
        load_through_init_cfg(PVTv2, 'b0', tmp_path / 'b2.pth')


def test_deeper_variant_of_same_width_is_refused(tmp_path):
    torch.save(PVTv2(arch='b2').state_dict(), tmp_path / 'b2.pth')
    with pytest.raises(CheckpointError, match=r'stages\.0\.blocks\.2\..* is not in the model'):
        load_through_init_cfg(PVTv2, 'b1', tmp_path / 'b2.pth')
    with pytest.raises(CheckpointError, match=r'stages\.0\.blocks\.2\..* is missing from the checkpoint'):
        torch.save(PVTv2(arch='b1').state_dict(), tmp_path / 'b1.pth')
        load_through_init_cfg(PVTv2, 'b2', tmp_path / 'b1.pth')


def test_v1_checkpoint_into_v2_is_refused(tmp_path):
    torch.save(PVT(arch='small').state_dict(), tmp_path / 'small.pth')
    with pytest.raises(CheckpointError, match=r'small\.pth: .*stages\.0\.patch_embed\.proj\.weight has '
                                              r'shape \(64, 3, 4, 4\) in the checkpoint and \(64, 3, 7, 7\)'):
        load_through_init_cfg(PVTv2, 'b2', tmp_path / 'small.pth')


def test_missing_and_unknown_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_through_init_cfg(PVTv2, 'b0', tmp_path / 'nope.pth')
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'resnet.pth')
    with pytest.raises(ValueError, match='not a PVT state dict'):
        load_through_init_cfg(PVTv2, 'b0', tmp_path / 'resnet.pth')


def test_load_logs_missing_and_unexpected_keys(tmp_path):
    torch.save(timm_v2_to_official(timm_reference('b0')[0]), tmp_path / 'pvt_v2_b0.pth')
    torch.save(PVTv2(arch='b1').state_dict(), tmp_path / 'b1.pth')
    logger = MMLogger.get_current_instance()
    handler = logging.Handler()
    records = []
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        load_through_init_cfg(PVTv2, 'b0', tmp_path / 'pvt_v2_b0.pth')
        assert records[-2:] == ['PVTv2: missing keys: none', 'PVTv2: unexpected keys: none']
        with pytest.raises(CheckpointError):
            load_through_init_cfg(PVTv2, 'b2', tmp_path / 'b1.pth')
        missing = records[-2]
        assert missing.startswith('PVTv2: missing keys: stages.0.blocks.2.norm1.weight, ')
        assert missing.count('stages.2.blocks.5.') > 0 and records[-1] == 'PVTv2: unexpected keys: none'
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/'www' (the test's own files only)."""
    root = tmp_path / 'www'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_checkpoint_from_url_is_downloaded_once_and_loaded(http_server, tmp_path, monkeypatch):
    """Two models from one URL: the server answers one request, the second load reads the cache."""
    root, url = http_server
    requests = []  # (method, path, status) of every request the server answered

    def log_request(handler, code='-', size='-'):
        requests.append((handler.command, handler.path, int(code)))

    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, 'log_request', log_request)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    state, x, refs, _ = timm_reference('b0')
    torch.save(timm_v2_to_official(state), root / 'pvt_v2_b0.pth')
    for _ in range(2):
        model = load_through_init_cfg(PVTv2, 'b0', f'{url}/pvt_v2_b0.pth')
        assert max_rel_diff(features(model, x), refs) <= 1e-5
        assert requests == [('GET', '/pvt_v2_b0.pth', 200)]
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'pvt_v2_b0.pth').is_file()


def test_failed_download_names_url_and_how_to_skip(http_server, tmp_path, monkeypatch):
    _, url = http_server
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with pytest.raises(CheckpointError, match=r'could not download .*/missing\.pth.*init_cfg=None'):
        load_through_init_cfg(PVTv2, 'b0', f'{url}/missing.pth')


def test_convert_checkpoint_cli_advises_its_own_way_round_a_failed_download(http_server, tmp_path, python):
    """The tool takes no --cfg-options: its offline advice is the local file, not a config key."""
    _, url = http_server
    result = subprocess.run(
        [python, 'tools/convert_checkpoint.py', f'{url}/missing.pth', str(tmp_path / 'out.pth')],
        cwd=ROOT_DIR, capture_output=True, text=True, env={**os.environ, 'TORCH_HOME': str(tmp_path / 'hub')})
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f'error: could not download {url}/missing.pth') and '--cfg-options' not in error
    assert error.endswith('or download it by hand and give this tool the local file'), error


def test_convert_checkpoint_cli(tmp_path, python):
    torch.save(timm_v2_to_official(timm_reference('b0')[0]), tmp_path / 'pvt_v2_b0.pth')
    result = subprocess.run(
        [python, 'tools/convert_checkpoint.py', tmp_path / 'pvt_v2_b0.pth', tmp_path / 'out.pth'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True)
    assert 'official layout' in result.stdout and '3.41M parameters' in result.stdout
    assert 'head.weight' in result.stdout
    model = PVTv2(arch='b0')
    model.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True), strict=True)
    failed = subprocess.run([python, 'tools/convert_checkpoint.py', tmp_path / 'no.pth', tmp_path / 'x.pth'],
                            cwd=ROOT_DIR, capture_output=True, text=True)
    assert failed.returncode == 1 and 'checkpoint not found' in failed.stderr


# -- checkpoints built from the sources' own key manifests -----------------------------------
# manifests/ holds the tensor names and shapes of the authors' classification models, timm's
# pvt_v2 and mmdet's built-in PVTs, every variant (see manifests/README.md). A checkpoint built
# from one, in the form its source ships, must load with no key missing, none left over but
# the classification ones, and every tensor where the layout puts it.
MANIFESTS = {path.stem: read_manifest(path) for path in sorted(MANIFEST_DIR.glob('*.json'))}
MANIFEST_CASES = [(stem, arch) for stem, manifest in MANIFESTS.items() for arch in manifest['variants']]
# What a source holds for classification only, which the converter documents dropping (head,
# final norm, class token); mmdet's backbones hold none.
CLASSIFICATION_ONLY = {'official': re.compile(r'head\.|norm\.|cls_token$'), 'timm': re.compile(r'head\.'),
                       'mmdet': None}


def source_of(layout, family, key):
    """Where ``layout`` keeps mmpvt's ``key``, and the transform to mmpvt's tensor."""
    if layout == 'official':
        return official_source(key)
    if layout == 'timm':
        return timm_source(key)
    return mmdet_source(key, v1=family == 'PVT')


def as_shipped(layout, tensors):
    """``tensors`` in the file form their source publishes: the authors' and timm's files are
    plain state dicts; mmdet's are detector checkpoints (``state_dict``, ``backbone.`` prefix)."""
    if layout != 'mmdet':
        return dict(tensors)
    detector = {f'backbone.{k}': v for k, v in tensors.items()}
    detector['neck.fpn_convs.0.conv.weight'] = torch.zeros(1)
    detector['bbox_head.retina_cls.weight'] = torch.zeros(1)
    return {'meta': {'mmdet_version': '3.3.0', 'epoch': 12}, 'state_dict': detector}


def fully_loaded(arch):
    """Loaded from a file through init_cfg, values compared: the smallest variant of each
    family. Building a larger model takes seconds, so the other variants' conversion is checked
    against the model built on the meta device (every name and shape, no values)."""
    return arch in ('tiny', 'b0')


@pytest.mark.parametrize('stem, arch', MANIFEST_CASES, ids=[f'{s}-{a}' for s, a in MANIFEST_CASES])
def test_checkpoints_built_from_source_manifests_load_completely(stem, arch, tmp_path):
    manifest = MANIFESTS[stem]
    layout, family = manifest['layout'], manifest['family']
    cls = {'PVT': PVT, 'PVTv2': PVTv2}[family]
    full = fully_loaded(arch)
    tensors = {k: torch.randn(shape, device='cpu' if full else 'meta')
               for k, shape in manifest['variants'][arch].items()}
    checkpoint = as_shipped(layout, tensors)
    if full:
        torch.save(checkpoint, tmp_path / f'{stem}_{arch}.pth')
        with logged_messages() as messages:
            loaded = load_through_init_cfg(cls, arch, tmp_path / f'{stem}_{arch}.pth').state_dict()
        assert f'{family}: missing keys: none' in messages and f'{family}: unexpected keys: none' in messages
    else:
        with torch.device('meta'):
            own = cls(arch=arch).state_dict()
        loaded = PVTv2.convert_state_dict(checkpoint)
        assert sorted(own.keys() - loaded.keys()) == [], 'missing from the converted checkpoint'
        assert sorted(loaded.keys() - own.keys()) == [], 'not in the model'
        assert [k for k in own if own[k].shape != loaded[k].shape] == [], 'shapes differ'
    # Every tensor of the model is the one the source's layout puts there.
    used = set()
    for key, value in loaded.items():
        name, transform = source_of(layout, family, key)
        assert name in tensors, f'{key} comes from {name} in the {layout} layout, which {stem} lacks'
        expected = transform(tensors[name])
        assert value.shape == expected.shape, key
        assert value.device.type == 'meta' or torch.equal(value, expected), f'{key} is not {name}'
        used.add(name)
    # Nothing is left over but what the source holds for classification.
    classification = CLASSIFICATION_ONLY[layout]
    documented = sorted(k for k in tensors if classification and classification.match(k))
    assert sorted(tensors.keys() - used) == documented
