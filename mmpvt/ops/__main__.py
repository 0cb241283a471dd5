"""``python -m mmpvt.ops``: which code path mmpvt's compiled operators run here, and why."""
import sys

from .dwconv_gelu import describe, isa


def main() -> int:
    """Prints the report; exit status 1 when ``MMPVT_DWCONV_GELU_ISA`` cannot be honoured."""
    print(describe())
    try:
        isa()
    except ValueError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
