"""The base of every mmpvt backbone: what a dense-prediction backbone owes its users.

A family (PVT, PVTv2, ...) states its variants and fixed design as class attributes, builds
its layers and writes ``forward``. Everything that is the same for every family lives here:
resolving ``arch`` (a variant name or a dict), checking ``out_indices`` and
``frozen_stages``, freezing, ``norm_eval``, the input checks, loading ``init_cfg`` through
the family's own checkpoint converter, the load-time shape check that refuses a checkpoint
of another variant on every load path, the output contract known without running
(``out_channels``, ``out_strides``, ``size_divisor``) and the layer numbering that
layer-wise learning-rate decay reads (``num_layers``, ``layer_id``).

What a family provides:

- class attributes ``arch_zoo`` (variant name -> settings), ``required_arch_keys`` (what an
  arch dict must hold), and where they differ from the defaults ``min_input_size``,
  ``size_divisor`` and ``num_levels``;
- ``checkpoint_format``: its :class:`~mmpvt.checkpoint.CheckpointFormat` (unwrap, detect the
  layout, convert, list the dropped keys; the same names in every family), which
  ``convert_state_dict`` and ``init_cfg`` use;
- in ``__init__``, after calling this base's ``__init__`` and building its layers:
  ``level_channels`` and ``level_strides`` (every level, not only ``out_indices``), then a
  call to :meth:`DenseBackbone.freeze_stages`;
- ``frozen_modules(k)``, ``num_layers``, ``layer_id(name)``, ``forward`` (which calls
  :meth:`DenseBackbone.check_input`), and optionally ``_complete_arch`` (defaults and checks
  of the resolved arch);
- for loading, what it has, as data: ``optional_groups`` (tensors a checkpoint may lack as a
  whole by design), ``rel_pos_tables`` and :meth:`position_grids` (tables learned at another
  size, fitted on load), :meth:`unbuilt_prefixes` (tensors of levels not built, skipped); the
  base's :meth:`adapt_loaded_state_dict` does the rest, on every load path. Blocks read
  :meth:`drop_path_rates` and :attr:`recompute`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmengine.logging import MMLogger, print_log
from mmengine.model import BaseModule
from torch import nn

from ..checkpoint import CheckpointFormat, load_backbone_checkpoint, shape_mismatch
from .attention import resize_rel_pos
from .layers import HW, resize_pos_embed

# The normalisation layers that ``norm_eval`` keeps in eval mode during training.
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _fit_loaded_state_dict(module: DenseBackbone, state_dict: dict[str, Any], prefix: str,
                           *args: Any) -> None:
    """The load_state_dict pre-hook: every load path (init_cfg, load_from, --resume, user
    code) passes the backbone's part of the state dict through the shape check."""
    module.adapt_loaded_state_dict(state_dict, prefix)


