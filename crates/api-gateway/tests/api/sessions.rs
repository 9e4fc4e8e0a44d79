//! Sessions over REST: creation and placement, ownership, stop/hibernate/wake and their
//! conflicts, input limits.

use axum::http::{Method, StatusCode};
use serde_json::json;
use streamspace_core::queue::Failure;

use crate::helpers::TestGateway;

#[tokio::test]
async fn create_answers_202_with_location_and_commits_session_and_start_together() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "resources": {"memory": "512Mi", "cpu": "250m"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    let id = a.str("id");
    assert_eq!(a.headers["location"], format!("/api/v1/sessions/{id}"));
    assert_eq!(a.str("state"), "pending");
    assert_eq!(a.str("agent_id"), "a-1");
    let (head, hex) = id.rsplit_once('-').unwrap();
    assert_eq!(head, "alice-firefox-browser");
    assert_eq!(hex.len(), 8);

    assert_eq!(gw.session_state(&id).await, "pending");
    let (action, status, payload): (String, String, serde_json::Value) = sqlx::query_as(
        "SELECT action, status, payload FROM agent_commands WHERE command_id = $1 AND session_id = $2",
    )
    .bind(a.str("command_id"))
    .bind(&id)
    .fetch_one(&gw.pool)
    .await
    .unwrap();
    assert_eq!(
        (action.as_str(), status.as_str()),
        ("start_session", "pending")
    );
    assert_eq!(payload["template"], "firefox-browser");
    assert_eq!(payload["user_id"], "alice");
    assert_eq!(payload["resources"]["memory"], "512Mi");

    let got = gw.get(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.str("user_id"), "alice");
    assert_eq!(got.body["resources"]["cpu"], "250m");
    let list = gw.get("/api/v1/sessions", &alice).await;
    assert_eq!(list.body["sessions"].as_array().unwrap().len(), 1);
    let cmds = gw
        .get(&format!("/api/v1/sessions/{id}/commands"), &alice)
        .await;
    assert_eq!(cmds.body["commands"][0]["action"], "start_session");
    let cmd = gw
        .get(&format!("/api/v1/commands/{}", a.str("command_id")), &alice)
        .await;
    assert_eq!(cmd.str("status"), "pending");
    assert!(cmd.body["error_message"].is_null());
}

#[tokio::test]
async fn another_users_session_is_404_everywhere_and_nothing_changes() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let bob = gw.token("bob");
    let (id, command_id) = gw.create_ok(&alice).await;
    let attempts = [
        (Method::GET, format!("/api/v1/sessions/{id}")),
        (Method::DELETE, format!("/api/v1/sessions/{id}")),
        (Method::PUT, format!("/api/v1/sessions/{id}/hibernate")),
        (Method::PUT, format!("/api/v1/sessions/{id}/wake")),
        (Method::GET, format!("/api/v1/sessions/{id}/commands")),
        (Method::GET, format!("/api/v1/commands/{command_id}")),
    ];
    for (method, path) in attempts {
        let a = gw.call(method.clone(), &path, Some(&bob), None, &[]).await;
        a.problem(StatusCode::NOT_FOUND);
    }
    let list = gw.get("/api/v1/sessions", &bob).await;
    assert_eq!(list.body["sessions"], json!([]));
    assert_eq!(gw.session_state(&id).await, "pending");
    assert_eq!(gw.commands_of(&id).await.len(), 1, "no command was added");
}

#[tokio::test]
async fn fields_a_client_must_not_set_are_refused() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    for field in ["owner", "user_id", "agent_id", "state", "id"] {
        let a = gw
            .create(&alice, json!({"template": "firefox-browser", field: "x"}))
            .await;
        let detail = a.problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(field), "{field}: {detail}");
    }
    assert_eq!(gw.count("sessions").await, 0);
}

