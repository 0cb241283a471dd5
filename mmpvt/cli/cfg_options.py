"""Checking ``--cfg-options`` keys before a run: a misspelt key is an error, not a silent no-op."""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any

from mmengine.config import Config

from ..errors import LaunchError

# Top-level keys that mmengine reads from a config besides the arguments of Runner.__init__
# (Runner.from_cfg, wrap_model, train) and the ones mmpvt's tools set.
RUNNER_EXTRA_KEYS = ('custom_imports', 'sync_bn', 'find_unused_parameters', 'activation_checkpointing',
                     'efficient_conv_bn_eval', 'compile', 'model_wrapper_cfg', 'gpu_ids')
# What mmengine's Runner.build_dataloader takes besides torch's DataLoader arguments.
DATALOADER_EXTRA_KEYS = ('dataset', 'sampler', 'batch_sampler', 'collate_fn', 'worker_init_fn',
                         'num_batch_per_epoch', 'disable_subprocess_warning')


def _runner_arguments() -> list[str]:
    from mmengine.runner import Runner
    return [name for name in inspect.signature(Runner.__init__).parameters if name != 'self']


@functools.cache
def _registries(scope: str) -> list[Any]:
    """Every registry of ``scope`` (``mmdet``, ``mmseg``, ``mmengine``), with its modules registered.

    A scope's registries find mmengine's through their parent, so ``IterBasedTrainLoop`` or
    ``CheckpointHook`` resolve from ``mmdet.registry`` too.
    """
    from mmengine.registry import Registry
    try:
        module = importlib.import_module(f'{scope}.registry')
    except ImportError:
        module = importlib.import_module('mmengine.registry')
    if module.__name__ != 'mmengine.registry':
        try:
            utils = importlib.import_module(f'{scope}.utils')
            utils.register_all_modules(init_default_scope=False)
        except (ImportError, AttributeError):
            pass  # a scope without that helper: its registries import their locations on lookup
    return [value for value in vars(module).values() if isinstance(value, Registry)]


def _resolve_types(type_: Any, scope: str) -> list[Any]:
    """The classes or functions a config's ``type`` may name; empty if no registry knows it."""
    if not isinstance(type_, str):
        return [type_] if callable(type_) else []
    found = []
    for registry in _registries(scope):
        try:
            obj = registry.get(type_)
        except Exception:  # a registry that cannot import its locations knows nothing here
            obj = None
        if obj is not None and obj not in found:
            found.append(obj)
    return found


