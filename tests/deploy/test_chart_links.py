"""By default every link the chart sets points at the controller's Service, whose telemetry
port serves the runbooks and docs shipped in the image; a set base URL is used as given."""

from __future__ import annotations

from tests.deploy.chart import alert_rules, env, manifests, render

SERVED = "http://governor.governor.svc:9100/"  # release governor in namespace governor
GATEWAY = {"enabled": True, "upstream": "http://vllm.models.svc:8000"}


def test_by_default_links_point_at_the_controllers_service() -> None:
    docs = manifests(render({"gateway": GATEWAY, "prometheusRule": {"enabled": True}}))
    controller = env(docs)
    assert controller["GOVERNOR_JOURNAL__RUNBOOK_BASE_URL"]["value"] == SERVED
    assert controller["GOVERNOR_TELEMETRY__PORT"]["value"] == "9100"
    gateway = env(docs, "gateway")
    assert gateway["GOVERNOR_GATEWAY__PROBLEM_BASE_URL"]["value"] == f"{SERVED}docs/gateway.md"
    urls = {r["annotations"]["runbook_url"] for r in alert_rules(docs)}
    assert f"{SERVED}runbooks/GovernorGpuSaturation.md" in urls
    assert all(u.startswith(f"{SERVED}runbooks/") for u in urls)


def test_set_base_urls_are_used_as_given() -> None:
    docs = manifests(
        render(
            {
                "controller": {"runbookBaseUrl": "https://wiki.example.com/governor/"},
                "gateway": {**GATEWAY, "problemBaseUrl": "https://docs.example.com/problems"},
                "prometheusRule": {
                    "enabled": True,
                    "runbookBaseUrl": "https://wiki.example.com/governor/runbooks/",
                },
            }
        )
    )
    assert env(docs)["GOVERNOR_JOURNAL__RUNBOOK_BASE_URL"]["value"] == (
        "https://wiki.example.com/governor/"
    )
    assert env(docs, "gateway")["GOVERNOR_GATEWAY__PROBLEM_BASE_URL"]["value"] == (
        "https://docs.example.com/problems"
    )
    urls = {r["annotations"]["runbook_url"] for r in alert_rules(docs)}
    assert all(u.startswith("https://wiki.example.com/governor/runbooks/") for u in urls)