/// A template may have tighter maxima than the global ones; other templates keep those.
#[tokio::test]
async fn a_template_is_held_to_its_own_maximum() {
    let gw = TestGateway::start_with(|c| {
        c.limits.templates.insert(
            "firefox".into(),
            streamspace_api_gateway::config::TemplateLimits {
                max_memory: Some("2Gi".into()),
                max_cpu: Some("1".into()),
            },
        );
    })
    .await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    for (resources, says) in [
        (
            json!({"memory": "3Gi"}),
            "more than a firefox session may have (2Gi)",
        ),
        (
            json!({"cpu": "1500m"}),
            "more than a firefox session may have (1)",
        ),
    ] {
        let detail = gw
            .create(
                &alice,
                json!({"template": "firefox", "resources": resources}),
            )
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(says), "{resources}: {detail}");
    }
    assert_eq!(gw.count("sessions").await, 0, "a refusal writes nothing");
    let within = json!({"template": "firefox", "resources": {"memory": "2Gi", "cpu": "1"}});
    assert_eq!(gw.create(&alice, within).await.status, StatusCode::ACCEPTED);
    // Another template keeps the global maximum.
    let other = json!({"template": "desktop", "resources": {"memory": "3Gi"}});
    assert_eq!(gw.create(&alice, other).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn limits_are_enforced_with_400_413_and_415() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let long = "x".repeat(40);
    for body in [
        json!({}),
        json!({"template": ""}),
        json!({"template": long}),
        json!({"template": "Firefox"}),
        json!({"template": "firefox", "resources": {"memory": "lots"}}),
        json!({"template": "firefox", "resources": {"cpu": "1".repeat(17)}}),
        json!({"template": "firefox", "cluster": "no spaces"}),
        json!({"template": "firefox", "region": "r".repeat(64)}),
    ] {
        let a = gw.create(&alice, body.clone()).await;
        a.problem(StatusCode::BAD_REQUEST);
    }
    // Quantities are read as numbers and held to the configured maximum (32Gi, 16 cores).
    for (resources, says) in [
        (
            json!({"memory": "99999Ti"}),
            "more than a firefox session may have (32Gi)",
        ),
        (
            json!({"memory": "33Gi"}),
            "more than a firefox session may have",
        ),
        (
            json!({"cpu": "17"}),
            "more than a firefox session may have (16)",
        ),
        (json!({"cpu": "0"}), "positive"),
    ] {
        let detail = gw
            .create(
                &alice,
                json!({"template": "firefox", "resources": resources}),
            )
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(says), "{resources}: {detail}");
    }
    let at_the_limit = gw
        .create(
            &alice,
            json!({"template": "firefox", "resources": {"memory": "32Gi", "cpu": "16000m"}}),
        )
        .await;
    assert_eq!(
        at_the_limit.status,
        StatusCode::ACCEPTED,
        "{:?}",
        at_the_limit.body
    );
    let huge = json!({"template": "firefox", "cluster": "c".repeat(64 * 1024)});
    gw.create(&alice, huge)
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE);
    let no_json = gw
        .call(Method::POST, "/api/v1/sessions", Some(&alice), None, &[])
        .await;
    no_json.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let long_id = "s".repeat(200);
    gw.get(&format!("/api/v1/sessions/{long_id}"), &alice)
        .await
        .problem(StatusCode::BAD_REQUEST);
    gw.get("/api/v1/sessions?limit=0", &alice)
        .await
        .problem(StatusCode::BAD_REQUEST);
    gw.get("/api/v1/sessions?owner=bob", &alice)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert_eq!(gw.count("sessions").await, 1, "only the one at the limit");
}

