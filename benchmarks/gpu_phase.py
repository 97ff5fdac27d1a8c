"""What every GPU-check script shares: the repository on sys.path and the dry run's stop.

The GPU check runs its scripts in an uninstalled tree (the extension built in place), so each
puts the repository root first on sys.path; `--dry-run` runs a script up to its first GPU call,
where it stops with success when the only thing missing is a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def stop_unless_gpu(dry_run: bool, what: str) -> None:
    """Exit here when there is no GPU: successfully in a dry run (everything before the first GPU
    call has run), with an error otherwise."""
    import torch

    if torch.cuda.is_available():
        return
    if dry_run:
        print(f"dry run: {what}: everything before the first GPU call ran; stopping there (no GPU)")
        raise SystemExit(0)
    raise SystemExit(f"{what}: torch sees no GPU (torch {torch.__version__}, CUDA {torch.version.cuda})")
