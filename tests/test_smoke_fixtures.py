from starlette.testclient import TestClient


def test_post_score_in_process(client: TestClient, add_users, token) -> None:
    (alice,) = add_users(count=1)
    r = client.post(
        "/api/v1/score",
        json={"user_id": alice, "score_increase": 7},
        headers={"Authorization": f"Bearer {token(alice)}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["new_score"] == 7