#[tokio::test]
async fn no_eligible_agent_is_503_with_retry_after() {
    let gw = TestGateway::start().await;
    let alice = gw.token("alice");
    let a = gw
        .create(&alice, json!({"template": "firefox-browser"}))
        .await;
    a.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["retry-after"], "5");

    // An offline agent is not chosen unless its cluster is named.
    gw.agent("a-off", "eu").await;
    let a = gw
        .create(&alice, json!({"template": "firefox-browser"}))
        .await;
    let detail = a.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("name a cluster"), "{detail}");
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "cluster": "eu"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(a.str("agent_id"), "a-off");
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "cluster": "us"}),
        )
        .await;
    let detail = a.problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("no agent is registered"), "{detail}");
    // So is a region no agent is registered in (found by schemathesis: it was a 503).
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "region": "mars-north"}),
        )
        .await;
    let detail = a.problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("no agent is registered"), "{detail}");
    // A known cluster whose agents are all full is a shortage: 503.
    sqlx::query("UPDATE agents SET max_sessions = 1 WHERE agent_id = 'a-off'")
        .execute(&gw.pool)
        .await
        .unwrap();
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "cluster": "eu"}),
        )
        .await;
    let detail = a.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("max_sessions"), "{detail}");
    assert_eq!(gw.count("sessions").await, 1);
}

#[tokio::test]
async fn a_create_racing_for_an_agents_last_place_waits_and_then_finds_it_taken() {
    use streamspace_core::api::sessions::{CreateTx, session_create};
    use streamspace_core::api::{NewSession, Placement};

    let gw = TestGateway::start().await;
    gw.agent("cap-1", "capped").await;
    sqlx::query("UPDATE agents SET max_sessions = 1 WHERE agent_id = 'cap-1'")
        .execute(&gw.pool)
        .await
        .unwrap();
    let new = |user: &str| NewSession {
        user_id: user.into(),
        template: "xterm".into(),
        resources: None,
        placement: Placement {
            cluster: Some("capped".into()),
            region: None,
        },
        offline_after: std::time::Duration::from_secs(15),
        trace_context: None,
        max_active_per_user: None,
    };
    // The first create takes the last place and has not committed yet...
    let mut first = CreateTx::begin(&gw.pool, &new("alice")).await.unwrap();
    session_create(&mut first, &new("alice")).await.unwrap();
    // ...when a second one, by another user, looks for a place.
    let second = {
        let (pool, new) = (gw.pool.clone(), new("bob"));
        tokio::spawn(async move {
            let mut tx = CreateTx::begin(&pool, &new).await.unwrap();
            let out = session_create(&mut tx, &new).await;
            tx.into_inner().commit().await.unwrap();
            out
        })
    };
    wait_until_waiting_on_a_lock_or_finished(&gw.pool, &second).await;
    first.into_inner().commit().await.unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("max_sessions"), "{err}");
    assert_eq!(
        gw.count("sessions").await,
        1,
        "the agent holds one session, its maximum"
    );
}

/// Polls until some transaction waits for an advisory lock, or `task` has finished
/// (then the caller's assertions tell whether it should have waited).
async fn wait_until_waiting_on_a_lock_or_finished<T>(
    pool: &sqlx::PgPool,
    task: &tokio::task::JoinHandle<T>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting || task.is_finished() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second create neither finished nor waited"
        );
        tokio::task::yield_now().await;
    }
}

/// The quota is counted under the user's lock, taken with the transaction's `BEGIN`: a
/// create racing another by the same user for the last place waits for it, then counts
/// what it committed and is refused (with the lock missing, both would count one active
/// session and both insert).
#[tokio::test]
async fn a_create_racing_for_the_users_last_place_waits_and_then_is_refused() {
    use streamspace_core::Error;
    use streamspace_core::api::sessions::{CreateTx, session_create};
    use streamspace_core::api::{NewSession, Placement};

    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let new = || NewSession {
        user_id: "alice".into(),
        template: "xterm".into(),
        resources: None,
        placement: Placement::default(),
        offline_after: std::time::Duration::from_secs(15),
        trace_context: None,
        max_active_per_user: Some(2),
    };
    let mut tx = CreateTx::begin(&gw.pool, &new()).await.unwrap();
    session_create(&mut tx, &new()).await.unwrap();
    tx.into_inner().commit().await.unwrap();
    // The second create takes the last place and has not committed yet...
    let mut second = CreateTx::begin(&gw.pool, &new()).await.unwrap();
    session_create(&mut second, &new()).await.unwrap();
    // ...when a third one, by the same user, counts.
    let third = {
        let pool = gw.pool.clone();
        tokio::spawn(async move {
            let mut tx = CreateTx::begin(&pool, &new()).await?;
            let out = session_create(&mut tx, &new()).await?;
            tx.into_inner().commit().await?;
            Ok::<_, Error>(out)
        })
    };
    wait_until_waiting_on_a_lock_or_finished(&gw.pool, &third).await;
    second.into_inner().commit().await.unwrap();
    let err = third.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::QuotaExceeded(m) if m.contains("most allowed is 2")),
        "{err:?}"
    );
    assert_eq!(gw.count("sessions").await, 2, "alice holds her maximum");
}

