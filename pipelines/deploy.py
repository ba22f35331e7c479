"""Schedule the reproduction: a nightly deployment of the ``reproduce`` flow.

Two ways, both need a Prefect server (``prefect server start``) and PREFECT_API_URL pointing at it:

1. Serve from this process (simplest; the nightly run reproduces this workspace, here):
       python -m pipelines.deploy --cron "0 3 * * *"
2. On the workers (README "Scale out"): ``BEYONDLM_REPO=<git url> prefect deploy --all`` registers
   prefect.yaml's ``reproduce-dispatched/nightly``, which clones the repository and dispatches
   every stale stage to the ``cpu``/``gpu`` pools (``pipelines/dispatch.py``).
"""

from __future__ import annotations

import argparse

from pipelines.reproduce import reproduce


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cron", default="0 3 * * *", help="schedule (default: nightly at 03:00)")
    p.add_argument("--name", default="nightly-reproduce-served")  # prefect.yaml's is ...-pool: distinct
    args = p.parse_args()
    reproduce.serve(name=args.name, cron=args.cron, tags=["beyondlm", "nightly"])


if __name__ == "__main__":
    main()
