"""Serve the flow ``leo`` as the deployment ``leo/full`` on this machine.

Usage (a Prefect server reachable at ``$PREFECT_API_URL``)::

    python -m pipeline.serve                 # then, from any shell:
    prefect deployment run leo/full          # the whole DAG with the params in params.yaml
    prefect deployment run leo/full -p preset=mini -p dataset=miniImageNet

The served process runs each flow run in a subprocess with this environment (set
``LEO_DATA_DIR`` here for the download stage), one flow run at a time. For other machines
(a GPU worker), deploy the same flow to a work pool instead: see ``prefect.yaml``.
"""

from __future__ import annotations

from pipeline.flow import leo_flow


def main() -> None:
    """Register ``leo/full`` and serve it until interrupted."""
    leo_flow.serve(
        name="full",
        description="LEO pipeline: every DVC stage up to reports/metrics.json, one task each.",
        tags=["leo", "dvc"],
        limit=1,  # one flow run at a time: DVC runs one stage at a time per workspace
    )


if __name__ == "__main__":
    main()