#[tokio::test]
async fn placement_picks_the_least_loaded_online_agent_in_the_requested_place() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    gw.online_agent("a-2", "default").await;
    gw.online_agent("b-1", "other").await;
    gw.agent("a-off", "default").await;
    let alice = gw.token("alice");
    let mut per_agent = std::collections::BTreeMap::new();
    for _ in 0..6 {
        let a = gw
            .create(&alice, json!({"template": "xterm", "cluster": "default"}))
            .await;
        *per_agent.entry(a.str("agent_id")).or_insert(0) += 1;
    }
    assert_eq!(
        per_agent,
        [("a-1".to_owned(), 3), ("a-2".to_owned(), 3)]
            .into_iter()
            .collect()
    );
    let a = gw
        .create(&alice, json!({"template": "xterm", "cluster": "other"}))
        .await;
    assert_eq!(a.str("agent_id"), "b-1");
}

#[tokio::test]
async fn delete_while_the_agent_is_down_queues_a_pending_stop_with_null_error() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    gw.deliver("a-1", Some(json!({"session": {"url": "http://s"}})))
        .await;
    assert_eq!(gw.session_state(&id).await, "running");
    // The agent goes away: its connection is gone.
    sqlx::query("UPDATE agents SET connected_owner = NULL WHERE agent_id = 'a-1'")
        .execute(&gw.pool)
        .await
        .unwrap();

    let a = gw
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(a.str("state"), "terminating");
    // The seed report's query.
    let row: (String, Option<String>, String, String, Option<String>) = sqlx::query_as(
        "SELECT command_id, session_id, action, status, error_message FROM agent_commands
         WHERE session_id = $1 ORDER BY created_at DESC, seq DESC LIMIT 1",
    )
    .bind(&id)
    .fetch_one(&gw.pool)
    .await
    .unwrap();
    assert_eq!(row.0, a.str("command_id"));
    assert_eq!(
        (row.2.as_str(), row.3.as_str()),
        ("stop_session", "pending")
    );
    assert_eq!(row.4, None);
    assert_eq!(gw.session_state(&id).await, "terminating");

    // Deleting again is a conflict, not a second stop.
    gw.call(
        Method::DELETE,
        &format!("/api/v1/sessions/{id}"),
        Some(&alice),
        None,
        &[],
    )
    .await
    .problem(StatusCode::CONFLICT);
    // The agent returns and completes the stop: the session is terminated.
    gw.deliver("a-1", None).await;
    assert_eq!(gw.session_state(&id).await, "terminated");
    let detail = gw
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            Some(&alice),
            None,
            &[],
        )
        .await
        .problem(StatusCode::CONFLICT);
    assert!(detail.contains("terminated"), "{detail}");
}

#[tokio::test]
async fn stop_before_the_start_was_sent_cancels_it_without_a_stop_command() {
    let gw = TestGateway::start().await;
    gw.agent("a-off", "eu").await;
    let alice = gw.token("alice");
    let a = gw
        .create(
            &alice,
            json!({"template": "firefox-browser", "cluster": "eu"}),
        )
        .await;
    let id = a.str("id");
    let start = a.str("command_id");
    let d = gw
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(d.status, StatusCode::ACCEPTED, "{:?}", d.body);
    assert_eq!(d.str("state"), "terminated");
    assert!(d.body["command_id"].is_null());
    assert_eq!(d.str("cancelled_command_id"), start);
    assert_eq!(gw.session_state(&id).await, "terminated");
    let cmds = gw.commands_of(&id).await;
    assert_eq!(cmds.len(), 1, "no stop command: {cmds:?}");
    assert_eq!(
        (cmds[0].0.as_str(), cmds[0].1.as_str()),
        ("start_session", "cancelled")
    );
}

