//! Liveness and readiness, including a required dependency going away.

use testkit::{Isolation, spawn_app, spawn_with};

#[actix_rt::test]
async fn ready_when_every_dependency_answers() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    for dep in ["postgres", "rabbitmq", "redis"] {
        assert_eq!(body["checks"][dep], "up", "{dep}: {body}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn not_ready_when_postgres_is_gone() {
    let iso = Isolation::new().await;
    let settings = iso.settings();
    let app = spawn_with(iso.clone(), settings).await;
    // Dropping the test database (forcing its connections closed) takes
    // PostgreSQL away from this instance only.
    let name = iso.database_url.rsplit('/').next().unwrap().to_owned();
    let admin_url = format!("{}/postgres", testkit::pg_server());
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&admin_url)
        .await
        .unwrap();
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!("DROP DATABASE \"{name}\" WITH (FORCE)")),
        &mut conn,
    )
    .await
    .unwrap();
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["postgres"], "down");
    assert_eq!(body["checks"]["rabbitmq"], "up");
    assert_eq!(body["status"], "unavailable");
    app.stop().await;
}
