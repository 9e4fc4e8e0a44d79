//! The pretend kubelet's failure modes as a cluster reports them: an OOM-killed container
//! (by image prefix or imposed), a crashing one, each with its last termination.

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use streamspace_kube_fake::PodState;

use crate::helpers::{DEADLINE, NS, TestCluster, deployment, start, wait};

fn container(p: &Pod) -> Option<&ContainerStatus> {
    p.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn last_reason(p: Option<&Pod>) -> Option<String> {
    container(p?)?
        .last_state
        .as_ref()?
        .terminated
        .as_ref()?
        .reason
        .clone()
}

/// Checks the kubelet's report of a container that ended with `reason`/`exit_code` and
/// now waits out its restart back-off.
fn assert_restarting(pod: &Pod, reason: &str, exit_code: i32) {
    let name = pod.metadata.name.as_deref().unwrap();
    let uid = pod.metadata.uid.as_deref().unwrap();
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ready = status
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    let c = container(pod).unwrap();
    assert!(!c.ready);
    assert!(c.restart_count >= 1, "{c:?}");
    let terminated = c.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(terminated.reason.as_deref(), Some(reason));
    assert_eq!(terminated.exit_code, exit_code);
    let waiting = c.state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    assert_eq!(
        waiting.message.as_deref(),
        Some(
            format!("back-off 10s restarting failed container=session pod={name}_{NS}({uid})")
                .as_str()
        )
    );
}

async fn only_pod(t: &TestCluster, session: &str) -> Pod {
    let list = t
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    list.items.into_iter().next().unwrap()
}

#[tokio::test]
async fn an_oom_image_runs_then_is_killed_and_crash_loops() {
    let t = start().await;
    let pods = t.api::<Pod>();
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().labels("session=o1"), &rv)
        .await
        .unwrap()
        .boxed();
    t.api::<Deployment>()
        .create(&PostParams::default(), &deployment("o1", "oom/img:1", 1))
        .await
        .unwrap();
    let mut ran = false;
    let killed = loop {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event before the deadline")
            .expect("stream open")
            .expect("event decodes");
        let pod = match event {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => p,
            WatchEvent::Bookmark(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        ran |= container(&pod)
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some());
        if last_reason(Some(&pod)).is_some() {
            break pod;
        }
    };
    assert!(ran, "the container ran before it was killed");
    assert_restarting(&killed, "OOMKilled", 137);
}

#[tokio::test]
async fn an_imposed_oom_kill_and_a_crashing_image_carry_their_last_termination() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("o2", "img:1", 1))
        .await
        .unwrap();
    wait(&api, "o2", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .and_then(|s| s.ready_replicas)
            == Some(1)
    })
    .await;
    let pod = only_pod(&t, "o2").await;
    let name = pod.metadata.name.clone().unwrap();
    assert!(t.fake.set_pod_state(NS, &name, PodState::OomKilled));
    let pods = t.api::<Pod>();
    let killed = pods.get(&name).await.unwrap();
    assert_restarting(&killed, "OOMKilled", 137);
    let d = wait(&api, "o2", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.ready_replicas.is_none())
    })
    .await
    .unwrap();
    assert_eq!(d.status.unwrap().unavailable_replicas, Some(1));

    api.create(&PostParams::default(), &deployment("c1", "crash/img:1", 1))
        .await
        .unwrap();
    wait(&api, "c1", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()).and_then(|s| s.replicas) == Some(1)
    })
    .await;
    let crashing = only_pod(&t, "c1").await;
    let crashed = wait(
        &pods,
        crashing.metadata.name.as_deref().unwrap(),
        |p: Option<&Pod>| last_reason(p).is_some(),
    )
    .await
    .unwrap();
    assert_restarting(&crashed, "Error", 1);
}
