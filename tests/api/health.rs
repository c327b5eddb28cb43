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

/// Thousands of clients reconnect at once after a restart: the listening
/// socket queues `server.listen_backlog` of them, not std's 128.
#[actix_rt::test]
async fn the_listening_socket_queues_listen_backlog_connection_attempts() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.server.listen_backlog = 3000;
    let app = spawn_with(iso, settings).await;
    // `ss` shows a listening socket's queue limit as its Send-Q.
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", app.port)])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    println!("listening sockets on {}: {text}", app.port);
    assert_eq!(send_q, [3000], "{text}");
    app.stop().await;
}
