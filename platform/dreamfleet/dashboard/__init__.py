"""The operators' web dashboard: runs, subjects, experts and the serving layer (control plane).

``dreamfleet.dashboard.server.build_dashboard_app(DashboardConfig(...))`` is a FastAPI app: run
it alone (`dreamfleet dashboard`) or deploy it beside the serving app (``dashboard_deployment``).
Nothing is imported here, so that `dreamfleet --help` stays instant.
"""