#[tokio::test]
async fn stop_after_the_start_was_sent_queues_a_stop_behind_it() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    let _lease = gw.claim("a-1").await;
    let d = gw
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(d.str("state"), "terminating");
    let cmds = gw.commands_of(&id).await;
    let shape: Vec<(&str, &str)> = cmds.iter().map(|c| (c.0.as_str(), c.1.as_str())).collect();
    assert_eq!(
        shape,
        [("start_session", "sent"), ("stop_session", "pending")]
    );
}

#[tokio::test]
async fn hibernate_and_wake_follow_the_state_machine_with_409_otherwise() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    let put = |what: &'static str| {
        let path = format!("/api/v1/sessions/{id}/{what}");
        let gw = &gw;
        let alice = alice.clone();
        async move { gw.call(Method::PUT, &path, Some(&alice), None, &[]).await }
    };
    // Pending will be running: waking it contradicts that.
    let detail = put("wake").await.problem(StatusCode::CONFLICT);
    assert!(detail.contains("pending"), "{detail}");

    gw.deliver("a-1", None).await;
    assert_eq!(gw.session_state(&id).await, "running");
    let h = put("hibernate").await;
    assert_eq!(h.status, StatusCode::ACCEPTED, "{:?}", h.body);
    assert_eq!(h.str("state"), "hibernating");
    let detail = put("hibernate").await.problem(StatusCode::CONFLICT);
    assert!(detail.contains("will be hibernated"), "{detail}");
    assert_eq!(gw.deliver("a-1", None).await, h.str("command_id"));
    assert_eq!(gw.session_state(&id).await, "hibernated");
    put("hibernate").await.problem(StatusCode::CONFLICT);

    let w = put("wake").await;
    assert_eq!(w.status, StatusCode::ACCEPTED, "{:?}", w.body);
    assert_eq!(w.str("state"), "waking");
    gw.deliver("a-1", None).await;
    assert_eq!(gw.session_state(&id).await, "running");
}

/// The seed's situation with a change of mind: the agent is down, and the user hibernates,
/// wakes, hibernates and stops a running session. Each is judged against the state the
/// session will be in once the earlier ones have run, so all are accepted; when the agent
/// returns they take effect in acceptance order and the session ends terminated.
#[tokio::test]
async fn changes_of_mind_while_the_agent_is_down_are_accepted_and_run_in_order() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    gw.deliver("a-1", Some(json!({"session": {"url": "http://s"}})))
        .await;
    sqlx::query("UPDATE agents SET connected_owner = NULL WHERE agent_id = 'a-1'")
        .execute(&gw.pool)
        .await
        .unwrap();
    let call = |method: Method, what: &'static str| {
        let path = if what.is_empty() {
            format!("/api/v1/sessions/{id}")
        } else {
            format!("/api/v1/sessions/{id}/{what}")
        };
        let gw = &gw;
        let alice = alice.clone();
        async move { gw.call(method, &path, Some(&alice), None, &[]).await }
    };

    let mut accepted = Vec::new();
    for (method, what, state) in [
        (Method::PUT, "hibernate", "hibernating"),
        (Method::PUT, "wake", "waking"),
        (Method::PUT, "hibernate", "hibernating"),
        (Method::DELETE, "", "terminating"),
    ] {
        let a = call(method, what).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{what}: {:?}", a.body);
        assert_eq!(a.str("state"), state);
        accepted.push(a.str("command_id"));
    }
    // Once stopped, nothing else makes sense.
    let detail = call(Method::PUT, "wake")
        .await
        .problem(StatusCode::CONFLICT);
    assert!(detail.contains("will be terminated"), "{detail}");
    call(Method::DELETE, "").await.problem(StatusCode::CONFLICT);

    // The agent returns: the commands are delivered in acceptance order. The session keeps
    // showing the latest accepted transition until the stop completes.
    let mut delivered = Vec::new();
    for _ in &accepted {
        delivered.push(gw.deliver("a-1", None).await);
        let state = gw.session_state(&id).await;
        let expected = if delivered.len() < accepted.len() {
            "terminating"
        } else {
            "terminated"
        };
        assert_eq!(state, expected, "after {} deliveries", delivered.len());
    }
    assert_eq!(delivered, accepted);
}