class DenseBackbone(BaseModule):
    """A backbone for detection and segmentation: maps at strides 4, 8, 16 and 32, handed
    out as contiguous NCHW tensors (``layers.nchw_maps``).

    Args:
        arch: a variant name of the family (a key of ``arch_zoo``) or a dict holding at
            least ``required_arch_keys``.
        in_channels: channels of the input image.
        out_indices: levels whose maps ``forward`` returns, 0-based (level ``k`` of the
            four levels has stride ``4 * 2**k``); returned in increasing order.
        frozen_stages: the first ``frozen_stages`` stages (what ``frozen_modules`` names)
            get no gradients and stay in eval mode; -1 or 0 freezes nothing.
        norm_eval: keep every normalisation layer in eval mode during training (frozen
            batch statistics for small per-GPU batches).
        with_cp: activation checkpointing, stored for the family to apply: less memory,
            more time.
        check_finite: in training, raise FloatingPointError on a batch holding NaN or inf
            instead of training on it (one reduction over the input per step).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads a checkpoint in
            any layout the family's ``convert_state_dict`` knows; other init_cfgs work as in
            mmengine.
    """

    # Set by each family.
    arch_zoo: dict[str, dict[str, Any]] = {}
    required_arch_keys: tuple[str, ...] = ()
    # Inputs smaller than this leave too few tokens for the deepest level.
    min_input_size = 32
    # An input padded to a multiple of this gives maps of exactly H / stride x W / stride.
    size_divisor = 32
    num_levels = 4
    # Channels and strides of every level, set by the family once its layers are built.
    level_channels: tuple[int, ...] = ()
    level_strides: tuple[int, ...] = ()
    # Loading (see adapt_loaded_state_dict). Groups of the model's tensors that a checkpoint
    # may lack as a whole by design (a classification file has no output norms): what -> key
    # patterns, a prefix where the pattern ends with '.', a suffix otherwise.
    optional_groups: dict[str, tuple[str, ...]] = {}
    # Suffixes of relative-position tables: one of another length is resized linearly on load.
    rel_pos_tables: tuple[str, ...] = ()
    # What unbuilt_prefixes() name, for the log line of a load that skips them.
    unbuilt_parts = 'levels'

    def __init__(self, arch: str | Mapping[str, Any], in_channels: int = 3,
                 out_indices: int | Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, check_finite: bool = True,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self.resolve_arch(arch)
        self.in_channels = in_channels
        self.out_indices = self.check_out_indices(out_indices)
        if not (frozen_stages == -1 or 0 <= frozen_stages <= self.num_stages):
            raise ValueError(f'frozen_stages must be -1 or in [0, {self.num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.check_finite = check_finite
        self.register_load_state_dict_pre_hook(_fit_loaded_state_dict)

    # -- the family's part ----------------------------------------------------------------
    # How the family reads checkpoints (mmpvt.checkpoint.CheckpointFormat), set by each family.
    checkpoint_format: CheckpointFormat

    @classmethod
    def convert_state_dict(cls, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Any checkpoint layout the family supports -> the model's state dict (pure, idempotent)."""
        return cls.checkpoint_format.convert(checkpoint)

    @property
    def num_stages(self) -> int:
        """How many stages ``frozen_stages`` can freeze; by default one per level."""
        return self.num_levels

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The modules that make up the first ``num_stages`` stages (what freezing covers)."""
        raise NotImplementedError(f'{type(self).__name__} does not say which modules its stages are')

    @property
    def num_layers(self) -> int:
        """The number of blocks layer-wise learning-rate decay counts (``layer_id`` 1..num_layers)."""
        raise NotImplementedError(f'{type(self).__name__} does not number its layers')

    def layer_id(self, name: str) -> int:
        """The layer of parameter ``name`` (relative to the backbone) for layer-wise lr decay.

        0 for the patch and position embeddings, ``i + 1`` for block ``i`` (counted over the
        whole backbone), ``num_layers + 1`` for what follows the last block. Raises
        ValueError for a name that is no parameter of the backbone.
        """
        raise NotImplementedError(f'{type(self).__name__} does not number its layers')

    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Fills the family's defaults into a resolved arch and checks it; raises ValueError."""
        return settings

    def position_grids(self) -> dict[str, tuple[int, HW, str]]:
        """The model's absolute position embeddings: key -> (rows in front of the grid, the
        model's grid, the resize mode). One learned on another square grid is resized on load."""
        return {}

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """Key prefixes of parts a checkpoint may hold that this model does not build (levels
        outside ``out_indices``): skipped on load, with a log line."""
        return ()

    def check_loaded_keys(self, keys: Sequence[str]) -> None:
        """Refuses, with CheckpointError, a checkpoint of a design this family cannot load
        (``keys`` relative to the backbone); the default refuses nothing."""

    def convert_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """What ``init_cfg`` loads: the family's converter (a family may say more as it converts)."""
        return self.convert_state_dict(checkpoint)

    def adapt_tensor(self, name: str, loaded: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
        """A loaded tensor whose shape differs from the model's, fitted to it, or None to refuse.

        ``name`` is the state-dict key relative to the backbone. Fitted: an absolute position
        embedding of :meth:`position_grids` learned on another square grid (its front rows
        kept, the grid resized), a relative-position table (``rel_pos_tables``) of another
        length (resized linearly). Everything else is refused.
        """
        grids = self.position_grids()
        if name in grids and loaded.dim() == 3 and loaded.shape[2] == own.shape[2]:
            rows, grid, mode = grids[name]
            side = math.isqrt(loaded.shape[1] - rows)
            if side * side == loaded.shape[1] - rows:
                resized = resize_pos_embed(loaded[:, rows:], (side, side), grid, mode=mode)
                return torch.cat([loaded[:, :rows], resized], dim=1)
        if self.rel_pos_tables and name.endswith(self.rel_pos_tables) and loaded.dim() == 2 \
                and loaded.shape[1] == own.shape[1]:
            return resize_rel_pos(loaded, own.shape[0])
        return None

    # -- construction -----------------------------------------------------------------------
    def resolve_arch(self, arch: str | Mapping[str, Any]) -> dict[str, Any]:
        """The settings of ``arch``: a copy of the named variant's, or of the dict given."""
        name = type(self).__name__
        if isinstance(arch, str):
            if arch not in self.arch_zoo:
                raise ValueError(f'{name}: unknown arch {arch!r}; valid names: {", ".join(self.arch_zoo)}')
            settings = dict(self.arch_zoo[arch])
        elif isinstance(arch, Mapping):
            missing = [k for k in self.required_arch_keys if k not in arch]
            if missing:
                raise ValueError(f'{name}: arch dict lacks {", ".join(missing)}; '
                                 f'required keys: {", ".join(self.required_arch_keys)}')
            settings = dict(arch)
        else:
            raise TypeError(f'{name}: arch must be a variant name or a dict, got {type(arch).__name__}')
        return self._complete_arch(settings)

    def check_out_indices(self, out_indices: int | Sequence[int]) -> tuple[int, ...]:
        """``out_indices`` as a sorted tuple of distinct levels in ``[0, num_levels - 1]``."""
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        if isinstance(out_indices, (Mapping, str, set)) or not isinstance(out_indices, Sequence):
            # A dict would be taken as its keys, a set in no order: refused, not guessed.
            raise ValueError(f'out_indices must be an int or a sequence of stage indices (a list or tuple), '
                             f'got {type(out_indices).__name__} {out_indices!r}')
        out_indices = tuple(out_indices)
        if not out_indices:
            raise ValueError('out_indices must name at least one stage')
        levels = self.num_levels
        bad = [i for i in out_indices if not (isinstance(i, int) and 0 <= i < levels)]
        if bad or len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices must be distinct stage indices in [0, {levels - 1}], '
                             f'got {out_indices}')
        return tuple(sorted(out_indices))

    # -- the output contract ----------------------------------------------------------------
    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of each returned map, in the order of ``out_indices``."""
        return tuple(self.level_channels[i] for i in self.out_indices)

    @property
    def out_strides(self) -> tuple[int, ...]:
        """Stride of each returned map relative to the input, in the order of ``out_indices``."""
        return tuple(self.level_strides[i] for i in self.out_indices)

    # -- what families build with ------------------------------------------------------------
    @staticmethod
    def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
        """Stochastic depth per block: growing linearly from 0 to ``rate`` over ``num_blocks``
        (the rule of every family's paper). Computed on the CPU, so that models also build
        under a meta-device context."""
        if not 0 <= rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {rate}')
        return torch.linspace(0, rate, num_blocks, device='cpu').tolist()

    def default(self, value: Any, key: str) -> Any:
        """``value``, or the variant's ``key`` (its table's default) when ``value`` is None."""
        return self.arch_settings[key] if value is None else value

    @property
    def recompute(self) -> bool:
        """Whether blocks recompute their activations in backward (``with_cp``): in a
        training step that builds a graph only."""
        return self.with_cp and self.training and torch.is_grad_enabled()

    # -- training-state control -------------------------------------------------------------
    def freeze_stages(self) -> None:
        """Stops gradients into the first ``frozen_stages`` stages and puts them in eval mode.

        Families call it once their layers are built; ``train()`` calls it again, since
        ``nn.Module.train`` would put the frozen stages back into training mode.
        """
        for module in self.frozen_modules(self.frozen_stages) if self.frozen_stages > 0 else ():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> DenseBackbone:
        super().train(mode)
        self.freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, NORM_TYPES):
                    module.eval()
        return self

    # -- weights ----------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Loads ``init_cfg``'s checkpoint in any layout the family knows; other init_cfgs as mmengine."""
        init_cfg = self.init_cfg
        if isinstance(init_cfg, Mapping) and init_cfg.get('type') == 'Pretrained':
            load_backbone_checkpoint(self, init_cfg['checkpoint'], self.convert_checkpoint,
                                     map_location=init_cfg.get('map_location', 'cpu'))
            self._is_init = True
        else:
            super().init_weights()

    def _convert_other_layout(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Renames, in place, a backbone that another implementation of this family saved
        (mmdet's own PVT inside its published RetinaNet checkpoints, a detectron2 ViTDet) to
        this model's names, through the family's ``checkpoint_format``; the rest of the state
        dict (neck, heads) is left as it is. Only when none of the backbone's keys is this
        model's own and the family recognises the layout: anything else is left to the checks
        that follow."""
        inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not inside or not set(inside).isdisjoint(self.state_dict()):
            return
        try:
            layout = self.checkpoint_format.layout(inside)
        except ValueError:  # not this family's checkpoint
            return
        converted = self.checkpoint_format.convert(inside)
        for key in inside:
            del state_dict[prefix + key]
        state_dict.update({prefix + key: value for key, value in converted.items()})
        print_log(f'{type(self).__name__}: read the checkpoint\'s backbone as {layout} '
                  f'({len(inside)} tensors)', MMLogger.get_current_instance())

    def adapt_loaded_state_dict(self, state_dict: dict[str, Any], prefix: str = '') -> None:
        """Fits a state dict about to be loaded to this model, in place, or refuses it.

        In order: :meth:`check_loaded_keys` may refuse the checkpoint's design; tensors under
        :meth:`unbuilt_prefixes` are skipped (one log line); a tensor whose shape differs from
        the model's is passed to ``adapt_tensor``, and unless that fits it CheckpointError
        names the key and both shapes (torch and mmengine would only warn, or fail less
        clearly); an ``optional_groups`` group absent as a whole, beside every other tensor of
        the model, keeps the model's own values (its initialisation), with a warning that
        names it. A group only partly present, and any other key one side lacks, is left to
        the caller to refuse.
        """
        logger = MMLogger.get_current_instance()
        name = type(self).__name__
        self._convert_other_layout(state_dict, prefix)
        self.check_loaded_keys([k[len(prefix):] for k in state_dict if k.startswith(prefix)])
        unbuilt = self.unbuilt_prefixes()
        skipped = [k for k in state_dict
                   if unbuilt and k.startswith(prefix) and k[len(prefix):].startswith(unbuilt)]
        for key in skipped:
            del state_dict[key]
        if skipped:
            print_log(f'{name}: skipped {len(skipped)} checkpoint tensors of {self.unbuilt_parts} outside '
                      f'out_indices {self.out_indices}', logger)
        self._fit_shapes(state_dict, prefix)
        own = self.state_dict()
        groups = {what: [k for k in own if _matches(k, patterns)]
                  for what, patterns in self.optional_groups.items()}
        grouped = {k for keys in groups.values() for k in keys}
        if not all(prefix + k in state_dict for k in own if k not in grouped):
            return
        for what, keys in groups.items():
            if keys and not any(prefix + k in state_dict for k in keys):
                state_dict.update({prefix + k: own[k] for k in keys})
                print_log(f'{name}: the checkpoint has no {what} (expected of a pre-training or '
                          f'classification file): {len(keys)} tensors keep their initialisation', logger,
                          level=logging.WARNING)

    def _fit_shapes(self, state_dict: dict[str, Any], prefix: str) -> None:
        """The shape check of :meth:`adapt_loaded_state_dict`."""
        for name, own in self.state_dict().items():
            key = prefix + name
            loaded = state_dict.get(key)
            if not isinstance(loaded, torch.Tensor) or loaded.shape == own.shape:
                continue
            fitted = self.adapt_tensor(name, loaded, own)
            if fitted is None or fitted.shape != own.shape:
                raise shape_mismatch(key, loaded, own)
            state_dict[key] = fitted
            print_log(f'{key}: fitted the checkpoint\'s {tuple(loaded.shape)} to the model\'s '
                      f'{tuple(own.shape)}', MMLogger.get_current_instance())

    # -- forward ----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raises ValueError unless ``x`` is a ``(B, in_channels, H, W)`` batch with H, W at
        least ``min_input_size``, and, in training with ``check_finite``, FloatingPointError
        if it holds NaN or inf."""
        if torch.onnx.is_in_onnx_export() and not torch.compiler.is_exporting():
            raise RuntimeError(
                f'{type(self).__name__} does not export through the TorchScript-based ONNX exporter '
                '(torch.onnx.export(..., dynamo=False)): it traces the Python size arithmetic as '
                'constants, so the model would hold for the traced size only, or compute wrong values. '
                'Use the default exporter, torch.onnx.export(..., dynamo=True), or tools/deploy/export.py.')
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W) with '
                f'H, W >= {self.min_input_size}; got {tuple(x.shape)}')
        if self.training and self.check_finite and not torch.compiler.is_compiling():
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f'{type(self).__name__} got NaN or inf in its input batch during training; check the '
                    'data pipeline (a corrupt image, a division by a zero std). '
                    'check_finite=False turns this check off.')


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether ``key`` has one of ``patterns``: a prefix where it ends with '.', else a suffix."""
    return any(key.startswith(p) if p.endswith('.') else key.endswith(p) for p in patterns)
