"""Train a detector or segmentor from an mmdet or mmseg config (its default_scope decides).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
                          [--allow-invalid-loss]
                          [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]

One process on the CPU or a GPU; several through tools/dist_train.sh (torchrun) or
tools/slurm_train.sh. Everything else is mmengine's Runner.
"""
import argparse
import sys

from mmengine.runner import Runner

from mmpvt import cli
from mmpvt.engine import InvalidLossError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model with mmengine\'s Runner.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                        help='resume from CKPT, or from the work dir\'s latest checkpoint if none is given')
    parser.add_argument('--amp', action='store_true', help='mixed precision training (GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the total batch size over auto_scale_lr.base_batch_size')
    parser.add_argument('--allow-invalid-loss', action='store_true',
                        help='keep training when the loss becomes NaN or inf (by default the run stops at '
                             'that iteration with an error line, keeping the last good checkpoint)')
    cli.add_run_arguments(parser, 'where logs and checkpoints go', 'train_cfg.max_iters=100')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = cli.load_run_config(args)
    if args.amp:  # checked for a Slurm job on the submitting node: the job's nodes have their own hardware
        cli.enable_amp(cfg, here=not (args.check_only and args.launcher == 'slurm'))
    if args.auto_scale_lr:
        cli.enable_auto_scale_lr(cfg)
    cli.apply_resume(cfg, args.resume)
    cli.add_resume_hooks(cfg)
    if not args.allow_invalid_loss:
        cli.add_loss_check(cfg)
    cli.check_data(cfg, ('train', 'val'))
    if args.check_only:  # what dist_*.sh runs once, before starting the workers
        cli.report_checks_passed(cfg)
        return
    cli.setup_distributed(cfg, args.launcher)
    with cli.explain_data_errors(cfg, ('train', 'val')):
        Runner.from_cfg(cfg).train()


if __name__ == '__main__':
    cli.quiet_third_party_warnings()  # before anything reads a config
    try:
        main()
    except (cli.LaunchError, InvalidLossError) as exc:
        sys.exit(f'error: {exc}')
    cli.leave_process_group()
