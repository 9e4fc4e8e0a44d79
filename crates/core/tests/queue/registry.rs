//! The agent registry: credentials, epochs, derived liveness.

use std::time::Duration;

use streamspace_core::Error;
use streamspace_core::agents::{self, ConnectInfo, NewAgent};

use crate::helpers::pool;

fn new_agent(id: &str) -> NewAgent {
    NewAgent {
        agent_id: id.into(),
        cluster: "eu".into(),
        region: "eu-west".into(),
        max_sessions: None,
    }
}

#[tokio::test]
async fn credentials_authenticate_until_revoked_and_are_stored_hashed() {
    let pool = pool().await;
    agents::agent_create(&pool, &new_agent("agent-x"))
        .await
        .unwrap();
    let err = agents::agent_create(&pool, &new_agent("agent-x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    let err = agents::agent_create(&pool, &new_agent("Bad_Id"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");

    let cred = agents::credential_issue(&pool, "agent-x").await.unwrap();
    let token = cred.token.expose().clone();
    assert!(token.starts_with(agents::CREDENTIAL_PREFIX));
    assert!(
        !format!("{cred:?}").contains(&token),
        "the token never prints"
    );
    let stored: (Vec<u8>,) = sqlx::query_as("SELECT token_sha256 FROM agent_credentials")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored.0.len(), 32);
    assert!(
        !stored
            .0
            .windows(8)
            .any(|w| token.as_bytes().windows(8).any(|t| t == w)),
        "not stored in plain"
    );

    let who = agents::agent_authenticate(&pool, &token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (who.agent_id.as_str(), who.credential_id.as_str()),
        ("agent-x", cred.credential_id.as_str())
    );
    assert!(
        agents::agent_authenticate(&pool, "ssa_nope")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        agents::agent_authenticate(&pool, "Bearer-ish garbage")
            .await
            .unwrap()
            .is_none()
    );

    agents::credential_revoke(&pool, "agent-x", &cred.credential_id)
        .await
        .unwrap();
    assert!(
        agents::agent_authenticate(&pool, &token)
            .await
            .unwrap()
            .is_none()
    );
    let err = agents::credential_revoke(&pool, "agent-x", "cred-unknown")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = agents::credential_issue(&pool, "agent-unknown")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn an_old_connections_heartbeat_and_clean_up_cannot_touch_the_new_one() {
    let pool = pool().await;
    agents::agent_create(&pool, &new_agent("agent-x"))
        .await
        .unwrap();
    let bound = Duration::from_secs(15);
    let offline = agents::agent_get(&pool, "agent-x", bound)
        .await
        .unwrap()
        .unwrap();
    assert!(!offline.online, "never connected");

    let old = agents::agent_connect(&pool, "agent-x", "d1/agent-x/a", &ConnectInfo::default())
        .await
        .unwrap();
    let new = agents::agent_connect(&pool, "agent-x", "d2/agent-x/b", &ConnectInfo::default())
        .await
        .unwrap();
    assert!(new > old);
    assert!(
        !agents::agent_heartbeat(&pool, "agent-x", old)
            .await
            .unwrap(),
        "old epoch fenced"
    );
    assert!(
        !agents::agent_disconnect(&pool, "agent-x", old)
            .await
            .unwrap(),
        "old clean-up is a no-op"
    );
    let a = agents::agent_get(&pool, "agent-x", bound)
        .await
        .unwrap()
        .unwrap();
    assert!(a.online, "still online after the old connection's clean-up");
    assert_eq!(a.connected_owner.as_deref(), Some("d2/agent-x/b"));

    assert!(
        agents::agent_heartbeat(&pool, "agent-x", new)
            .await
            .unwrap()
    );
    assert!(
        agents::agent_disconnect(&pool, "agent-x", new)
            .await
            .unwrap()
    );
    let a = agents::agent_get(&pool, "agent-x", bound)
        .await
        .unwrap()
        .unwrap();
    assert!(!a.online && a.disconnected_at.is_some());
    assert!(
        !agents::agent_heartbeat(&pool, "agent-x", new)
            .await
            .unwrap(),
        "closed connections cannot heartbeat"
    );
}

#[tokio::test]
async fn online_is_derived_from_the_last_heartbeat() {
    let pool = pool().await;
    agents::agent_create(&pool, &new_agent("agent-x"))
        .await
        .unwrap();
    agents::agent_connect(&pool, "agent-x", "d1/agent-x/a", &ConnectInfo::default())
        .await
        .unwrap();
    assert!(
        agents::agent_get(&pool, "agent-x", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap()
            .online
    );
    // The same row read with a tiny bound: a stale heartbeat means offline, no flag needed.
    let stale = crate::helpers::eventually("heartbeat to age", Duration::from_secs(5), || async {
        let a = agents::agent_get(&pool, "agent-x", Duration::from_millis(50))
            .await
            .unwrap()
            .unwrap();
        (!a.online).then_some(a)
    })
    .await;
    assert!(
        stale.connected_owner.is_some(),
        "still connected, but silent"
    );
    let all = agents::agent_list(&pool, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].online);
}
