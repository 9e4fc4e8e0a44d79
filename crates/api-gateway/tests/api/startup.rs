//! Start-up and shutdown: a schema behind this build is refused (or migrated with
//! `--migrate`), and shutdown ends open watches instead of waiting for them.

use streamspace_api_gateway::App;
use streamspace_core::db::SchemaPolicy;
use streamspace_proto::api::v1 as pb;

use crate::helpers::{TestGateway, test_config};

#[tokio::test]
async fn a_database_behind_this_build_is_refused_unless_migrating() {
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let err = App::build(test_config(&url), SchemaPolicy::Require)
        .await
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("api_gateway"),
        "names the missing migration: {message}"
    );
    let app = App::build(test_config(&url), SchemaPolicy::Migrate)
        .await
        .expect("migrates and builds");
    assert_ne!(app.http_addr().port(), 0);
    assert_ne!(app.grpc_addr().port(), 0);
}

#[tokio::test]
async fn shutdown_ends_open_watches() {
    let mut gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    let mut client = pb::session_service_client::SessionServiceClient::new(gw.channel().await);
    let mut req = tonic::Request::new(pb::WatchSessionRequest { id });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let mut stream = client.watch_session(req).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().state, "pending");
    gw.shutdown().await;
    // The stream ended (cleanly or with a transport error), it did not hang.
    let end = stream.message().await;
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}