def _forwards_kwargs_to_super(init: Any, varkw: str) -> bool:
    """Whether ``init`` passes its ``**varkw`` on to ``super().__init__`` (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        func = getattr(node, 'func', None)
        if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == '__init__'):
            continue
        owner = func.value
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == 'super':
            if any(kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id == varkw
                   for kw in node.keywords):
                return True
    return False


def _parameters(obj: Any) -> list[str] | None:
    """The keyword arguments ``obj`` (a class or function) takes by name; None if it takes any.

    A class whose ``__init__`` takes ``**kwargs`` only to hand them to ``super().__init__``
    (``PVTv2(arch, **kwargs)``, most mmdet heads) takes its base classes' arguments too: those
    are collected along the MRO, so a misspelt backbone argument is still caught.
    """
    if not inspect.isclass(obj):
        try:
            parameters = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return None  # e.g. a builtin without a signature: nothing to check against
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    names: list[str] = []
    for cls in obj.__mro__:
        init = cls.__dict__.get('__init__')
        if init is None:
            continue
        if cls is object:
            break
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            return None
        names += [p.name for p in parameters
                  if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        varkw = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if varkw is None:
            break
        if not _forwards_kwargs_to_super(init, varkw):
            return None  # kwargs used some other way: any key may be right
    return names


def _suggest(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    return f' (did you mean {" or ".join(matches)}?)' if matches else ''


def _check_new_key(key: str, path: list[str], name: str, node: Mapping[str, Any],
                   options: Mapping[str, Any], scope: str) -> None:
    """Checks ``name``, missing from the dict ``node`` at ``path``, against what builds that dict."""
    where = '.'.join(path)
    type_ = options.get(f'{where}.type', node.get('type'))  # an override may change the type too
    if type_ is None:
        if len(path) == 1 and path[0].endswith('_dataloader'):  # built by the Runner itself
            from torch.utils.data import DataLoader
            allowed = [*(_parameters(DataLoader) or []), *DATALOADER_EXTRA_KEYS]
            if name not in allowed:
                raise LaunchError(f'unknown --cfg-options key {key}: {where} takes no {name!r}'
                                  f'{_suggest(name, allowed)}')
        # Other dicts without a type take free-form keys (a model's train_cfg/test_cfg, a
        # dataset's filter_cfg, env_cfg): their readers accept anything.
        return
    targets = _resolve_types(type_, scope)
    if not targets:
        return  # a type no registry knows (e.g. test_cfg's nms) is read by its owner, not built
    allowed = []
    for target in targets:
        parameters = _parameters(target)
        if parameters is None or name in parameters:
            return
        allowed += parameters
    type_name = type_ if isinstance(type_, str) else getattr(type_, '__name__', str(type_))
    hint = _suggest(name, [*allowed, *node])
    arguments = '' if hint else f'; its arguments: {", ".join(dict.fromkeys(allowed))}'
    raise LaunchError(f'unknown --cfg-options key {key}: {where} builds {type_name}, which takes no '
                      f'argument {name!r}{hint}{arguments}')


def check_cfg_options(cfg: Config, options: Mapping[str, Any]) -> None:
    """Raises LaunchError for an override key that names nothing the run would read.

    mmengine's ``merge_from_dict`` adds unknown keys silently: ``train_cfg.max_iter=5`` would
    train the full schedule. Each key is walked through the config (list items by index):

    * every part exists: it overrides a value, fine;
    * the first missing part is at the top level: it must be an argument of mmengine's
      Runner (``randomness``, ``resume``) or a key mmengine reads from the config;
    * it is missing in a deeper dict with a ``type``: the type is looked up in the registries
      of the config's ``default_scope`` and must take the key as a keyword argument (or take
      ``**kwargs``); a dataloader dict must take it as a DataLoader argument;
    * a dict without a type or a type no registry knows cannot be checked and is accepted;
    * a part below a value that is not a dict (``init_cfg=None``) is refused unless the
      options also give ``<that value>._delete_=True``, which mmengine needs to replace it.

    The error names the key and the closest existing names.
    """
    scope = cfg.get('default_scope') or 'mmengine'
    top: dict[str, Any] = dict(cfg.items())
    for key in options:
        parts = key.split('.')
        node: Any = top
        for depth, part in enumerate(parts):
            if part == '_delete_':
                break
            if isinstance(node, Mapping):
                if part in node:
                    node = node[part]
                    continue
                if depth == 0:
                    allowed = [*_runner_arguments(), *RUNNER_EXTRA_KEYS]
                    if part not in allowed:
                        raise LaunchError(
                            f'unknown --cfg-options key {key}: {part!r} is neither in the config nor an '
                            f"argument of mmengine's Runner{_suggest(part, [*allowed, *top])}")
                else:
                    _check_new_key(key, parts[:depth], part, node, options, scope)
                break
            if isinstance(node, (list, tuple)):
                if part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                    continue
                raise LaunchError(f'unknown --cfg-options key {key}: {".".join(parts[:depth])} is a list of '
                                  f'{len(node)} items, indexed 0..{len(node) - 1}; {part!r} is none of them')
            # Below a value that is not a dict: mmengine replaces it by a dict only with _delete_.
            where = '.'.join(parts[:depth])
            if f'{where}._delete_' not in options:
                raise LaunchError(f'--cfg-options key {key}: {where} is {node!r} in the config, not a dict; '
                                  f'to put a dict there, add {where}._delete_=True')
            break
    for key, value in options.items():
        if key.endswith('.type'):
            _check_kept_keys(key[:-len('.type')], value, top, options, scope)


def _check_kept_keys(where: str, type_: Any, top: Mapping[str, Any], options: Mapping[str, Any],
                     scope: str) -> None:
    """A type changed by an override keeps the dict's other keys, written for the old type
    (``train_cfg.type=IterBasedTrainLoop`` keeps an epoch loop's ``max_epochs``, and mmengine
    stops with a TypeError about it): refuses a kept key the new type does not take, naming
    it and the new type's arguments, unless the options replace the dict (``_delete_``)."""
    if f'{where}._delete_' in options:
        return
    node: Any = top
    for part in where.split('.'):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return  # a new dict: every key of it was checked as a new key
    if not isinstance(node, Mapping):
        return
    targets = _resolve_types(type_, scope)
    accepted = [_parameters(target) for target in targets]
    if not targets or any(names is None for names in accepted):
        return  # unknown to the registries, or takes any keyword
    allowed = [name for names in accepted for name in names]
    kept = [name for name in node  # '_scope_' and the like are mmengine's own
            if not name.startswith('_') and name != 'type' and f'{where}.{name}' not in options
            and name not in allowed]
    if kept:
        old = node.get('type')
        old = old if isinstance(old, str) else getattr(old, '__name__', str(old))
        arguments = ', '.join(name for name in dict.fromkeys(allowed) if name not in ('runner', 'dataloader'))
        raise LaunchError(
            f'--cfg-options {where}.type={type_}: {where} keeps {", ".join(map(repr, kept))} from the '
            f'config\'s {old}, which {type_} does not take; replace the whole dict with '
            f'{where}._delete_=True and {type_}\'s own keys (its arguments: {arguments})')
