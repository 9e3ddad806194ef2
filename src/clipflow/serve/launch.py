"""`bentoml serve` with a Prometheus folder of the server's own, so two servers on one machine keep their metrics.

    python -m clipflow.serve.launch serve clipflow-clip:latest --host 127.0.0.1 --port 3000

It takes the arguments of the `bentoml` command and runs it in this process, after
`clipflow.serve.bentoml_patches.own_metrics_folder()`: BentoML itself keeps every server's
metrics in one folder of its home and empties it whenever a server starts.
"""

from __future__ import annotations

import sys

from clipflow.serve import bentoml_patches


def main(argv: list[str]) -> None:
    """Run the `bentoml` command line with `argv` (`serve TAG ...`); exits with its status."""
    bentoml_patches.own_metrics_folder()
    from bentoml_cli.cli import cli

    cli.main(args=argv, prog_name="bentoml")


if __name__ == "__main__":
    main(sys.argv[1:])
