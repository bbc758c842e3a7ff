"""Keep paused deployment schedules paused across `make serve` (scripts/stack.sh).

`prefect deploy --all` applies prefect.yaml, whose schedule says `active: true`: a schedule an operator paused
(`prefect deployment schedule pause ...`) would silently start again on the next `make serve`. stack.sh runs

    python scripts/schedules.py save FILE      # before deploying: the paused schedules, by deployment and schedule
    python scripts/schedules.py restore FILE   # after: pause those again, and say so

against the Prefect server in PREFECT_API_URL. A schedule is matched by its definition (cron, timezone, ...), so
one changed in prefect.yaml is a new schedule and starts active.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect.client.orchestration import get_client


def _paused(client) -> list[dict]:
    flows: dict = {}
    out = []
    for deployment in client.read_deployments():
        flow = flows.setdefault(deployment.flow_id, client.read_flow(deployment.flow_id).name)
        for schedule in deployment.schedules:
            if not schedule.active:
                out.append({"deployment": f"{flow}/{deployment.name}",
                            "schedule": schedule.schedule.model_dump(mode="json")})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "restore"):
        print("usage: schedules.py save|restore FILE", file=sys.stderr)
        return 2
    mode, path = argv[0], Path(argv[1])
    with get_client(sync_client=True) as client:
        if mode == "save":
            path.write_text(json.dumps(_paused(client), indent=1))
            return 0
        if not path.is_file():
            return 0
        for saved in json.loads(path.read_text()):
            try:
                deployment = client.read_deployment_by_name(saved["deployment"])
            except Exception:  # the deployment is gone from prefect.yaml
                continue
            for schedule in deployment.schedules:
                if schedule.active and schedule.schedule.model_dump(mode="json") == saved["schedule"]:
                    client.update_deployment_schedule(deployment.id, schedule.id, active=False)
                    what = saved["schedule"].get("cron") or saved["schedule"]
                    print(f"kept paused: {saved['deployment']} schedule {what} (resume it with "
                          f"prefect deployment schedule resume '{saved['deployment']}' {schedule.id})")
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
