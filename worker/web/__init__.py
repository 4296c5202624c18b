"""The web worklist (``cxr-triage web``): FastAPI, server-rendered Jinja2 pages, vendored htmx."""
