"""`costwarden result`: report how a change ended (merged, closed, reverted) from CI.

    costwarden result --server https://costwarden-ingest.costwarden-system.svc:8081 \\
        --ca-file ca.crt --token-file /var/run/secrets/costwarden/results-token \\
        --repository acme/api --change 123 --outcome merged

The token is a service-account token for the audience ``costwarden.io/results`` (a
TeamBudget lists the service account in ``spec.attribution.resultReporters``) or the
admin's results token (docs/attribution.md). The operator answers with the teams whose
books the outcome changed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from costwarden.api.results import ChangeResult

ENV_SERVER = "COSTWARDEN_RESULTS_URL"
ENV_TOKEN = "COSTWARDEN_RESULTS_TOKEN"
ENV_CA = "COSTWARDEN_RESULTS_CA"
RETRIED = {502, 503, 504}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "result",
        help="report a change's outcome (merged, closed, reverted) to the operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        default=os.environ.get(ENV_SERVER, ""),
        help=f"the operator's ingestion URL (https://host:port; default ${ENV_SERVER})",
    )
    parser.add_argument("--repository", default="", help="owner/name of the repository")
    parser.add_argument("--change", required=True, help="pull-request number or ticket id")
    parser.add_argument(
        "--outcome", required=True, choices=[r.value for r in ChangeResult], help="how it ended"
    )
    parser.add_argument("--time", help="when it ended (ISO 8601; default: now)")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token (default: ${ENV_TOKEN})",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=Path(os.environ[ENV_CA]) if os.environ.get(ENV_CA) else None,
        help=f"CA bundle that signed the operator's certificate (default ${ENV_CA}; the "
        "chart publishes it in the ConfigMap costwarden-ingest-ca)",
    )
    parser.add_argument(
        "--attempts", type=int, default=5, help="tries while the operator is unavailable"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import httpx

    if not args.server:
        print(f"costwarden result: --server (or ${ENV_SERVER}) is required", file=sys.stderr)
        return 2
    token = (
        args.token_file.read_text().strip() if args.token_file else os.environ.get(ENV_TOKEN, "")
    )
    if not token:
        print(f"costwarden result: --token-file (or ${ENV_TOKEN}) is required", file=sys.stderr)
        return 2
    body: dict[str, Any] = {
        "repository": args.repository,
        "change": args.change,
        "outcome": args.outcome,
    }
    if args.time:
        body["time"] = args.time
    verify: Any = str(args.ca_file) if args.ca_file else True
    url = args.server.rstrip("/") + "/v1/results"
    headers = {"Authorization": f"Bearer {token}"}
    answer: httpx.Response | None = None
    error = ""
    with httpx.Client(verify=verify, timeout=15) as http:
        for attempt in range(max(1, args.attempts)):
            if attempt:
                # Backoff between tries of an unavailable operator (leader handover, restart).
                time.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random() / 2))  # noqa: S311
            try:
                answer = http.post(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                answer, error = None, f"{type(exc).__name__}: {exc}"
                continue
            if answer.status_code not in RETRIED:
                break
    if answer is None:
        print(f"costwarden result: {url} did not answer: {error}", file=sys.stderr)
        return 1
    try:
        shown: Any = answer.json()
    except ValueError:
        shown = answer.text[:2000]
    if answer.status_code != 200:
        print(f"costwarden result: HTTP {answer.status_code}: {json.dumps(shown)}", file=sys.stderr)
        return 1
    print(json.dumps(shown, indent=2))
    return 0


__all__ = ["register", "run"]
