"""Evaluate a checkpoint on a config's test set and print its metrics table.

    python tools/test.py CONFIG CHECKPOINT [--out FILE.pkl] [--show-dir DIR] [--work-dir DIR]
                         [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]

The evaluator of the config prints its own summary (COCO's AP table for mmdet, mmseg's
per-class IoU table); the last lines are a markdown table ``| metric | value |`` of all
returned metrics, which scripts parse. An evaluator that returns no metrics (an mmdet COCO
metric when the model predicted no box) ends the run with an error naming it, exit status 1.
"""
import argparse

from mmengine.runner import Runner

from mmpvt import cli
from mmpvt.apis import check_checkpoint_fits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a checkpoint with mmengine\'s Runner.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument('--show-dir', help='draw predictions on every test image into this directory')
    cli.add_run_arguments(parser, 'where the test log goes', 'test_dataloader.batch_size=2')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = cli.load_run_config(args)
    cfg.load_from = str(cli.check_file(args.checkpoint, 'checkpoint'))
    if args.out:
        cli.add_dump(cfg, args.out)
    if args.show_dir:
        cli.enable_show_dir(cfg, args.show_dir)
    cli.check_data(cfg, ('test',))
    if args.check_only:  # what dist_*.sh runs once, before starting the workers
        cli.report_checks_passed(cfg)
        return
    cli.setup_distributed(cfg, args.launcher)
    with cli.explain_data_errors(cfg, ('test',)):
        runner = Runner.from_cfg(cfg)
        _ = runner.test_loop  # builds the dataset: a broken annotation file is named before the checkpoint
        # mmengine's loader would only log tensors the checkpoint lacks and test random ones.
        check_checkpoint_fits(runner.model, cfg.load_from)
        metrics = runner.test()
    if cli.is_main_process():  # no metrics at all is an error, naming the evaluator
        print(cli.format_metrics(metrics, evaluator=runner.test_loop.evaluator), flush=True)


if __name__ == '__main__':
    cli.run_tool(main)