/// A start that fails for good fails the session, even when commands were accepted behind
/// it; a start that completes behind a later command still records the session's URL.
#[tokio::test]
async fn a_start_behind_accepted_commands_still_decides_failure_and_url() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let hibernate = |id: String| {
        let gw = &gw;
        let alice = alice.clone();
        async move {
            let a = gw
                .call(
                    Method::PUT,
                    &format!("/api/v1/sessions/{id}/hibernate"),
                    Some(&alice),
                    None,
                    &[],
                )
                .await;
            assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
        }
    };

    let (failing, _) = gw.create_ok(&alice).await;
    hibernate(failing.clone()).await;
    let lease = gw.claim("a-1").await;
    gw.queue
        .command_fail(&[Failure {
            lease,
            message: "image not found".into(),
            retryable: false,
        }])
        .await
        .unwrap();
    assert_eq!(gw.session_state(&failing).await, "failed");
    // The hibernate behind it runs out (an agent would fail it: no such session); either
    // way the session stays failed.
    gw.deliver("a-1", None).await;
    assert_eq!(gw.session_state(&failing).await, "failed");

    let (ok, _) = gw.create_ok(&alice).await;
    hibernate(ok.clone()).await;
    gw.deliver("a-1", Some(json!({"session": {"url": "http://s-ok"}})))
        .await;
    let a = gw.get(&format!("/api/v1/sessions/{ok}"), &alice).await;
    assert_eq!(
        (a.str("state"), a.str("url")),
        ("hibernating".to_owned(), "http://s-ok".to_owned())
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problem_json() {
    let gw = TestGateway::start().await;
    let alice = gw.token("alice");
    gw.get("/api/v2/nothing", &alice)
        .await
        .problem(StatusCode::NOT_FOUND);
    gw.call(Method::PATCH, "/api/v1/sessions", Some(&alice), None, &[])
        .await
        .problem(StatusCode::METHOD_NOT_ALLOWED);
}

/// One user cannot hold more than `limits.max_active_sessions_per_user` active sessions:
/// the next create is 429 `quota-exceeded` (gRPC `RESOURCE_EXHAUSTED`) and creates nothing;
/// other users are not affected, and stopping a session frees its place.
#[tokio::test]
async fn a_user_over_the_session_quota_gets_429_and_nothing_is_created() {
    use streamspace_proto::api::v1 as pb;
    let gw = TestGateway::start_with(|c| c.limits.max_active_sessions_per_user = 2).await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (first, _) = gw.create_ok(&alice).await;
    gw.create_ok(&alice).await;
    let over = gw
        .create(&alice, json!({"template": "firefox-browser"}))
        .await;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        over.body
    );
    assert_eq!(over.body["type"], "urn:streamspace:problem:quota-exceeded");
    assert!(
        over.str("detail").contains("most allowed is 2"),
        "{:?}",
        over.body
    );
    assert_eq!(gw.count("sessions").await, 2, "nothing was created");

    let mut grpc = pb::session_service_client::SessionServiceClient::new(gw.channel().await);
    let mut req = tonic::Request::new(pb::CreateSessionRequest {
        template: "firefox-browser".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let err = grpc.create_session(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    // Someone else still can; and a stopped session (its start never sent) frees a place.
    gw.create_ok(&gw.token("bob")).await;
    let d = gw
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{first}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(d.str("state"), "terminated");
    gw.create_ok(&alice).await;
}
