//! gRPC over a real loopback socket: the same operations and status codes as REST,
//! watches driven by the database, reflection and health.

use std::time::Duration;

use serde_json::json;
use streamspace_core::queue::Completion;
use streamspace_proto::api::v1 as pb;
use tonic::{Code, Request};

use crate::helpers::TestGateway;

type Sessions = pb::session_service_client::SessionServiceClient<tonic::transport::Channel>;
type Admin = pb::agent_admin_service_client::AgentAdminServiceClient<tonic::transport::Channel>;

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn keyed<T>(msg: T, token: &str, key: &str) -> Request<T> {
    let mut req = authed(msg, token);
    req.metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    req
}

fn create_req(template: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        template: template.into(),
        ..Default::default()
    }
}

/// Waits for the next stream item, failing the test if none arrives.
async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within the deadline")
        .expect("no stream error")
        .expect("the stream is still open")
}

#[tokio::test]
async fn session_operations_and_status_codes_mirror_rest() {
    let gw = TestGateway::start().await;
    let mut client = Sessions::new(gw.channel().await);
    let alice = gw.token("alice");

    let no_token = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);
    let bad = client
        .list_sessions(authed(pb::ListSessionsRequest::default(), "x.y.z"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);

    let none = client
        .create_session(authed(create_req("firefox-browser"), &alice))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unavailable, "{none:?}");
    assert_eq!(none.metadata().get("retry-after").unwrap(), "5");

    gw.online_agent("a-1", "default").await;
    let created = client
        .create_session(authed(create_req("firefox-browser"), &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.state, "pending");
    assert_eq!(created.agent_id, "a-1");
    let invalid = client
        .create_session(authed(create_req("Not A Template"), &alice))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);

    let got = client
        .get_session(authed(
            pb::GetSessionRequest {
                id: created.id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.user_id, "alice");
    assert_eq!(got.state, "pending");
    let list = client
        .list_sessions(authed(pb::ListSessionsRequest::default(), &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions.len(), 1);
    let bob = gw.token("bob");
    let hidden = client
        .get_session(authed(
            pb::GetSessionRequest {
                id: created.id.clone(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    // A pending session will be running: waking it contradicts that.
    let conflict = client
        .wake_session(authed(
            pb::WakeSessionRequest {
                id: created.id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    assert!(conflict.message().contains("pending"), "{conflict:?}");

    let cmd = client
        .get_command(authed(
            pb::GetCommandRequest {
                command_id: created.command_id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cmd.action, "start_session");
    assert_eq!(cmd.status, "pending");
    assert_eq!(cmd.error_message, "");

    // Delete twice with one key: one answer, one change.
    let del = || {
        keyed(
            pb::DeleteSessionRequest {
                id: created.id.clone(),
            },
            &alice,
            "del-1",
        )
    };
    let first = client.delete_session(del()).await.unwrap().into_inner();
    let second = client.delete_session(del()).await.unwrap().into_inner();
    assert_eq!(first, second);
    assert_eq!(first.state, "terminated", "the start was never sent");
    assert_eq!(first.cancelled_command_id, created.command_id);
    let again = client
        .delete_session(authed(
            pb::DeleteSessionRequest {
                id: created.id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let history = client
        .list_session_commands(authed(
            pb::ListSessionCommandsRequest {
                session_id: created.id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.commands.len(), 1);
    assert_eq!(history.commands[0].status, "cancelled");
}

#[tokio::test]
async fn watch_command_sees_pending_sent_ack_completed_in_order() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, command_id) = gw.create_ok(&alice).await;
    let mut client = Sessions::new(gw.channel().await);
    let mut commands = client
        .watch_command(authed(
            pb::WatchCommandRequest {
                command_id: command_id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut sessions = client
        .watch_session(authed(pb::WatchSessionRequest { id: id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut commands).await.status, "pending");
    assert_eq!(next(&mut sessions).await.state, "pending");

    // The dispatcher's path through the real queue: claim, ack, complete.
    let lease = gw.claim("a-1").await;
    assert_eq!(next(&mut commands).await.status, "sent");
    gw.queue.command_ack_one(lease.clone()).await.unwrap();
    assert_eq!(next(&mut commands).await.status, "ack");
    assert_eq!(next(&mut sessions).await.state, "starting");
    gw.queue
        .command_complete_one(Completion {
            lease,
            result: Some(json!({"session": {"url": "http://alice.example"}})),
        })
        .await
        .unwrap();
    let done = next(&mut commands).await;
    assert_eq!(done.status, "completed");
    assert_eq!(done.command.unwrap().status, "completed");
    assert!(
        commands.message().await.unwrap().is_none(),
        "a command watch ends at a terminal status"
    );
    let running = next(&mut sessions).await;
    assert_eq!(running.state, "running");
    assert_eq!(running.session.unwrap().url, "http://alice.example");

    // Stop: terminating, then terminated ends the watch.
    let stop = client
        .delete_session(authed(pb::DeleteSessionRequest { id: id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut sessions).await.state, "terminating");
    assert_eq!(gw.deliver("a-1", None).await, stop.command_id);
    assert_eq!(next(&mut sessions).await.state, "terminated");
    assert!(sessions.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_watch_of_a_finished_command_sends_its_state_and_ends() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (_, command_id) = gw.create_ok(&alice).await;
    gw.deliver("a-1", None).await;
    let mut client = Sessions::new(gw.channel().await);
    let mut stream = client
        .watch_command(authed(
            pb::WatchCommandRequest {
                command_id: command_id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.status, "completed");
    assert!(stream.message().await.unwrap().is_none());
    let bob = gw.token("bob");
    let hidden = client
        .watch_command(authed(pb::WatchCommandRequest { command_id }, &bob))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
}

#[tokio::test]
async fn agent_admin_over_grpc_needs_the_admin_role() {
    let gw = TestGateway::start().await;
    let mut admin = Admin::new(gw.channel().await);
    let ops = gw.admin_token("ops");
    let user = gw.token("alice");
    let register = |token: &str| {
        authed(
            pb::RegisterAgentRequest {
                agent_id: "g-1".into(),
                cluster: "eu".into(),
                ..Default::default()
            },
            token,
        )
    };
    let denied = admin.register_agent(register(&user)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let agent = admin
        .register_agent(register(&ops))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agent.cluster, "eu");
    assert!(!agent.online);
    let dup = admin.register_agent(register(&ops)).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let issued = admin
        .issue_credential(authed(
            pb::IssueCredentialRequest {
                agent_id: "g-1".into(),
            },
            &ops,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(issued.token.starts_with("ssa_"));
    let list = admin
        .list_agents(authed(pb::ListAgentsRequest {}, &ops))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.agents.len(), 1);
    admin
        .revoke_credential(authed(
            pb::RevokeCredentialRequest {
                agent_id: "g-1".into(),
                credential_id: issued.credential_id,
            },
            &ops,
        ))
        .await
        .unwrap();
    let missing = admin
        .get_agent(authed(
            pb::GetAgentRequest {
                agent_id: "nope".into(),
            },
            &ops,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_services_and_health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let gw = TestGateway::start().await;
    let channel = gw.channel().await;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "streamspace.api.v1.SessionService",
        "streamspace.api.v1.AgentAdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let mut health = HealthClient::new(channel);
    // A service by name, and the server as a whole (the empty name).
    for service in ["streamspace.api.v1.SessionService", ""] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

/// With the agent offline and the start never sent, a user's changes of mind are all
/// accepted against the intended state, and the stop then cancels every one of them.
#[tokio::test]
async fn changes_of_mind_while_the_agent_is_down_are_accepted_then_cancelled_by_a_stop() {
    let gw = TestGateway::start().await;
    gw.agent("a-off", "default").await;
    let mut client = Sessions::new(gw.channel().await);
    let alice = gw.token("alice");
    let created = client
        .create_session(authed(
            pb::CreateSessionRequest {
                template: "firefox-browser".into(),
                cluster: "default".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let id = created.id.clone();
    let hibernate = || authed(pb::HibernateSessionRequest { id: id.clone() }, &alice);
    let wake = || authed(pb::WakeSessionRequest { id: id.clone() }, &alice);
    let mut accepted = vec![created.command_id.clone()];
    let h = client
        .hibernate_session(hibernate())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state, "hibernating");
    accepted.push(h.command_id);
    let twice = client.hibernate_session(hibernate()).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    assert!(twice.message().contains("will be hibernated"), "{twice:?}");
    let w = client.wake_session(wake()).await.unwrap().into_inner();
    assert_eq!(w.state, "waking");
    accepted.push(w.command_id);
    let h = client
        .hibernate_session(hibernate())
        .await
        .unwrap()
        .into_inner();
    accepted.push(h.command_id);

    let stopped = client
        .delete_session(authed(pb::DeleteSessionRequest { id: id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, "terminated");
    assert_eq!(stopped.command_id, "", "nothing to send: {stopped:?}");
    assert_eq!(stopped.cancelled_command_id, created.command_id);
    let history = client
        .list_session_commands(authed(
            pb::ListSessionCommandsRequest {
                session_id: id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let shape: Vec<(&str, &str)> = history
        .commands
        .iter()
        .map(|c| (c.command_id.as_str(), c.status.as_str()))
        .collect();
    let expected: Vec<(&str, &str)> = accepted.iter().map(|c| (c.as_str(), "cancelled")).collect();
    assert_eq!(shape, expected);
    // Terminated is terminal.
    let after = client.wake_session(wake()).await.unwrap_err();
    assert_eq!(after.code(), Code::FailedPrecondition);
}

/// Each open watch holds a task and costs a read per change: one user may hold at most
/// `limits.max_watches_per_user`; more is RESOURCE_EXHAUSTED, other users are not
/// affected, and a closed watch gives its place back.
#[tokio::test]
async fn a_user_over_the_watch_limit_gets_resource_exhausted() {
    let gw = TestGateway::start_with(|c| c.limits.max_watches_per_user = 2).await;
    gw.online_agent("a-1", "default").await;
    let (alice, bob) = (gw.token("alice"), gw.token("bob"));
    let (alice_session, _) = gw.create_ok(&alice).await;
    let (bob_session, _) = gw.create_ok(&bob).await;
    let client = Sessions::new(gw.channel().await);
    let watch = |token: &str, id: &str| {
        let mut client = client.clone();
        let req = authed(pb::WatchSessionRequest { id: id.into() }, token);
        async move { client.watch_session(req).await }
    };
    let mut first = watch(&alice, &alice_session).await.unwrap().into_inner();
    next(&mut first).await;
    let second = watch(&alice, &alice_session).await.unwrap().into_inner();
    let err = watch(&alice, &alice_session).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_watches_per_user"), "{err:?}");
    // Another user is not affected.
    let mut theirs = watch(&bob, &bob_session).await.unwrap().into_inner();
    next(&mut theirs).await;

    // Closing one gives its place back (the watch task notices the closed stream).
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match watch(&alice, &alice_session).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the closed watch never gave its place back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One change of a session watched by several clients costs one database read, not one
/// per watcher.
#[tokio::test]
async fn watchers_of_one_session_share_one_read_per_change() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    let client = Sessions::new(gw.channel().await);
    let mut watches = Vec::new();
    for _ in 0..4 {
        let mut c = client.clone();
        let mut w = c
            .watch_session(authed(pb::WatchSessionRequest { id: id.clone() }, &alice))
            .await
            .unwrap()
            .into_inner();
        next(&mut w).await;
        watches.push(w);
    }
    let reads = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("streamspace_api_watch_reads_total "))
            .and_then(|v| v.parse().ok())
            .expect("the watch reads counter")
    };
    let before = reads(&gw.metrics().await.1);
    let mut c = client.clone();
    c.hibernate_session(authed(
        pb::HibernateSessionRequest { id: id.clone() },
        &alice,
    ))
    .await
    .unwrap();
    for w in &mut watches {
        let event = next(w).await;
        assert_eq!(event.state, "hibernating", "{event:?}");
    }
    let after = reads(&gw.metrics().await.1);
    assert_eq!(after - before, 1.0, "one change, four watchers");
}
