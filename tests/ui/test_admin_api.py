"""The operator API (/api/admin) on the app `create_app` builds, with an in-memory learning loop: who may
call it (401 in JSON, before anything else), its answers and its 4xx, 503 when the loop cannot run,
and /docs. The same API on the real registry, queue and TorchServe: tests/ui/test_learning.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ui.learning_fakes import TOKEN, AdminSim, FakeLearning, simulate_admin
from ui.learning import NO_DATABASE, UnavailableLearning

# Every operation: (method, path, JSON body or None).
OPERATIONS: list[tuple[str, str, Any]] = [
    ("GET", "/api/admin/models", None),
    ("POST", "/api/admin/retrain", {}),
    ("GET", "/api/admin/jobs", None),
    ("GET", "/api/admin/jobs/1", None),
    ("POST", "/api/admin/models/1.0/promote", None),
    ("POST", "/api/admin/models/1.0/retire", None),
    ("PUT", "/api/admin/models/1.0/workers", {"count": 2}),
    ("GET", "/api/admin/review", None),
    ("PUT", "/api/admin/predictions/1/excluded", {"excluded": True}),
]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[AdminSim]:
    async with simulate_admin(tmp_path) as sim:
        yield sim


def fake(sim: AdminSim) -> FakeLearning:
    assert isinstance(sim.learning, FakeLearning)
    return sim.learning


async def call(
    sim: AdminSim, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await sim.client.request(method, path, json=body, headers=headers or {})


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    for word in words:
        assert word in str(detail), detail
    return str(detail)


@pytest.mark.parametrize("method,path,body", OPERATIONS)
async def test_every_call_without_or_with_a_wrong_token_is_401_in_json(
    admin: AdminSim, method: str, path: str, body: Any
) -> None:
    before = fake(admin).versions.copy(), dict(fake(admin).items)
    for headers in (
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"X-Label-Token": TOKEN},  # a label token is not the operator's
    ):
        response = await call(admin, method, path, body, headers)
        assert_error(response, 401, "ADMIN_TOKEN")
        assert response.headers["www-authenticate"] == "Bearer"
    assert (fake(admin).versions, fake(admin).items) == before  # nothing changed
    assert fake(admin).retrained == [] and fake(admin).runs_by_id == {}


async def test_401_comes_before_a_bad_body_or_an_unknown_id(admin: AdminSim) -> None:
    assert_error(await call(admin, "PUT", "/api/admin/models/1.0/workers", {"count": "many"}), 401)
    assert_error(await call(admin, "GET", "/api/admin/jobs/999"), 401)
    assert_error(await call(admin, "POST", "/api/admin/retrain", {"epochs": -1}), 401)


async def test_without_an_admin_token_configured_nobody_is_the_operator(tmp_path: Path) -> None:
    async with simulate_admin(tmp_path, admin_token=None) as sim:
        for token in ("", "None", TOKEN):
            response = await call(
                sim, "GET", "/api/admin/models", headers={"Authorization": f"Bearer {token}"}
            )
            assert_error(response, 401)


async def test_models_list_versions_with_metrics_and_live_labelled_accuracy(admin: AdminSim) -> None:
    # Two predictions answered by the fake model (version 1.0), one labelled right, one wrong.
    from tests.ui.fakes import digit_png

    ids = []
    for _ in range(2):
        posted = await admin.client.post(
            "/api/predictions", content=digit_png("one"), headers={"content-type": "image/png"}
        )
        ids.append(posted.json()["id"])
    for prediction_id, label in zip(ids, (1, 7), strict=True):
        r = await admin.client.put(
            f"/api/predictions/{prediction_id}/label", json={"label": label}, headers=admin.operator
        )
        assert r.status_code == 200, r.text
    response = await call(admin, "GET", "/api/admin/models", headers=admin.operator)
    assert response.status_code == 200, response.text
    (item,) = response.json()
    assert {"version", "live", "workers", "metrics", "state", "reason"} <= set(item)
    assert (item["version"], item["live"], item["workers"], item["state"]) == ("1.0", True, 2, "live")
    assert item["metrics"]["mnist"]["accuracy"] == 0.9942
    assert item["metrics"]["labelled"] == {"accuracy": 0.5, "n": 2}


async def test_retrain_answers_202_with_the_job_id_and_the_job_moves(admin: AdminSim) -> None:
    response = await call(admin, "POST", "/api/admin/retrain", headers=admin.operator)  # no body at all
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["status"] == "queued"
    response = await call(
        admin, "POST", "/api/admin/retrain", {"epochs": 2, "auto_promote": False}, admin.operator
    )
    assert response.status_code == 202
    assert fake(admin).retrained == [{}, {"epochs": 2, "auto_promote": False}]

    job = (await call(admin, "GET", f"/api/admin/jobs/{job_id}", headers=admin.operator)).json()
    assert (job["status"], job["progress"], job["version"], job["promoted"]) == ("queued", 0.0, None, False)
    fake(admin).advance(job_id, 0.4)
    job = (await call(admin, "GET", f"/api/admin/jobs/{job_id}", headers=admin.operator)).json()
    assert (job["status"], job["progress"]) == ("running", 0.4)
    assert job["history"][-1]["epoch"] == 1
    fake(admin).advance(job_id, 1.0, version="2.0")
    job = (await call(admin, "GET", f"/api/admin/jobs/{job_id}", headers=admin.operator)).json()
    assert (job["status"], job["progress"], job["version"]) == ("succeeded", 1.0, "2.0")
    listed = (await call(admin, "GET", "/api/admin/jobs", headers=admin.operator)).json()
    assert [j["job_id"] for j in listed] == [2, 1]


@pytest.mark.parametrize(
    "body",
    [
        {"epochs": 0},
        {"epochs": "2"},
        {"epochs": 1.5},
        {"lr": 0},
        {"auto_promote": "yes"},
        {"mnist_eval_limit": 0},
        {"feedback_weight": 1.0},
        {"batch_size": 1},
        {"unknown_option": 1},
        [1, 2],
        "epochs",
    ],
)
async def test_retrain_refuses_bad_options_with_422(admin: AdminSim, body: Any) -> None:
    response = await call(admin, "POST", "/api/admin/retrain", body, admin.operator)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], list)
    assert fake(admin).retrained == []


async def test_unknown_job_version_and_prediction_are_404_in_json(admin: AdminSim) -> None:
    op = admin.operator
    assert_error(await call(admin, "GET", "/api/admin/jobs/77", headers=op), 404, "77")
    assert_error(await call(admin, "POST", "/api/admin/models/9.0/promote", headers=op), 404, "9.0")
    assert_error(await call(admin, "POST", "/api/admin/models/9.0/retire", headers=op), 404, "9.0")
    assert_error(await call(admin, "PUT", "/api/admin/models/9.0/workers", {"count": 1}, op), 404, "9.0")
    assert_error(await call(admin, "PUT", "/api/admin/predictions/99/excluded", {"excluded": True}, op), 404)


async def test_bad_ids_versions_and_bodies_are_422(admin: AdminSim) -> None:
    op = admin.operator
    for path in ("/api/admin/jobs/0", "/api/admin/jobs/abc", f"/api/admin/jobs/{2**63}"):
        assert (await call(admin, "GET", path, headers=op)).status_code == 422, path
    for version in ("..", "-1", "a" * 65, "1.0%20x"):
        response = await call(admin, "POST", f"/api/admin/models/{version}/promote", headers=op)
        assert response.status_code in (404, 422), (version, response.text)
        assert response.headers["content-type"].startswith("application/json")
    for body in ({"count": -1}, {"count": 17}, {"count": "2"}, {"count": True}, {}, {"count": 1, "x": 1}):
        response = await call(admin, "PUT", "/api/admin/models/1.0/workers", body, op)
        assert response.status_code == 422, body
    for body in ({"excluded": "true"}, {"excluded": 1}, {}, {"excluded": True, "more": 1}):
        response = await call(admin, "PUT", "/api/admin/predictions/1/excluded", body, op)
        assert response.status_code == 422, body
    assert (await call(admin, "GET", "/api/admin/review?limit=0", headers=op)).status_code == 422
    assert not any(item.excluded for item in fake(admin).items.values())


async def test_promote_rolls_back_retire_and_scale(admin: AdminSim) -> None:
    op = admin.operator
    run = (await call(admin, "POST", "/api/admin/retrain", headers=op)).json()
    fake(admin).advance(run["job_id"], 1.0, version="2.0")
    promoted = await call(admin, "POST", "/api/admin/models/2.0/promote", headers=op)
    assert promoted.status_code == 200, promoted.text
    assert (promoted.json()["version"], promoted.json()["live"]) == ("2.0", True)
    models = {m["version"]: m for m in (await call(admin, "GET", "/api/admin/models", headers=op)).json()}
    assert (models["2.0"]["live"], models["1.0"]["live"]) == (True, False)
    assert models["1.0"]["reason"] == "replaced by 2.0"
    assert_error(await call(admin, "POST", "/api/admin/models/2.0/retire", headers=op), 409, "live")
    back = await call(admin, "POST", "/api/admin/models/1.0/promote", headers=op)  # the rollback
    assert back.json()["live"] is True
    retired = await call(admin, "POST", "/api/admin/models/2.0/retire", headers=op)
    assert (retired.status_code, retired.json()["state"]) == (200, "retired")
    scaled = await call(admin, "PUT", "/api/admin/models/1.0/workers", {"count": 3}, op)
    assert (scaled.status_code, scaled.json()["workers"]) == (200, 3)


async def test_review_and_exclude(admin: AdminSim) -> None:
    op = admin.operator
    items = (await call(admin, "GET", "/api/admin/review?limit=2", headers=op)).json()
    assert [i["id"] for i in items] == [3, 2]
    assert items[0]["image_url"] == admin.service.links.image_url(3)
    assert items[0]["image_url"].startswith("/api/predictions/3/image.png?sig=")
    assert (items[0]["label"], items[0]["digit"], items[0]["excluded"]) == (7, 1, False)
    response = await call(admin, "PUT", "/api/admin/predictions/3/excluded", {"excluded": True}, op)
    assert response.json() == {"id": 3, "excluded": True}
    assert fake(admin).items[3].excluded is True
    later = (await call(admin, "GET", "/api/admin/review?offset=2", headers=op)).json()
    assert [i["id"] for i in later] == [1]


@pytest.mark.parametrize("method,path,body", OPERATIONS)
async def test_the_loop_down_is_503_with_the_reason(
    admin: AdminSim, method: str, path: str, body: Any
) -> None:
    fake(admin).down = True
    assert_error(await call(admin, method, path, body, admin.operator), 503, "database is unreachable")
    assert_error(await call(admin, method, path, body), 401)  # still nobody else's business


async def test_no_database_configured_is_503_saying_so(tmp_path: Path) -> None:
    async with simulate_admin(tmp_path, learning=UnavailableLearning(NO_DATABASE)) as sim:
        for method, path, body in OPERATIONS:
            assert_error(await call(sim, method, path, body, sim.operator), 503, "DATABASE_URL")


async def test_the_public_api_knows_nothing_of_the_operator_api(admin: AdminSim) -> None:
    spec = (await admin.client.get("/openapi.json")).json()
    public = [p for p in spec["paths"] if not p.startswith("/api/admin")]
    for path in public:
        for operation in spec["paths"][path].values():
            assert "operator" not in operation.get("tags", []), path
    page = await admin.client.get("/")
    assert "/api/admin" not in page.text


async def test_openapi_documents_the_operator_api(admin: AdminSim) -> None:
    spec = (await admin.client.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("get", "/api/admin/models"),
        ("post", "/api/admin/retrain"),
        ("get", "/api/admin/jobs/{job_id}"),
        ("post", "/api/admin/models/{version}/promote"),
        ("post", "/api/admin/models/{version}/retire"),
        ("put", "/api/admin/models/{version}/workers"),
        ("get", "/api/admin/review"),
        ("put", "/api/admin/predictions/{prediction_id}/excluded"),
    }
    for method, path in expected:
        operation = paths[path][method]
        assert operation["tags"] == ["operator"], path
        assert {"operator"} == {name for s in operation["security"] for name in s}, path
        for status in ("401", "503"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorOut"
            }, (path, status)
        assert operation.get("description") or operation.get("summary"), path
    assert "202" in paths["/api/admin/retrain"]["post"]["responses"]
    assert "409" in paths["/api/admin/models/{version}/retire"]["post"]["responses"]
    assert "404" in paths["/api/admin/jobs/{job_id}"]["get"]["responses"]
    assert {"epochs", "auto_promote", "mnist_eval_limit"} <= set(
        spec["components"]["schemas"]["RetrainIn"]["properties"]
    )
    docs = await admin.client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
