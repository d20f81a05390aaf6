"""`python -m wam.operators`: run the TrainJob operator (in its pod, or against the current kubeconfig)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf
from prometheus_client import start_http_server

from wam.operators import handlers, kube
from wam.operators.controller import Controller
from wam.operators.settings import SETTINGS_ENV, load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wam.operators", description=__doc__)
    parser.add_argument("--settings", default=os.environ.get(SETTINGS_ENV),
                        help=f"operator settings YAML (the chart renders it); default ${SETTINGS_ENV}")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: off)")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness endpoint /healthz (0: off)")
    parser.add_argument("--log-format", choices=("json", "plain"), default="json")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    settings = load_settings(args.settings)
    kopf.configure(verbose=args.verbose,
                   log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger("wam").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    kube.load_client_config()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    # One replica (the chart's Deployment uses the Recreate strategy), so no peering objects are needed.
    asyncio.run(kopf.operator(
        registry=handlers.registry(settings), settings=handlers.kopf_settings(settings),
        memo=kopf.Memo(controller=Controller(kube.Kube(), settings)), standalone=True,
        clusterwide=not settings.namespaces, namespaces=settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None))


if __name__ == "__main__":
    main()
